"""The library API as a user calls it: the snippets of docs/library.md run as written, a plain
torchvision ResNet and a non-ResNet network train with every method, and the library and the
toolkit's trainer (pretrain.task's PretrainTask, what tools/run_pretrain.py runs) give identical
losses and gradients on the same draws."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from mixup_transfer.core.constants import IMAGENET_MEAN, IMAGENET_STD
from mixup_transfer.core.vits import build_vit
from pretrain import mixers as M
from pretrain.adapters import Backbone, adapt, from_sequential
from pretrain.data import sample_seed
from pretrain.methods import METHODS, build_method
from pretrain.task import build

DOC = Path(__file__).resolve().parents[2] / "docs" / "library.md"
C = 10


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_the_snippets():
    assert len(snippets()) == 4
    assert "torchvision.models.resnet18(num_classes=10)" in snippets()[0]


def test_the_readme_shows_two_snippets_exactly():
    readme = (DOC.parents[1] / "README.md").read_text()
    for i in (0, 2):  # a torchvision ResNet-18; a network that is not a ResNet
        assert "```python\n" + snippets()[i] + "```" in readme


@pytest.mark.parametrize("i", range(4))
def test_doc_snippet_runs_as_written(i, one_thread):
    code = snippets()[i]
    if "import timm" in code:
        pytest.importorskip("timm")
    scope: dict = {}
    exec(compile(code, f"{DOC.name} snippet {i + 1}", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["loss"].requires_grad


# every registered method, with knobs that fit a 32 px input (as tests/pretrain/test_sync_free.py's
# cases)
CASES = [
    ("erm", {}), ("input_mixup", {}), ("manifold_mixup", {}), ("cutmix", {}),
    ("puzzlemix", {"solver": "swap"}), ("multimix", {"n": 20}),
    ("multimix", {"n": 8, "layer": 2, "dense_loss": True}), ("dense_multimix", {"n": 20}),
    ("multi_interp", {"k": 2, "puzzle": {"solver": "swap"}}),
    ("multi_interp", {"base": "input", "k": 3}), ("multi_interp", {"base": "manifold", "k": 3}),
    ("multi_interp", {"base": "cutmix", "k": 3}), ("alignmix", {}),
    ("alignmix_stage2", {"resolution": 1}), ("alignmix_ae", {"resolution": 1, "decoder_size": 32}),
    ("zeta_mixup", {}), ("tokenmix", {"labels": "area", "patch_size": 8, "minimum_tokens": 1}),
    ("comixup", {"solver": "swap"}), ("transmix", {}), ("transmix", {"switch_prob": 1.0}),
    ("saliencymix", {"prob": 1.0}), ("supermix", {"max_iter": 2, "mask_w": 4}),
]
# methods that need a ViT (the class token's attention); the others a ResNet-18
ARCH = {"transmix": "vit_tiny_toy"}


def test_the_cases_cover_every_registered_method():
    assert {name for name, _ in CASES} == set(METHODS)


def tiny_cfg(root, name, knobs):
    return {"name": "lib", "seed": 3,
            "data": {"root": str(root), "crop_size": 32, "val_resize": 36, "num_workers": 0,
                     "max_train": 16, "max_val": 8},
            "model": {"arch": ARCH.get(name, "resnet18"), "num_classes": C},
            "method": {"name": name, **knobs}, "optim": {"batch_size": 4, "epochs": 1, "lr": 0.05},
            "runtime": {"precision": "fp32", "flops": False, "figures": False}}


def loss_and_grads(method, net, images, labels):
    out = method(images, labels)
    loss = sum(v for k, v in out.items() if k.startswith("loss"))
    grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad],
                                allow_unused=True)
    return loss.detach(), grads


@pytest.mark.parametrize("name,knobs", CASES,
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_library_and_trainer_give_identical_losses_and_gradients(toy_world, tmp_path, one_thread,
                                                                 name, knobs):
    """The trainer's method (built by pretrain.task on its ResNetStages, seeded by the task) and
    the same method built by a user on a plain torchvision.models.resnet18 (a plain timm ViT for
    TransMix) with the same weights, seeded by the same task code."""
    cfg = tiny_cfg(toy_world / "imagenet", name, knobs)
    # a teacher checkpoint through the task's contract (SuperMix)
    if METHODS[name].uses_teacher(knobs):
        from mixup_transfer.core.checkpoint import save_backbone

        save_backbone(tmp_path / "teacher.pth", torchvision.models.resnet18(num_classes=C),
                      {"arch": "resnet18"})
        cfg["teacher"] = str(tmp_path / "teacher.pth")
    task, _ = build(cfg, tmp_path)
    trainer = task.model
    net = build_vit(ARCH[name], C) if name in ARCH else torchvision.models.resnet18(num_classes=C)
    net.load_state_dict(task.net.net.state_dict())
    lib = build_method(name, adapt(net, mean=IMAGENET_MEAN, std=IMAGENET_STD), C, **knobs)
    # the method's own parts (AlignMix's head, AlignMix/AE's decoder)
    lib.load_state_dict(trainer.state_dict())
    lib.generator = torch.Generator()
    lib.teacher = trainer.teacher  # None unless the method needs one
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(4, 3, 32, 32, generator=g), torch.randint(C, (4,), generator=g)
    results = []
    for method, model in ((trainer, task.net.net), (lib, net)):
        task.model = method
        task.before_step(5)  # the trainer's seeding of the method's streams
        results.append(loss_and_grads(method, model, images, labels))
    (loss_t, grads_t), (loss_l, grads_l) = results
    assert torch.equal(loss_t, loss_l), (loss_t, loss_l)
    for a, b in zip(grads_t, grads_l):
        assert (a is None and b is None) or torch.equal(a, b)


def trainer_method(toy_world, tmp_path, name, knobs):
    task, _ = build(tiny_cfg(toy_world / "imagenet", name, knobs), tmp_path)
    return task, sample_seed(3 + 1, 0, 5)  # the seed task.before_step(5) gives the method (rank 0)


@pytest.mark.parametrize("name", ["input_mixup", "cutmix", "multi_interp_cutmix", "puzzlemix"])
def test_a_user_loop_with_the_mixers_equals_the_trainer(toy_world, tmp_path, one_thread, name):
    """A user's loop (mixer.apply on the draws, the model's logits, mixed_loss) against the
    trainer's method on the same draws, replayed from the trainer's seeded streams (host numpy
    stream: lam, box centre, grid; device torch stream: the partners)."""
    knobs = (
        {"base": "cutmix", "k": 3}
        if name == "multi_interp_cutmix"
        else {"solver": "swap"}
        if name == "puzzlemix"
        else {}
    )
    task, seed = trainer_method(toy_world, tmp_path,
                                "multi_interp" if name == "multi_interp_cutmix" else name, knobs)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(5, 3, 32, 32, generator=g), torch.randint(C, (5,), generator=g)
    model = task.net  # a Backbone: forward(x) -> logits
    task.before_step(5)
    loss_t = task.model(images, labels)["loss"]
    host, perm = (
        np.random.default_rng(seed),
        torch.randperm(5, generator=torch.Generator().manual_seed(seed)),
    )
    if name == "input_mixup":
        x, t = M.MixUp(1.0, C).apply(images, labels, M.Draw(perm, [host.beta(1.0, 1.0)]))
    elif name == "cutmix":
        host.random()  # the trainer's prob coin
        lam = host.beta(1.0, 1.0)
        x, t = M.CutMix(1.0, C).apply(images, labels,
                                      M.Draw(perm, [lam], (host.integers(32), host.integers(32))))
    elif name == "multi_interp_cutmix":
        lams = np.sort(host.beta(1.0, 1.0, 3)).tolist()
        draw = M.Draw(perm, lams, (int(host.integers(32)), int(host.integers(32))))
        x, t = M.MultiMixK(M.CutMix(1.0, C), 3).apply(images, labels, draw)
    else:
        from pretrain.methods.puzzlemix import _puzzle_saliency

        grids = M.puzzle_grid_options(32, 32, (2, 4, 8, 16))
        grid = grids[int(host.integers(len(grids)))]  # the trainer draws the grid, then lam
        lam = host.beta(1.0, 1.0)
        mixer = M.PuzzleMix(lambda x, y: _puzzle_saliency(task.model, x, y), 1.0, C, solver="swap",
                            fill=model.mean)
        x, t = mixer.apply(images, labels, M.Draw(perm, [lam], grid=grid))
    loss_l = M.mixed_loss(model(x), t)
    assert torch.equal(loss_t, loss_l), (loss_t, loss_l)


def test_adapters_split_where_asked_and_refuse_what_they_cannot_train():
    net = torchvision.models.resnet18(num_classes=C)
    bb = adapt(net)
    x = torch.rand(2, 3, 32, 32)
    net.eval()
    assert torch.equal(bb(x), net(x)) and bb.num_stages == 4
    assert list(bb.state_dict()) == ["net." + k for k in net.state_dict()]
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, C)).eval()
    sb = from_sequential(seq, [1, 2])
    assert torch.equal(sb.forward_to(x, 1),
                       seq[:2](x)) and torch.equal(sb.forward_from(seq[:2](x), 1), seq[:3](x))
    assert torch.allclose(sb(x), seq(x), atol=1e-6)
    with pytest.raises(ValueError, match="mixing point"):
        sb.forward_to(x, 3)
    with pytest.raises(TypeError, match="from_sequential"):
        build_method("multimix", seq, C)
    with pytest.raises(ValueError, match="outside the wrapped"):
        Backbone(seq, [seq[:3]], torch.nn.Linear(8, C))
    with pytest.raises(TypeError, match="nn.Linear"):
        Backbone(seq, [seq[:3]], seq[4])
