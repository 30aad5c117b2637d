"""SuperMix against the official mask optimisation (tests/fixtures/supermix_official.npz, made by
tools/make_supermix_fixture.py from alldbi/SuperMix supermix.py:mix_batch), its pieces by hand, and
the teacher contract of the methods and the pretraining task."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pretrain.methods import ResNetStages, build_method
from pretrain.methods.supermix import (
    cyclic_sets,
    gaussian_kernel,
    mask_weights,
    optimise_masks,
    per_example_ce,
    set_targets,
    smooth,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "supermix_official.npz"


def fixture_teacher(f, k: int) -> nn.Sequential:
    """tools/make_supermix_fixture.py teacher() with the case's weights."""
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(24, 5))
    prefix = f"teacher_{k}/"
    net.load_state_dict({n[len(prefix):]: torch.from_numpy(f[n]) for n in f.files
                         if n.startswith(prefix)})
    return net.eval()


@pytest.mark.parametrize("k", range(6))
def test_masks_equal_the_official_mix_batch(k, one_thread):
    """Six cases (K = 2, 3; masks 4 and 8 px; sigma 0, 1, 2; an early stop by tol in three): the
    final mask weights of every example, and the mixed images and teacher logits of those the
    official code keeps."""
    f = np.load(FIXTURE)
    b, kk, mask_w, sigma, lambda_s, max_iter, tol, _alpha, _side = f["cases"][k]
    b, kk, mask_w, max_iter, tol = int(b), int(kk), int(mask_w), int(max_iter), int(tol)
    teacher, data = fixture_teacher(f, k), torch.from_numpy(f[f"data_{k}"])
    sets = cyclic_sets(b, kk)
    with torch.no_grad():
        labels = teacher(data).argmax(1)
    targets = set_targets(labels, sets, torch.from_numpy(f[f"lams_{k}"]), 5)
    mixed, weights, logits, ok = optimise_masks(teacher, data[sets], targets, mask_w, float(sigma),
                                                float(lambda_s), max_iter, tol)
    expect = mask_weights(torch.from_numpy(f[f"logits_{k}"]), data.shape[-2:])
    # weights in [0, 1]: steps of up to 2000 in the logits amplify float rounding (thread count,
    # BLAS) to ~3e-5 after six iterations of a case that never mixes; bitwise equal with the
    # fixture machine's threads
    assert torch.allclose(weights, expect, rtol=0, atol=1e-4)
    assert int(ok.sum()) == f[f"mixed_{k}"].shape[0]
    assert torch.allclose(weights[ok], torch.from_numpy(f[f"masks_{k}"]), rtol=1e-5, atol=1e-6)
    assert torch.allclose(mixed[ok], torch.from_numpy(f[f"mixed_{k}"]), rtol=1e-5, atol=1e-5)
    assert torch.allclose(logits[ok], torch.from_numpy(f[f"pred_{k}"]), rtol=1e-5, atol=1e-5)


def test_pieces_by_hand():
    # sigma 1: k = 5 taps at offsets -2..2 (times 5, over 5): exp(-x^2 / 2) normalised
    g = torch.exp(-torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]) ** 2 / 2)
    assert torch.allclose(gaussian_kernel(1.0), g / g.sum())
    # an impulse smoothed is the outer product of the kernel (zero padding, odd kernel centred)
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 1.0
    k = gaussian_kernel(1.0)
    assert torch.allclose(smooth(x, 1.0)[0, 0, 1:6, 1:6], torch.outer(k, k), atol=1e-7)
    assert torch.equal(smooth(x, 0.0), x)
    assert cyclic_sets(4, 3).tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]]
    y = set_targets(torch.tensor([2, 0, 2]), cyclic_sets(3, 2),
                    torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]]), 3)
    # set 2 = (2, 0): labels 2, 2
    assert torch.allclose(y, torch.tensor([[0.3, 0, 0.7], [0.4, 0, 0.6], [0, 0, 1.0]]))
    w = mask_weights(torch.zeros(2, 3, 1, 2, 2), (4, 4))
    # equal logits: equal weights summing to 1
    assert torch.allclose(w, torch.full((2, 3, 1, 4, 4), 1 / 3))
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(per_example_ce(logits, torch.tensor([0, 1])),
                          torch.tensor([np.log(1 + np.exp(-2.0)), np.log(2.0)],
                                       dtype=torch.float32))


