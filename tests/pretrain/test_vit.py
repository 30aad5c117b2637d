"""Vision Transformers: the checkpoint contract (timm's keys), the stage interface (groups of
blocks, the class-token embedding, the patch tokens as dense features), MultiMix and Dense MultiMix
on a ViT by hand, TransMix against the official code (tests/fixtures/transmix_official.npz), a
pretraining run and the robustness stage on the toy ViT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixup_transfer.core.checkpoint import (
    CheckpointError,
    build_resnet,
    classifier_from_checkpoint,
    expected_shapes,
    infer_arch,
    load_backbone,
    resnet_from_checkpoint,
    save_backbone,
)
from mixup_transfer.core.vits import build_vit
from pretrain import mixers
from pretrain.adapters import adapt, cls_attention
from pretrain.methods import ViTStages, build_method
from pretrain.methods import transmix as tm
from pretrain.methods.base import dirichlet_weights

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
C = 5

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _toy(seed: int = 0, classes: int = C):
    torch.manual_seed(seed)
    return build_vit("vit_tiny_toy", classes).eval()


def _save(path, net, arch="vit_tiny_toy"):
    save_backbone(path, net, {"arch": arch, "method": "erm", "epochs": 0, "config": "",
                              "metrics": {}})
    return path


# -------------------------------------------------------------------------------------------
# checkpoint contract

def test_vit_checkpoint_round_trip_keeps_timms_keys_and_the_logits(tmp_path):
    net = _toy()
    path = _save(tmp_path / "vit.pth", net)
    raw = torch.load(path, weights_only=True)
    assert list(raw["model"]) == list(net.state_dict())  # timm's keys, head included
    assert raw["meta"]["num_classes"] == C and raw["meta"]["arch"] == "vit_tiny_toy"
    backbone = load_backbone(path, None)  # arch from meta
    assert (
        "head.weight" not in backbone
        and "cls_token" in backbone
        and "blocks.3.mlp.fc2.weight" in backbone
    )
    model, meta = classifier_from_checkpoint(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), net(x))
    assert meta["arch"] == "vit_tiny_toy"
    # a timm state dict with no meta, under DataParallel's prefix: the arch is read from the keys
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "bare.pth")
    assert infer_arch(load_backbone(tmp_path / "bare.pth", None)) == "vit_tiny_toy"


def test_vit_s16_is_timms_network():
    shapes = expected_shapes("vit_small_patch16_224")
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n + 384 * 1000 + 1000 == 22_050_664  # timm's vit_small_patch16_224 parameter count
    assert shapes["pos_embed"] == (1, 197, 384) and shapes["patch_embed.proj.weight"] == (
        384,
        3,
        16,
        16,
    )
    assert len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}) == 12


def test_wrong_or_mismatched_vit_layouts_are_refused(tmp_path):
    net = _toy()
    path = _save(tmp_path / "vit.pth", net)
    with pytest.raises(CheckpointError, match="does not fit timm vit_small_patch16_224") as e:
        load_backbone(path, "vit_small_patch16_224")  # 4 blocks of width 96 vs 12 of 384
    # blocks 4..11 (12 keys each) missing; the 4 blocks' 48 keys, cls_token, pos_embed, the patch
    # projection's 2 and the final norm's 2 mis-shaped
    assert ("missing keys: 96 ['blocks.10.attn.proj.bias'" in str(e.value)
            and "unexpected keys: 0 []" in str(e.value))
    assert ("mis-shaped keys: 54 ['blocks.0.attn.proj.bias: checkpoint (96,) vs "
            "vit_small_patch16_224 (384,)'" in str(e.value))
    # another layout
    renamed = {k.replace("attn.qkv", "attn.in_proj"): v for k, v in net.state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    layout = (r"missing keys: 8 \['blocks.0.attn.qkv.bias'.*\n"
              r"  unexpected keys: 8 \['blocks.0.attn.in_proj.bias'")
    with pytest.raises(CheckpointError, match=layout):
        load_backbone(tmp_path / "renamed.pth", None)
    shallow = {k: v for k, v in net.state_dict().items() if not k.startswith("blocks.3.")}
    torch.save(shallow, tmp_path / "shallow.pth")
    with pytest.raises(CheckpointError, match="cannot infer the ViT architecture .* 3 blocks"):
        load_backbone(tmp_path / "shallow.pth", None)
    with pytest.raises(CheckpointError, match="holds a Vision Transformer"):
        resnet_from_checkpoint(path)
    torch.save(build_resnet("resnet18", C).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="does not fit timm vit_tiny_toy"):
        load_backbone(tmp_path / "r18.pth", "vit_tiny_toy")
    with pytest.raises(CheckpointError, match="head.weight has 5 classes"):
        classifier_from_checkpoint(path, num_classes=7)


# ------------------------------------------------------------------------------------------- stage
# interface

def test_the_vit_adapter_splits_blocks_and_reads_the_class_token():
    net = _toy()
    vit = adapt(net)
    assert vit.num_stages == 4 and vit.fc is net.head
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        tokens = net.forward_features(x)
        assert torch.equal(vit.features(x), tokens)
        assert torch.equal(vit.pool(tokens), tokens[:, 0])  # the class token after the final norm
        h2 = vit.forward_to(x, 2)  # after blocks 0 and 1
        by_hand = net.blocks[1](net.blocks[0](net._pos_embed(net.patch_embed(x))))
        assert torch.equal(h2, by_hand)
        assert torch.allclose(vit.forward_from(h2, 2), tokens, atol=1e-6)
        dense = vit.dense_map(tokens)  # [b, d, 8, 8]: patch (i, j) is token 1 + 8 i + j
        assert dense.shape == (3, 96, 8, 8) and torch.equal(dense[:, :, 2, 5],
                                                            tokens[:, 1 + 8 * 2 + 5])
        logits = vit.dense_logits(dense)
        assert torch.allclose(logits[:, :, 21], net.head(tokens[:, 22]), atol=1e-6)


def test_a_copy_of_the_vit_adapter_runs_its_own_network():
    import copy

    vit = ViTStages("vit_tiny_toy", C)
    twin = copy.deepcopy(vit)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = vit(x)
        assert torch.equal(twin(x), before)
        twin.net.blocks[2].mlp.fc2.weight.add_(1.0)  # a stage in the middle: the copy's own block
        twin.net.norm.weight.mul_(2.0)
        assert torch.equal(vit(x), before) and not torch.allclose(twin(x), before)


def test_cls_attention_is_the_attention_timm_applies():
    """The class row of softmax(q k^T / sqrt(d_h)), averaged over heads: with it and v, timm's
    Attention output for the class token is reproduced."""
    net = _toy()
    attn = net.blocks[-1].attn
    x = torch.randn(2, 65, 96)
    with torch.no_grad():
        # every column, the class token's own included
        a_all = torch.stack([cls_attention(attn, x, prefix=0)])[0]
        qkv = attn.qkv(x).view(2, 65, 3, 3, 32).permute(2, 0, 3, 1, 4)
        full = ((qkv[0] @ qkv[1].transpose(-2, -1)) / 32 ** 0.5).softmax(-1)  # [b, heads, T, T]
        assert torch.allclose(a_all, full[:, :, 0].mean(1), atol=1e-6)
        out = (full @ qkv[2]).transpose(1, 2).reshape(2, 65, 96)
        assert torch.allclose(attn(x)[:, 0], attn.proj(out)[:, 0], atol=1e-5)
        assert torch.allclose(cls_attention(attn, x), full[:, :, 0, 1:].mean(1), atol=1e-6)
    vit = adapt(net)
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens, a = vit.features_and_attention(img)
        h = vit.forward_to(img, 3)  # blocks 0..2
        assert torch.equal(tokens, vit.features(img))
        assert torch.allclose(a, cls_attention(attn, net.blocks[-1].norm1(h)), atol=1e-6)


# -------------------------------------------------------------------------------------------
# MultiMix on a ViT

def _draws(method, b, seed, sets=None):
    g = torch.Generator().manual_seed(seed)
    return dirichlet_weights(b, method.n, method.alpha_low, method.alpha_high, g, sets=sets)


def test_multimix_on_a_vit_mixes_the_class_token_embedding():
    """H(Y Lambda, softmax(g(Z Lambda))) with Z the class tokens after the final norm (the paper's
    embedding: the whole network but the classifier, MultiMix A.1)."""
    net = _toy()
    method = build_method("multimix", ViTStages("vit_tiny_toy", C), C, n=3, prob=1.0)
    method.model.net.load_state_dict(net.state_dict())
    method.generator = torch.Generator()
    x, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 2, 4, 2])
    method.seed(7)
    loss = method(x, labels)["loss"]
    lam = _draws(method, 4, 7)  # [b, n]
    with torch.no_grad():
        z = net.forward_head(net.forward_features((x - method.model.mean) / method.model.std),
                             pre_logits=True)
        mixed = net.head(lam.t() @ z)  # the n mixed embeddings through the classifier
        y = F.one_hot(labels, C).float()
        want = -((lam.t() @ y) * F.log_softmax(mixed, -1)).sum(-1).mean()
    assert torch.allclose(loss.detach(), want, atol=1e-5), (loss, want)


def test_dense_multimix_on_a_vit_interpolates_the_patch_tokens():
    """Eqs. (9)-(14) position by position on the patch tokens after the final norm: GAP attention
    with ReLU and l1, Mhat = diag(a) Lambda normalised per column, mixed tokens and targets, the
    s-weighted loss."""
    net = _toy()
    method = build_method("dense_multimix", ViTStages("vit_tiny_toy", C), C, n=2, prob=1.0)
    method.model.net.load_state_dict(net.state_dict())
    method.generator = torch.Generator()
    x, labels = torch.rand(3, 3, 32, 32), torch.tensor([1, 0, 1])  # 4 x 4 patches
    method.seed(3)
    loss = method(x, labels)["loss"]
    lam = _draws(method, 3, 3, sets=16)  # [r, b, n]
    with torch.no_grad():
        z = net.forward_features((x - method.model.mean) / method.model.std)[:, 1:]  # [b, r, d]
        y = F.one_hot(labels, C).float()
        total = 0.0
        for j in range(16):
            u = z.mean(1)  # GAP of each example's patch tokens [b, d]
            s_all = torch.relu((z * u[:, None]).sum(-1))  # [b, r]
            a = s_all[:, j] / s_all.sum(1)
            m = a[:, None] * lam[j]  # [b, n]
            s = m.sum(0)
            mhat = m / s
            p = F.log_softmax(net.head(mhat.t() @ z[:, j]), -1)  # [n, c]
            h = -((mhat.t() @ y) * p).sum(-1)
            total += (h * s).sum() / s.sum()
    assert torch.allclose(loss.detach(), total / 16, atol=1e-5), (loss, total / 16)


# -------------------------------------------------------------------------------------------
# TransMix

class _Draws:
    """A host generator that returns the official code's recorded draws, in order (rand -> random,
    beta, randint -> integers), checking that they are asked for in the official order."""

    def __init__(self, names, values):
        self.queue = list(zip(names, values))

    def _next(self, name):
        got, value = self.queue.pop(0)
        assert got == name, (got, name)
        return value

    def random(self):
        return self._next("rand")

    def beta(self, a, b):
        return self._next("beta")

    def integers(self, n):
        return int(self._next("randint"))


class _AttentionStub(torch.nn.Module):
    """The stage interface with a fixed class-token attention; records the images it is given."""

    def __init__(self, attn):
        super().__init__()
        self.attn, self.seen = attn, []
        self.fc = torch.nn.Linear(2, C)

    def features(self, x):
        self.seen.append(x)
        return x.flatten(1)[:, :2]

    def features_and_attention(self, x):
        return self.features(x), self.attn

    forward_to = forward_from = dense_logits = None

    def pool(self, f):
        return f


@pytest.mark.parametrize("k", range(18))
def test_transmix_equals_the_official_code(k, monkeypatch):
    """Beckschen/TransMix @ 0e4d31e (Mixup_transmix over timm 0.5.4): the images, the box and the
    targets of every recorded case, the method fed the official draws."""
    d = np.load(FIXTURES / "transmix_official.npz")
    b, size, side, prob = d["cases"][k]
    x, y = torch.from_numpy(d[f"pixels_{k}"]).float() / 255, torch.from_numpy(d[f"y_{k}"])
    stub = _AttentionStub(torch.from_numpy(d[f"attn_{k}"]))
    method = build_method("transmix", stub, 10, prob=float(prob))
    method.host_rng = _Draws(d[f"draw_names_{k}"].tolist(), d[f"draws_{k}"].tolist())
    seen = {}
    monkeypatch.setattr(tm, "soft_cross_entropy",
                        lambda logits, t: seen.setdefault("targets", t).sum())
    method(x, y)
    assert method.host_rng.queue == []
    assert torch.allclose(stub.seen[0], torch.from_numpy(d[f"mixed_{k}"]), atol=1e-6)
    assert torch.allclose(seen["targets"], torch.from_numpy(d[f"targets_{k}"]), atol=1e-6)
    box = d[f"box_{k}"]
    if box[0] >= 0:
        names, values = d[f"draw_names_{k}"].tolist(), d[f"draws_{k}"].tolist()
        got, _ = tm.transmix_box(int(size), int(size), values[2], (int(values[3]), int(values[4])))
        assert got == tuple(int(v) for v in box) and names[-2:] == ["randint", "randint"]


def test_transmix_label_by_hand():
    """8 x 8 image, 2 x 2 patches, box rows 0..4 and columns 0..4 = the top-left patch: area 1/4;
    attention [0.1, 0.2, 0.3, 0.4] puts 0.1 of 1.0 there, so lam' = (1/4 + 1/10) / 2 = 0.175."""
    box, area = tm.transmix_box(8, 8, 0.75, (2, 2))
    assert box == (0, 4, 0, 4) and area == 0.25
    mask = tm.patch_box_mask(8, 8, box, 2)
    assert mask.tolist() == [1, 0, 0, 0]
    lam = tm.transmix_lam(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.from_numpy(mask), area)
    assert torch.allclose(lam, torch.tensor([0.175]))
    y = mixers.smooth_one_hot(torch.tensor([0, 1]), 2, 0.0)
    assert torch.allclose(
        tm.transmix_targets(y, torch.tensor([0.175, 0.5])),
        torch.tensor([[0.825, 0.175], [0.5, 0.5]]),
    )
    # 50 px, 7 patches: nearest rows floor(i * 50 / 7) = 0, 7, 14, 21, 28, 35, 42
    assert tm.patch_box_mask(50, 50, (7, 15, 0, 50),
                             7).reshape(7, 7)[:, 0].tolist() == [0, 1, 1, 0, 0, 0, 0]


