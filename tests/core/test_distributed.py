"""Sharded evaluation (mixup_transfer/core/distributed.py) and the rank-aware pipeline: the shards
by hand, and 2 gloo processes on CPU giving exactly the single-process numbers for detection, WSOL
and robustness evaluation."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from mixup_transfer.core import distributed as ddist

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_shards_of_seven_items_over_two_ranks_by_hand():
    assert ddist.shard_indices(7, 1, 0, 2) == [0, 2, 4, 6] and ddist.shard_indices(7, 1, 1, 2) == [
        1,
        3,
        5,
    ]
    # blocks of 3 (the batch size): [0 1 2] [3 4 5] [6] dealt round-robin
    assert ddist.shard_indices(7, 3, 0, 2) == [0, 1, 2, 6] and ddist.shard_indices(7, 3, 1, 2) == [
        3,
        4,
        5,
    ]
    assert ddist.shard_blocks(7, 3, 0, 2) == [0, 2] and ddist.shard_blocks(7, 3, 1, 2) == [1]
    assert ddist.shard_indices(2, 1, 2, 3) == [] and ddist.shard_indices(0, 4, 0, 2) == []
    assert ddist.shard_indices(5) == [0, 1, 2, 3, 4]  # no process group: everything
    for n, block, world in ((7, 1, 2), (7, 3, 2), (10, 4, 3), (1, 2, 4)):
        parts = [ddist.shard_indices(n, block, r, world) for r in range(world)]
        # disjoint, complete, no padding
        assert sorted(i for p in parts for i in p) == list(range(n))
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        ddist.shard_indices(7, 1, 2, 2)


def test_order_by_index_refuses_missing_or_repeated_indices():
    assert ddist.order_by_index([([1, 3], ["b", "d"]), ([0, 2], ["a", "c"])], 4) == ["a", "b", "c",
                                                                                     "d"]
    with pytest.raises(ValueError, match="gathered twice"):
        ddist.order_by_index([([0, 1], "ab"), ([1], "b")], 2)
    with pytest.raises(ValueError, match="1 of 3 indices were not gathered"):
        ddist.order_by_index([([0, 2], "ac")], 3)
    with pytest.raises(ValueError, match="out of range"):
        ddist.order_by_index([([0, 5], "ab")], 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MT_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from mixup_transfer.core.runtime import init_distributed

    init_distributed("gloo")


def _spawn(worker, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2)


def _tiny_classification(n: int):
    """n 2x2 images of 3 classes (sample k: pixel values k/10, label k % 3) and a fixed linear
    classifier."""
    ds = [(torch.full((3, 2, 2), k / 10), k % 3, torch.zeros(0, 4), k) for k in range(n)]
    torch.manual_seed(0)
    return ds, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()


def _robustness_predictions(n: int):
    from transfer.robustness.evaluate import predict_sharded

    ds, model = _tiny_classification(n)
    return predict_sharded(model, ds, 2, 0, torch.device("cpu"), keep=range(n))


def _gather_worker(rank, world, port, out):
    _join(rank, world, port)
    mine = ddist.shard_indices(7, 1)
    items = ddist.gather_ordered([f"item{i}" for i in mine], mine, 7)
    arrays = ddist.gather_arrays({"sq": np.asarray(mine, np.float32) ** 2,
                                  "odd": np.asarray(mine) % 2 == 1},
                                 mine, 7)
    counts = ddist.sum_counts([len(mine), sum(mine)])
    # robustness predictions over 3 images in batches of 2 (ranks: [0, 1], [2]) and over 2 (rank 1:
    # nothing)
    preds = {n: _robustness_predictions(n) for n in (3, 2)}
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(rank + 1.0)  # each rank's own statistics, as after DDP training
    bn.num_batches_tracked.fill_(10 * (rank + 1))
    ddist.broadcast_buffers(bn)
    torch.save({"items": items, "arrays": arrays, "counts": counts, "preds": preds,
                "bn": bn.state_dict()},
               Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_gather_of_seven_items_and_an_empty_shard_over_two_gloo_processes(tmp_path):
    _spawn(_gather_worker, str(tmp_path))
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["items"] == [f"item{i}" for i in range(7)]
        assert r["arrays"]["sq"].dtype == np.float32 and r["arrays"]["sq"].tolist() == [
            0,
            1,
            4,
            9,
            16,
            25,
            36,
        ]
        assert r["arrays"]["odd"].dtype == bool and r["arrays"]["odd"].tolist() == [
            i % 2 == 1 for i in range(7)
        ]
        assert r["counts"] == [7, 21]
        # rank 0's
        assert (
            r["bn"]["running_mean"].tolist() == [1.0, 1.0]
            and int(r["bn"]["num_batches_tracked"]) == 10
        )
        for n in (3, 2):
            one = _robustness_predictions(n)
            assert one["label"].tolist() == [k % 3 for k in range(n)] and one[
                "example_index"
            ] == list(range(n))
            _assert_same(r["preds"][n], one)


# ----------------------------------------------------------------------------- the one sharded
# inference

class _Shift(torch.nn.Module):
    """x + shift, with ``shift`` a buffer (as BatchNorm's statistics): the records show which
    rank's was used."""

    def __init__(self, shift: float):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))

    def forward(self, x):
        return x + self.shift


