"""The first thing to run on a new GPU node or cluster (`make gpu-check`, `tools/gpu_check.py`):
every CUDA path of the toolkit for a few steps on the toy world, in a few minutes on one GPU, with
a pass/fail table.

Checks (each a row of `gpu_check.md` / `gpu_check.json` in the output folder):
  - methods: 3 engine steps of every pretraining method (ResNet-18, 64 px, batch 8) in bf16 and in
    fp16 (the GradScaler path), channels_last, finite losses and parameters;
  - decode: the nvJPEG path (`pretrain.data.decode_jpegs`) against the CPU decoder on the toy
    ImageNet JPEGs and a CMYK JPEG (which nvJPEG refuses and the CPU decodes): the largest pixel
    difference, identical to pass;
  - detection: SSD and Faster R-CNN, one short epoch and their VOC evaluation (bf16,
    channels_last);
  - wsol: one short CAM fine-tuning epoch and its localization metrics;
  - robustness: the clean, calibration, FGSM and PGD suites on a few toy val images;
  - nccl: a one-process NCCL group under torchrun (init, all_reduce, destroy);
  - throughput: training images/s, step time relative to ERM and peak memory of ResNet-50 at 224 px
    for each method at the per-GPU batch of its ImageNet recipe (`PAPER_BATCH`).
It lives in `mixup_transfer/pipeline/` because it drives every stage (docs/architecture.md's import
rules).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mixup_transfer.core import runtime as rt

ROOT = Path(__file__).resolve().parents[1]

# (method, knobs) of the "methods" check: every registered method, on its mixing branch where it
# has a coin
METHOD_CASES = [
    ("erm", {}), ("input_mixup", {}), ("manifold_mixup", {}), ("cutmix", {}), ("puzzlemix", {}),
    ("multimix", {"n": 50, "prob": 1.0}), ("dense_multimix", {"n": 50, "prob": 1.0}),
    ("multi_interp", {"k": 2}), ("alignmix", {}), ("alignmix_stage2", {"resolution": 2}),
    ("alignmix_ae", {"resolution": 2, "decoder_size": 64}), ("zeta_mixup", {}),
    ("tokenmix", {"switch_prob": 1.0, "labels": "area", "minimum_tokens": 1}), ("comixup", {}),
    ("transmix", {"switch_prob": 1.0}),
    ("saliencymix", {"prob": 1.0}), ("supermix", {"max_iter": 2}),
]
# the network of a method's check where it is not a ResNet-18 (TransMix reads a ViT's class-token
# attention)
METHOD_ARCH = {"transmix": "vit_tiny_toy"}

# per-GPU batch of each ImageNet recipe (configs/pretrain/imagenet_*.yaml: global batches over the
# papers' GPUs)
PAPER_BATCH = {
    "erm": 64, "input_mixup": 64, "cutmix": 64,  # 256 on 4 GPUs (PuzzleMix / CutMix READMEs)
    "puzzlemix_swap": 64, "puzzlemix": 64,  # 256 on 4 GPUs
    "multimix": 128, "dense_multimix": 128,  # b = 128 per GPU (MultiMix A.1)
    "alignmix": 128,  # 1024 (the released ImageNet command, DataParallel) over 8 GPUs
    "alignmix_stage2": 25,  # 100 on 4 GPUs (AlignMix App. B)
    "multi_interp_input_k5": 64, "multi_interp_manifold_embedding_k5": 64,
    "multi_interp_manifold_layer2_k5": 64,
    # the input-mixing recipes' 256 on 4 GPUs (no ImageNet recipe in arXiv:2204.03323)
    "zeta_mixup": 64,
    # b = 128 per GPU (MultiMix A.1, its ViT-S/16 rows; configs/pretrain/imagenet_vit_s16_*.yaml)
    "transmix": 128,
    "saliencymix": 64,  # 256 on 4 GPUs (SaliencyMix README, ImageNet command)
    "supermix": 16,  # the SuperMix README ImageNet command: --bs 16 (no ImageNet training recipe)
}


def _row(check: str, ok: bool, seconds: float, detail: str) -> dict:
    return {"check": check, "ok": bool(ok), "seconds": round(seconds, 1), "detail": detail}


def _timed(check: str, fn, *args) -> dict:
    """Run one check; a failure is a row with the error's last line, never an abort of the
    others."""
    t0 = time.perf_counter()
    try:
        detail = fn(*args)
        return _row(check, True, time.perf_counter() - t0, detail)
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return _row(check, False, time.perf_counter() - t0, last[:300])


# -- methods --------------------------------------------------------------------------------------

def _method_task(name: str, knobs: dict, device: torch.device):
    from mixup_transfer.core.engine import Task
    from pretrain.methods import build_method, network_stages

    class Tiny(Task):
        steps_per_epoch = 3

        def __init__(self):
            torch.manual_seed(0)
            net = network_stages(METHOD_ARCH.get(name, "resnet18"), 10)
            self.model = build_method(name, net, 10, **knobs).to(device)
            if self.model.needs_teacher:  # SuperMix: a frozen network of the same shape
                self.model.teacher = network_stages(METHOD_ARCH.get(name, "resnet18"),
                                                    10).to(device)
            if device.type == "cuda":
                self.model.to(memory_format=torch.channels_last)
            self.model.generator = torch.Generator(device=device)
            g = torch.Generator().manual_seed(1)
            self.data = [(torch.rand(8, 3, 64, 64, generator=g),
                          torch.randint(10, (8,), generator=g))
                         for _ in range(3)]

        @property
        def find_unused_parameters(self):
            return self.model.find_unused_parameters

        def batches(self, epoch, start_step):
            return iter(self.data[start_step:])

        def before_step(self, micro_step):
            self.model.seed(micro_step)

        def param_groups(self):
            return [{"params": list(self.model.parameters()), "lr": 0.01}]

    return Tiny()


def check_method(name: str, knobs: dict, precision: str, device: torch.device, out: Path) -> str:
    """3 steps through the real engine (AMP, scaler, finite checks, a checkpoint) -> the mean
    loss."""
    from mixup_transfer.core.engine import Engine, LoopSettings, build_optimizer

    task = _method_task(name, knobs, device)
    opt = build_optimizer("sgd", task.param_groups(), 0.01, momentum=0.9)
    settings = LoopSettings(total_steps=3, device=device, precision=precision,
                            channels_last=device.type == "cuda", grad_norm=True, log_every=3)
    engine = Engine(task, out / f"{name}_{precision}", settings, opt, lambda step: 1.0)
    engine.fit(force=True)
    return f"3 steps, loss {engine._epoch_sums['loss'] / max(engine._epoch_steps, 1):.3f}"


# -- the JPEG decoders ----------------------------------------------------------------------------

def _cmyk_jpeg() -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    im = Image.fromarray((np.random.default_rng(0).random((48, 40, 3))
                          * 255).astype(np.uint8)).convert("CMYK")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def check_decode(toy: Path, device: torch.device, count: int = 16) -> str:
    """The device decoder against the CPU one, pixel for pixel."""
    from mixup_transfer.core.data import decode_uint8, read_bytes
    from pretrain.data import decode_jpegs

    files = sorted((toy / "imagenet" / "train").rglob("*.JPEG"))[:count]
    datas = [read_bytes(f) for f in files] + [_cmyk_jpeg()]
    on_device = decode_jpegs(datas, device)
    worst = 0
    for k, (data, img) in enumerate(zip(datas, on_device)):
        ref = decode_uint8(data, f"image {k}")
        if tuple(img.shape) != tuple(ref.shape):
            raise AssertionError(f"image {k}: device shape {tuple(img.shape)} != CPU shape "
                                 f"{tuple(ref.shape)}")
        worst = max(worst, int((img.cpu().int() - ref.int()).abs().max()))
    if worst:
        raise AssertionError(f"{len(datas)} images: largest pixel difference {worst} (nvJPEG vs "
                             "libjpeg-turbo)")
    return f"{len(datas)} images (1 CMYK) identical to the CPU decoder"


# -- the downstream stages ------------------------------------------------------------------------

def check_detection(kind: str, toy: Path, device: torch.device, out: Path) -> str:
    from transfer.detection.config import load_det_config
    from transfer.detection.stage import finetune_detector

    overrides = [f"data.root={toy / 'VOCdevkit'}", "data.max_train=32", "data.max_val=16",
                 "optim.epochs=1", "optim.batch_per_process=8", "optim.warmup_iters=2",
                 "eval.batch_size=8", f"runtime.device={device}",
                 f"runtime.precision={'bf16' if device.type == 'cuda' else 'fp32'}"]
    cfg = load_det_config(ROOT / "configs" / "detection" / f"toy_{kind}_voc.yaml", overrides)
    m = finetune_detector(cfg, None, out / f"detection_{kind}")
    return (f"mAP {m['mAP']:.2f}, train {m['train_img_per_s']:.0f} img/s, "
            f"test {m['test_img_per_s']:.0f} img/s")


def check_wsol(toy: Path, device: torch.device, out: Path) -> str:
    from mixup_transfer.core.config import load_config
    from wsol.finetune import run

    overrides = [f"data.image_root={toy / 'CUB_200_2011' / 'images'}",
                 f"data.metadata_root={toy / 'wsol_metadata' / 'CUB'}", "data.num_workers=0",
                 "data.max_train=32", "data.max_val=16", "optim.epochs=1",
                 "optim.batch_per_process=8", "eval.every_epochs=0",
                 "eval.cam_curve_interval=0.01", f"runtime.device={device}",
                 f"runtime.precision={'bf16' if device.type == 'cuda' else 'fp32'}"]
    cfg = load_config(str(ROOT / "configs" / "wsol" / "toy_multimix.yaml"), overrides)
    m = run(cfg, {"weights": None}, out / "wsol", resume=False, force=True)
    return f"MaxBoxAccV2 {m['maxboxacc_v2']:.2f}, top-1 loc {m['top1_loc']:.2f}"


def check_robustness(toy: Path, device: torch.device, out: Path) -> str:
    from mixup_transfer.core.checkpoint import build_resnet, save_backbone
    from transfer.robustness.stage import run

    classes = len([d for d in (toy / "imagenet" / "train").iterdir() if d.is_dir()])
    torch.manual_seed(0)
    ckpt = out / "robustness_backbone.pth"
    save_backbone(ckpt, build_resnet("resnet18", num_classes=classes),
                  {"arch": "resnet18", "num_classes": classes, "method": "erm", "epochs": 0,
                   "config": "", "metrics": {}})
    cfg = {"suites": "clean,calibration,fgsm,pgd", "data": {"max_val": 16, "num_workers": 0},
           "image_size": 64, "resize": 72, "eval": {"batch_size": 8}, "pgd_iters": 2,
           "ood_noise": "", "runtime": {"device": str(device),
                       "precision": "bf16" if device.type == "cuda" else "fp32"}}
    m = run(cfg, {"checkpoint": str(ckpt), "imagenet": str(toy / "imagenet")}, out / "robustness")
    err = {k: m[k]["top1_err"] for k in ("clean", "fgsm", "pgd")}
    return (f"{m['n_images']} images: top-1 error clean {err['clean']:.1f}, FGSM "
            f"{err['fgsm']:.1f}, PGD {err['pgd']:.1f}; ECE {m['calibration']['ece']:.3f}")


# -- NCCL -----------------------------------------------------------------------------------------

def nccl_probe() -> None:
    """Inside torchrun: a NCCL group of this one process, one all_reduce, then destroy (exits
    non-zero on error)."""
    rank, world, _ = rt.init_distributed("nccl")
    x = torch.ones(4, device=rt.get_device("auto"))
    torch.distributed.all_reduce(x)
    if x.tolist() != [float(world)] * 4:
        raise RuntimeError(f"all_reduce of ones over {world} process(es) gave {x.tolist()}")
    rt.cleanup_distributed()
    print(f"nccl ok: rank {rank} of {world}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")


def check_nccl(timeout: float = 120) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "tools" / "gpu_check.py"), "--nccl-probe"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    if p.returncode != 0 or not any(ln.startswith("nccl ok") for ln in lines):
        raise RuntimeError(f"torchrun exited {p.returncode}: "
                           f"{lines[-1] if lines else 'no output'}")
    return next(ln for ln in lines if ln.startswith("nccl ok"))


# -- throughput -----------------------------------------------------------------------------------

def throughput(device: torch.device, methods=None, arch: str = "resnet50", size: int = 224,
               steps: int = 10, precision: str = "bf16") -> list[dict]:
    """Each method of `pretrain.bench.FULL` (or `methods`) at its recipe's per-GPU batch
    (`PAPER_BATCH`), timed beside ERM at the same batch: [{"method", "batch", "img_per_s",
    "step_time_ratio", "peak_memory_gib"}]."""
    from pretrain.bench import FULL, run_gpu_bench

    rows = []
    for label, _, _ in FULL:
        if label == "erm" or (methods is not None and label not in methods):
            continue
        batch = PAPER_BATCH.get(label, 64)
        out = run_gpu_bench(device=str(device), arch=arch, size=size, batch=batch, warmup=3,
                            steps=steps, methods=[label], precision=precision)
        have_erm = any(r["method"] == "erm" and r["batch"] == batch for r in rows)
        for r in out["rows"]:  # ERM once per batch size, then the method
            if r["method"] == label or not have_erm:
                rows.append({"method": r["method"], "batch": batch, "img_per_s": r["img_per_s"],
                             "step_time_ratio": r["step_time_ratio"],
                             "peak_memory_gib": r["peak_memory_gib"]})
    return rows


# -- all of it ------------------------------------------------------------------------------------

CHECKS = ("methods", "decode", "detection", "wsol", "robustness", "nccl", "throughput")


def run_checks(out: str | os.PathLike, device: str = "cuda", only=CHECKS, methods=None,
               precisions=("bf16", "fp16"), toy: str | os.PathLike | None = None) -> dict:
    """Run the checks named in `only` on `device` into `out` -> {"rows": [...], "throughput":
    [...], "device"}.
    toy: an existing toy world (default: a fresh tiny one in a temporary folder)."""
    out, dev = Path(out), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    if toy is None:
        from mixup_transfer.toyworld import make_toy_world
        from wsol.data import cub_to_wsol_metadata

        toy = Path(tempfile.mkdtemp(prefix="gpu_check_toy_"))
        make_toy_world(toy, preset="tiny", seed=0, wsol_metadata=cub_to_wsol_metadata)
    toy = Path(toy)
    rows = []
    if "methods" in only:
        for name, knobs in METHOD_CASES:
            if methods is None or name in methods:
                rows += [_timed(f"{name} {p}", check_method, name, knobs, p, dev, out / "methods")
                         for p in precisions]
    single = {"decode": (check_decode, toy, dev), "wsol": (check_wsol, toy, dev, out),
              "robustness": (check_robustness, toy, dev, out), "nccl": (check_nccl,)}
    for check in ("decode", "detection", "wsol", "robustness", "nccl"):
        if check in only and check == "detection":
            rows += [_timed(f"detection {k}", check_detection, k, toy, dev, out)
                     for k in ("ssd", "frcnn")]
        elif check in only:
            rows.append(_timed(check, *single[check]))
    report = {"device": _device_name(dev), "torch": torch.__version__, "rows": rows,
              "throughput": []}
    if "throughput" in only:
        t0 = time.perf_counter()
        try:
            report["throughput"] = throughput(dev, methods)
            rows.append(_row("throughput", True, time.perf_counter() - t0,
                             f"{len(report['throughput'])} rows"))
        except Exception as e:  # noqa: BLE001
            rows.append(_row("throughput", False, time.perf_counter() - t0,
                             str(e).splitlines()[-1][:300]))
    write_report(report, out)
    return report


def _device_name(dev: torch.device) -> str:
    if dev.type != "cuda":
        return str(dev)
    p = torch.cuda.get_device_properties(dev)
    cudnn = torch.backends.cudnn.version()
    return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, cuDNN {cudnn})"


def to_markdown(report: dict) -> str:
    ok = sum(r["ok"] for r in report["rows"])
    lines = [f"# gpu-check: {ok} of {len(report['rows'])} passed", "",
             f"Device: {report['device']}; torch {report['torch']}", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {'pass' if r['ok'] else 'FAIL'} | {r['seconds']} | "
              f"{r['detail']} |"
              for r in report["rows"]]
    if report["throughput"]:
        lines += ["", "ResNet-50, 224 px, bf16, channels_last; each method timed beside ERM at "
                  "its recipe's "
                  "per-GPU batch", "", "| method | batch | images/s | step time / ERM | peak "
                                       "memory (GiB) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['batch']} | {r['img_per_s']} | "
                  f"{r['step_time_ratio']:.3f} | "
                  f"{r['peak_memory_gib']} |" for r in report["throughput"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """gpu_check.json and gpu_check.md in `out`, written atomically."""
    rt.write_json(report, out / "gpu_check.json")
    rt.atomic_write_text(to_markdown(report), out / "gpu_check.md")