def test_transmix_refuses_a_network_without_class_attention():
    with pytest.raises(ValueError, match="class-token attention of a Vision Transformer"):
        build_method("transmix", build_resnet("resnet18", C), C)
    # and AlignMix a network without a feature map
    for name in ("alignmix", "alignmix_stage2", "alignmix_ae"):
        with pytest.raises(ValueError, match="a ViT's last stage gives tokens"):
            build_method(name, ViTStages("vit_tiny_toy", C), C)


VIT_METHODS = ["erm", "input_mixup", "manifold_mixup", "cutmix", "puzzlemix", "multimix",
               "dense_multimix", "multi_interp", "zeta_mixup", "transmix", "tokenmix", "comixup",
               "saliencymix", "supermix"]
# knobs of the one-step case: TokenMix's token grid is the toy ViT's (8 px patches at 32 px),
# without a teacher
VIT_KNOBS = {"multimix": {"n": 20, "prob": 1.0}, "dense_multimix": {"n": 20, "prob": 1.0},
             "tokenmix": {"labels": "area", "patch_size": 8, "minimum_tokens": 1},
             "comixup": {"solver": "swap"}, "saliencymix": {"prob": 1.0},
             "supermix": {"max_iter": 2, "mask_w": 4}}


def test_the_cases_cover_every_method_but_alignmix():
    from pretrain.methods import METHODS

    assert set(VIT_METHODS) == {n for n in METHODS if not n.startswith("alignmix")}