def _inference(dst):
    from mixup_transfer.core.inference import inference_on_dataset, to_host

    rank = ddist.rank_world()[0]
    model = _Shift(100.0 * rank)  # each rank its own buffer: rank 0's (0) must reach every rank
    # 7 items in batches of 2: 4 batches, uneven shards
    dataset = [(torch.tensor([float(k)]), k) for k in range(7)]

    def to_records(batch, outputs, indices):
        values, training = outputs
        (values,) = to_host([values[:, 0]])
        return [(i, int(label), float(v), rank, training) for i, label,
                v in zip(indices, batch[1], values)]

    return inference_on_dataset(model, dataset, lambda m, inputs: (m(inputs[0]), m.training),
                                to_records, batch_size=2, device=torch.device("cpu"), dst=dst)


def _inference_worker(rank, world, port, out):
    _join(rank, world, port)
    res = {dst: _inference(dst) for dst in (None, 0)}
    torch.save({k: (r.records, r.count) for k, r in res.items()}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_inference_on_dataset_gathers_records_in_dataset_order_over_two_gloo_processes(tmp_path):
    _spawn(_inference_worker, str(tmp_path))
    # blocks of 2 dealt round-robin: rank 0 predicts [0, 1] and [4, 5], rank 1 [2, 3] and [6]; rank
    # 0's buffer (shift 0) on both, the model in eval mode: record k is (k, label k, value k, the
    # rank that predicted it)
    by_hand = [(0, 0, 0.0, 0, False), (1, 1, 1.0, 0, False), (2, 2, 2.0, 1, False),
               (3, 3, 3.0, 1, False), (4, 4, 4.0, 0, False), (5, 5, 5.0, 0, False),
               (6, 6, 6.0, 1, False)]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0[None] == r1[None] == (by_hand, 7)  # gathered to every rank
    assert r0[0] == (by_hand, 7) and r1[0] == (None, 7)  # gathered to rank 0 only
    one = _inference(None)  # one process: the same records
    assert one.records == [r[:3] + (0, False) for r in by_hand] and one.count == 7


def test_to_host_copies_every_dtype_exactly_in_one_transfer():
    from mixup_transfer.core.inference import to_host

    tensors = [torch.tensor([[0.1, -3e38], [float("nan"), 1e-45]]),
               torch.tensor([0.1], dtype=torch.bfloat16), torch.tensor([2 ** 53, -7]),
               torch.tensor([True, False]), torch.zeros(0, 4)]
    for a, b in zip(to_host(tensors), tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(),
                                                                         b.nan_to_num())
    assert to_host([]) == []


# ----------------------------------------------------------------------------- the three
# evaluations

def _det_cfg(toy_world, fmt: str):
    from transfer.detection import config as det_config

    return det_config.resolve_config({
        "model": {"type": "ssd", "arch": "resnet18", "size": 64, "max_size": 64,
                  "kwargs": {"detections_per_img": 10}},
        "data": {"format": fmt, "root": str(toy_world / ("VOCdevkit" if fmt == "voc" else "coco")),
                 "voc_train": ["2007/trainval"], "max_train": 2, "max_val": 7, "num_workers": 0},
        "eval": {"batch_size": 2}})  # 4 batches of 2, 2, 2, 1 images: 2 + 2 over the ranks


def _detection(toy_world, out_dir):
    """SSD predictions on 7 VOC07 test and 7 COCO val images, scored on rank 0 (VOC 11-point AP,
    COCO AP)."""
    from mixup_transfer.core.runtime import is_main_process
    from transfer.detection import scoring
    from transfer.detection import torchvision_backend as tvb

    out = {}
    for fmt in ("voc", "coco"):
        cfg = _det_cfg(toy_world, fmt)
        _, test, ctx, _ = tvb.build_datasets(cfg)
        torch.manual_seed(0)
        model = tvb.build_model(cfg, ctx["num_classes"], None).eval()
        preds, examples, _, n = tvb.predict_sharded(model, test, 2, 0, torch.device("cpu"),
                                                    max_keep_examples=3)
        metrics = scoring.score_predictions(preds, ctx, Path(out_dir)
                                            / fmt) if is_main_process() else None
        out[fmt] = {"preds": preds, "examples": [e["scores"] for e in examples], "n": n,
                    "metrics": metrics}
    return out


def _wsol_cfg(toy_world):
    from mixup_transfer.core.config import load_config
    from wsol.finetune import resolve_config

    meta = toy_world / "wsol_metadata" / "CUB"
    overrides = [f"data.image_root={toy_world / 'CUB_200_2011' / 'images'}",
                 f"data.metadata_root={meta}", "data.num_workers=0", "data.max_train=2",
                 "data.max_val=7", "input.resize=40", "input.crop=32", "input.test_size=32",
                 "eval.batch_size=3", "eval.cam_curve_interval=0.01", "runtime.device=cpu"]
    return resolve_config(load_config(str(ROOT / "configs/wsol/toy_multimix.yaml"), overrides))


def _wsol(toy_world):
    from wsol.finetune import _datasets, _eval
    from wsol.model import CAMModel

    cfg = _wsol_cfg(toy_world)
    _, test, num_classes = _datasets(cfg)
    torch.manual_seed(0)
    model = CAMModel("resnet18", num_classes)
    res = _eval(model, test, cfg, torch.device("cpu"), keep_examples=4)
    res["_examples"] = [(e["image_id"], e["cam"]) for e in res["_examples"]]
    return res


def _robustness(toy_world, ckpt, out_dir):
    from transfer.robustness import evaluate_checkpoint

    m = evaluate_checkpoint(ckpt, toy_world / "imagenet", "all", out_dir,
                            ood_dirs=[toy_world / "VOCdevkit" / "VOC2007" / "JPEGImages"], limit=7,
                            image_size=32, resize=36, batch_size=2, pgd_iters=2, device="cpu")
    m.pop("seconds")
    return m


def _evaluations_worker(rank, world, port, toy_world, ckpt, out):
    _join(rank, world, port)
    toy_world, out = Path(toy_world), Path(out)
    res = {"detection": _detection(toy_world, out / "det"), "wsol": _wsol(toy_world),
           "robustness": _robustness(toy_world, ckpt, out / "rob")}
    torch.save(res, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _assert_same(a, b, path="") -> None:
    """Exactly equal, tensors and arrays element by element (bit for bit), floats with ==."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_numbers(toy_world, tmp_path):
    """Detection (SSD predictions + VOC AP on rank 0), WSOL (MaxBoxAcc, MaxBoxAccV2, Top-1 Loc,
    kept CAMs) and every robustness suite (clean, background, calibration, FGSM, PGD, OOD) over 7
    images: identical numbers."""
    from mixup_transfer.core.checkpoint import build_resnet, save_backbone

    n_classes = len([d for d in (toy_world / "imagenet" / "val").iterdir() if d.is_dir()])
    torch.manual_seed(0)
    ckpt = tmp_path / "backbone.pth"
    save_backbone(ckpt, build_resnet("resnet18", num_classes=n_classes),
                  {"arch": "resnet18", "num_classes": n_classes, "method": "erm", "epochs": 0,
                   "config": "", "metrics": {}})
    _spawn(_evaluations_worker, str(toy_world), str(ckpt), str(tmp_path / "ddp"))
    one = {"detection": _detection(toy_world, tmp_path / "one" / "det"), "wsol": _wsol(toy_world),
           "robustness": _robustness(toy_world, ckpt, tmp_path / "one" / "rob")}
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for fmt in ("voc", "coco"):
        assert one["detection"][fmt]["n"] == 7 and len(one["detection"][fmt]["preds"]) == 7
        assert r1["detection"][fmt]["metrics"] is None  # rank 0 scores
        r1["detection"][fmt]["metrics"] = r0["detection"][fmt]["metrics"]
    assert one["wsol"]["num_images"] == 7 and one["robustness"]["n_images"] == 7
    _assert_same(one, r0)
    _assert_same(one, r1)
    # rank 0 wrote the files, the same ones as one process
    assert json.loads((tmp_path / "ddp" / "rob"
                       / "metrics.json").read_text())["clean"] == one["robustness"]["clean"]
    for f in one["robustness"]["figures"].values():
        assert (tmp_path / "ddp" / "rob" / f).is_file()
    one_files = sorted(p.name for p in (tmp_path / "one" / "det" / "voc"
                                        / "voc_results").iterdir())
    assert sorted(p.name for p in (tmp_path / "ddp" / "det" / "voc"
                                   / "voc_results").iterdir()) == one_files
    results = (tmp_path / "ddp" / "det" / "coco" / "coco_results.json").read_text()
    assert results == (tmp_path / "one" / "det" / "coco" / "coco_results.json").read_text()
    assert not list((tmp_path / "ddp").rglob("*.tmp"))


# ----------------------------------------------------------------------------- the rank-aware
# pipeline

def _stage_sequence(out: Path, rank: int) -> dict:
    """Three calls of `Pipeline._stage` with a fake stage: run, reuse, rerun after a changed
    spec."""
    from mixup_transfer.pipeline import run as prun

    calls, writes = [], []
    real_write = prun.write_json
    prun.write_json = lambda obj, path: (writes.append(Path(path).name), real_write(obj, path))
    pipe = prun.Pipeline(
        {
            "name": "fake",
            "out_root": str(out),
            "methods": ["erm"],
            "pretrain": {"config": str(ROOT / "configs/pretrain/toy_{method}.yaml")},
        }
    )
    folder = out / "fake" / "stage"

    def fake_stage(d: Path) -> dict:
        calls.append(d.name)
        if rank == 0:  # a stage's own files are written by rank 0 (as every real stage does)
            (d / "result.txt").write_text("done")
        return {"value": 42, "rank": rank}

    results = [pipe._stage("fake", folder, {"pretrain"}, fake_stage, {"x": 1})[0],
               pipe._stage("fake", folder, {"pretrain"}, fake_stage, {"x": 1})[0],
               pipe._stage("fake", folder, {"pretrain"}, fake_stage, {"x": 2})[0]]
    prun.write_json = real_write
    return {"calls": calls, "writes": writes, "results": results, "reused": pipe.reused,
            "files": sorted(p.name for p in folder.iterdir())}


def _pipeline_worker(rank, world, port, out):
    _join(rank, world, port)
    res = _stage_sequence(Path(out), rank)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def test_pipeline_stage_runner_under_two_gloo_processes(tmp_path):
    """Every rank runs a stage, rank 0 alone writes stage.json, every rank gets rank 0's metrics
    and takes the same reuse decision; the same sequence in one process gives the same results. (A
    whole tiny pipeline under 2 processes takes minutes on a CPU; this checks the runner every
    stage goes through.)"""
    _spawn(_pipeline_worker, str(tmp_path / "ddp"))
    one = _stage_sequence(tmp_path / "one", 0)
    assert one["calls"] == ["stage", "stage"] and one["reused"] == ["fake"]
    assert one["results"] == [{"value": 42, "rank": 0}] * 3 and one["writes"] == ["stage.json"] * 2
    r0, r1 = (json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert (
            r["calls"] == one["calls"]
            and r["reused"] == one["reused"]
            and r["results"] == one["results"]
        )
        assert r["files"] == ["result.txt", "stage.json"]
    # one marker per run, by rank 0
    assert r0["writes"] == ["stage.json"] * 2 and r1["writes"] == []
    marker = json.loads((tmp_path / "ddp" / "fake" / "stage" / "stage.json").read_text())
    assert marker["metrics"] == {"value": 42, "rank": 0}