def test_the_method_trains_on_the_mixed_examples_with_the_teachers_labels(one_thread):
    torch.manual_seed(0)
    method = build_method("supermix", ResNetStages("resnet18", 4), 4, max_iter=2, mask_w=4)
    with pytest.raises(RuntimeError, match="teacher"):
        method(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    method.teacher = ResNetStages("resnet18", 4)
    assert method.teacher.training is False and not any(p.requires_grad
                                                        for p in method.teacher.parameters())
    # never part of the trained model
    assert not any(k.startswith("teacher") for k in method.state_dict())
    method.train()
    assert method.teacher.training is False
    method.seed(3)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = method(images, labels)
    method.seed(3)
    mixed, teacher_labels, ok = method.mix(images)
    assert torch.equal(teacher_labels, method.teacher(mixed).argmax(1))
    clean = torch.nn.functional.cross_entropy(method.model(images), labels)
    assert torch.allclose(out["loss"], 2.0 * clean)  # cls_weight 2 (train_student.py -r default)
    per = per_example_ce(method.model(mixed), teacher_labels)
    expect = 2.0 * (per * ok).sum() / max(int(ok.sum()), 1)
    assert torch.allclose(out["loss_mixed"], expect)


# ----------------------------------------------------------------------------------------------
# the task's teacher
def tiny_cfg(root, method: dict, teacher=None) -> dict:
    return {"name": "t", "seed": 0, "teacher": teacher,
            "data": {"root": str(root), "crop_size": 32, "val_resize": 36, "num_workers": 0,
                     "max_train": 8, "max_val": 4},
            "model": {"arch": "resnet18"}, "method": method,
            "optim": {"batch_size": 4, "epochs": 1},
            "runtime": {"precision": "fp32", "flops": False, "figures": False}}


def write_teacher(path, num_classes: int, arch: str = "resnet18"):
    from mixup_transfer.core.checkpoint import save_backbone

    torch.manual_seed(7)
    net = ResNetStages(arch, num_classes)
    save_backbone(path, net.net, {"arch": arch, "num_classes": num_classes})
    return net


def test_the_task_refuses_a_missing_or_unused_teacher(toy_world):
    from mixup_transfer.core.config import ConfigError
    from pretrain.task import resolve_config

    root = toy_world / "imagenet"
    with pytest.raises(ConfigError, match=r"^teacher: method 'supermix' needs a teacher"):
        resolve_config(tiny_cfg(root, {"name": "supermix"}))
    with pytest.raises(ConfigError, match=r"^teacher: method 'erm' does not use a teacher"):
        resolve_config(tiny_cfg(root, {"name": "erm"}, "t.pth"))
    assert resolve_config(tiny_cfg(root, {"name": "supermix"}, "t.pth"))["teacher"] == "t.pth"


def test_the_stage_input_sets_the_teacher_key(tmp_path):
    from mixup_transfer.core.config import ConfigError
    from pretrain.stage import STAGE
    from pretrain.task import with_inputs

    assert STAGE.optional_inputs == ("teacher",)
    assert with_inputs({"teacher": None}, {"teacher": "a/t.pth"}) == {"teacher": "a/t.pth"}
    assert with_inputs({"teacher": "a/t.pth"}, {"teacher": None}) == {"teacher": "a/t.pth"}
    assert with_inputs({"teacher": "a/../a/t.pth"}, {"teacher": "a/t.pth"})["teacher"] == "a/t.pth"
    with pytest.raises(ConfigError, match="^teacher: the config names"):
        with_inputs({"teacher": "b.pth"}, {"teacher": "a.pth"})
    with pytest.raises(ValueError, match="only the optional input 'teacher'"):
        with_inputs({"teacher": None}, {"weights": "w.pth"})


def test_the_task_loads_the_teacher_frozen(toy_world, tmp_path, one_thread):
    from mixup_transfer.core.config import ConfigError
    from pretrain.task import build

    root = toy_world / "imagenet"
    task, _ = build(tiny_cfg(root, {"name": "erm"}), tmp_path / "probe")
    reference = write_teacher(tmp_path / "teacher.pth", task.num_classes)
    task, _ = build(tiny_cfg(root, {"name": "supermix", "max_iter": 1},
                             str(tmp_path / "teacher.pth")),
                    tmp_path / "run")
    teacher = task.model.teacher
    assert teacher.training is False and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(teacher(x), reference.eval()(x))
    assert not any(k.startswith("teacher") for k in task.model.state_dict())
    write_teacher(tmp_path / "wrong.pth", task.num_classes + 1)
    with pytest.raises(ConfigError, match="^teacher: .*classes"):
        build(tiny_cfg(root, {"name": "supermix"}, str(tmp_path / "wrong.pth")), tmp_path / "run2")