@pytest.mark.parametrize("name", VIT_METHODS)
def test_every_method_steps_on_the_toy_vit(name):
    """One step of each method on the toy ViT at 32 px: finite non-zero gradients at both ends (the
    patch embedding, the last block) and, with the same draws, a lower loss after the step."""
    torch.manual_seed(0)
    m = build_method(name, ViTStages("vit_tiny_toy", C), C, **VIT_KNOBS.get(name, {}))
    if m.needs_teacher:  # SuperMix: a frozen toy ViT as its teacher
        m.teacher = ViTStages("vit_tiny_toy", C)
    m.generator = torch.Generator()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])
    losses = []
    for step in range(2):
        m.seed(3)
        loss = sum(v for k, v in m(images, labels).items() if k.startswith("loss"))
        losses.append(float(loss))
        if step == 0:
            opt.zero_grad()
            loss.backward()
            for p in (m.model.net.patch_embed.proj.weight, m.model.net.blocks[-1].mlp.fc2.weight):
                assert (
                    p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                )
            opt.step()
    assert losses[1] < losses[0], losses


# -------------------------------------------------------------------------------------------
# stages end to end

@pytest.mark.slow
def test_a_pretraining_step_of_erm_on_the_toy_vit_and_robustness_on_it(toy_world, tmp_path):
    """One epoch of ERM (AdamW) on the toy ViT; its backbone.pth loads back into timm's network and
    the robustness stage evaluates it (clean accuracy equals the network's own predictions)."""
    from pretrain.task import run
    from transfer.robustness import evaluate_checkpoint

    cfg = {"name": "vit", "seed": 0,
           "data": {"root": str(toy_world / "imagenet"), "crop_size": 32, "val_resize": 36,
                    "num_workers": 0, "max_train": 16, "max_val": 8},
           "model": {"arch": "vit_tiny_toy"}, "method": {"name": "erm"},
           "optim": {"batch_size": 8, "epochs": 1, "lr": 1e-3, "optimizer": "adamw",
                     "weight_decay": 0.05},
           "runtime": {"precision": "fp32", "flops": False, "figures": False}}
    run(cfg, {}, tmp_path / "run")
    ckpt = tmp_path / "run" / "backbone.pth"
    state = torch.load(ckpt, weights_only=True)
    assert state["meta"]["arch"] == "vit_tiny_toy" and "head.weight" in state["model"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log)
    m = evaluate_checkpoint(ckpt, toy_world / "imagenet", ("clean", "background", "fgsm"),
                            tmp_path / "rob", limit=6, image_size=32, resize=36, batch_size=3,
                            fgsm_eps=0.0)
    assert m["n_images"] == 6 and m["arch"] == "vit_tiny_toy"
    assert m["fgsm"]["top1_err"] == m["clean"]["top1_err"]  # a zero budget changes nothing
    assert 0.0 <= m["background"]["clean_loc"] <= 100.0  # CAMs from the patch tokens
    from transfer.robustness.embedding import embedding_layer
    from transfer.robustness.model import load_classifier_model

    model, meta = load_classifier_model(ckpt, num_classes=state["meta"]["num_classes"])
    assert (
        embedding_layer(model) is model.model.head and model.fc_weight is model.model.head.weight
    )
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = model.features_logits(x)
        assert feats.shape == (2, 96, 4, 4) and torch.allclose(logits, model(x), atol=1e-6)


# -------------------------------------------------------------------------------------------
# pipeline and ablation

def _pipeline_cfg(name: str, **extra) -> dict:
    import yaml

    root = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((root / "configs" / "pipeline" / name).read_text())
    cfg["pretrain"]["config"] = str(root / cfg["pretrain"]["config"])
    cfg.update(extra)
    return cfg


def test_the_vit_pipeline_plans_pretraining_and_robustness_of_each_method_by_name():
    from mixup_transfer.pipeline.run import Pipeline

    plan = Pipeline(_pipeline_cfg("toy_vit.yaml")).plan()
    methods = ["erm", "multimix", "dense_multimix", "transmix"]
    assert [s.label for s in plan] == [f"{m}/{s}" for m in methods
                                       for s in ("pretrain", "robustness")]
    st = {s.label: s for s in plan}
    for m in methods:
        cfg = st[f"{m}/pretrain"].spec["config"]
        assert cfg["model"]["arch"] == "vit_tiny_toy" and cfg["method"]["name"] == m
        assert cfg["optim"]["optimizer"] == "adamw"


def test_the_resnet_pipeline_takes_transmix_by_name_and_refuses_its_vit_downstream():
    from mixup_transfer.core.config import ConfigError
    from mixup_transfer.pipeline.run import Pipeline

    with pytest.raises(ConfigError, match="'transmix' pretrains a Vision Transformer "
                                          ".*configs/pipeline/toy_vit.yaml"):
        # configs/pretrain/toy_transmix.yaml is found
        Pipeline(_pipeline_cfg("toy.yaml"), methods=["transmix"])
    plan = Pipeline(_pipeline_cfg("toy.yaml", detection=[], wsol=None),
                    methods=["transmix"]).plan()
    assert [s.label for s in plan] == ["transmix/pretrain", "transmix/robustness"]
    assert plan[0].spec["config"]["model"]["arch"] == "vit_tiny_toy"


def test_the_ablation_runner_checks_a_vit_recipe_on_its_own_network(tmp_path):
    from mixup_transfer.pipeline.ablation import plan_lines

    root = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(f"name: vit_n\nout_root: {tmp_path}\ndata: {{root: {tmp_path}/toy}}\n"
                   f"base: {root}/configs/pretrain/toy_vit_transmix.yaml\nmethod: transmix\n"
                   "overrides: ['data.root={data}/imagenet']\n"
                   "knob: {key: method.switch_prob, values: [0.0, 1.0]}\nseeds: [0]\n")
    lines = plan_lines(str(cfg), [])
    assert sum("switch_prob=" in line for line in lines) == 2, lines
