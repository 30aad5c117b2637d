"""mixup_transfer.core.engine on a tiny synthetic task (linear regression, no images): gradient
accumulation equals the full batch, per-group learning rates and schedules, exact resume, and
nothing non-finite is ever saved."""

import json
import math

import pytest
import torch
from torch import nn

from mixup_transfer.core.engine import (
    CKPT,
    Engine,
    LoopSettings,
    NonFiniteError,
    Task,
    build_optimizer,
)
from mixup_transfer.core.runtime import NonFiniteLossError
from mixup_transfer.core.schedule import lr_factor


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": ((self.head(torch.tanh(self.body(x))) - y) ** 2).mean(),
                "loss_zero": x.sum() * 0}


class RegressionTask(Task):
    """16 fixed examples; an epoch is 16 / batch steps, in a seeded order per epoch."""

    def __init__(self, batch=8, micro=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
        torch.manual_seed(seed)
        self.model = Regression()
        self.batch, self.micro = batch, micro
        self.steps_per_epoch = 16 // batch
        self.epochs_seen = []

    def batches(self, epoch, start_step):
        order = torch.randperm(16, generator=torch.Generator().manual_seed(epoch))[
            start_step * self.batch :
        ]
        for i in range(0, len(order), self.micro):
            idx = order[i:i + self.micro]
            yield self.x[idx], self.y[idx]

    def param_groups(self):
        return [{"params": list(self.model.body.parameters()), "lr": 0.1, "name": "body"},
                {"params": list(self.model.head.parameters()), "lr": 0.5, "name": "head"}]

    def end_of_epoch(self, engine, epoch, record):
        self.epochs_seen.append(epoch)
        return {"seen": len(self.epochs_seen)}

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state):
        self.epochs_seen = list(state["epochs_seen"])


def make(tmp_path, name="run", epochs=3, accumulate=1, micro=8, lr_lambda=None, **kw):
    task = RegressionTask(micro=micro)
    opt = build_optimizer("sgd", task.param_groups(), 0.1, momentum=0.9)
    settings = LoopSettings(total_steps=task.steps_per_epoch * epochs, device=torch.device("cpu"),
                            accumulate=accumulate, log_every=1, **kw)
    lam = lr_lambda or (lambda step: lr_factor(step, "step", milestones=[3], gamma=0.5))
    return task, Engine(task, tmp_path / name, settings, opt, lam)


def params(task):
    return {k: v.clone() for k, v in task.model.state_dict().items()}


def test_accumulated_micro_batches_equal_the_full_batch(tmp_path):
    t1, e1 = make(tmp_path, "full")
    t2, e2 = make(tmp_path, "acc", accumulate=2, micro=4)
    e1.fit()
    e2.fit()
    a, b = params(t1), params(t2)
    # the mean of equal-size micro-batch losses
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert e1.step == e2.step == 6


def test_group_learning_rates_follow_the_schedule(tmp_path):
    task, engine = make(tmp_path, epochs=3)
    assert engine.lrs() == [0.1, 0.5]
    engine.fit()
    assert engine.lrs() == [0.1 * 0.5, 0.5 * 0.5]  # step 6 >= milestone 3


def test_warmup_and_cosine_by_hand():
    assert lr_factor(0, "constant", warmup=10, warmup_start=0.1) == pytest.approx(0.1)
    assert lr_factor(5, "constant", warmup=10, warmup_start=0.1) == pytest.approx(0.55)
    assert lr_factor(10, "constant", warmup=10, warmup_start=0.1) == 1.0
    assert lr_factor(2.5, "cosine", total=10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, "linear")


def test_resume_is_exact_and_keeps_task_state(tmp_path):
    full_task, full = make(tmp_path, "full", epochs=4)
    full.fit()
    cut_task, cut = make(tmp_path, "cut", epochs=4, stop_after_steps=3)
    # mid-epoch: the checkpoint is the one after epoch 1
    assert cut.fit() == {"stopped_at_step": 3}
    state = torch.load(tmp_path / "cut" / CKPT, weights_only=True)
    assert state["step"] == 2 and state["task"] == {"epochs_seen": [1]}
    again_task, again = make(tmp_path, "cut", epochs=4)
    again.fit(resume=True)
    a, b = params(full_task), params(again_task)
    assert all(torch.equal(a[k], b[k]) for k in a) and again_task.epochs_seen == [1, 2, 3, 4]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    task, engine = make(tmp_path, epochs=3)
    engine.fit()
    good = torch.load(tmp_path / "run" / CKPT, weights_only=True)
    task2, engine2 = make(tmp_path, epochs=5)
    engine2.fit(resume=True)  # continue 2 more epochs, then poison the data
    task3, engine3 = make(tmp_path, epochs=8)
    task3.x[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        engine3.fit(resume=True)
    kept = torch.load(tmp_path / "run" / CKPT, weights_only=True)
    assert kept["step"] == 10 and kept["step"] > good["step"]
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_non_finite_parameters_after_the_last_update_are_never_saved(tmp_path):
    """A loss that is finite but whose update overflows the weights: the epoch-end check stops the
    run."""
    task, engine = make(tmp_path, epochs=2, lr_lambda=lambda step: float("inf") if step == 3
                        else 1.0)
    with pytest.raises(NonFiniteError, match="non-finite values"):
        engine.fit()
    kept = torch.load(tmp_path / "run" / CKPT, weights_only=True)
    assert kept["step"] == 2  # the checkpoint of epoch 1 survives
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_a_foreign_file_is_not_resumed(tmp_path):
    task, engine = make(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}}, tmp_path / "run" / CKPT)
    with pytest.raises(ValueError, match="not a checkpoint of this engine"):
        engine.fit(resume=True)


def test_resume_refuses_another_config_or_input_and_names_the_difference(tmp_path):
    from mixup_transfer.core import fingerprint as fp

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"one")
    cfg = {"optim": {"lr": 0.1}, "runtime": {"log_every": 5}}
    task, engine = make(tmp_path, epochs=2, stop_after_steps=3)
    engine.fit(fingerprint=fp.make(cfg, {"weights": weights}))
    task.resume_may_change = ("runtime.*",)
    ok = fp.make({"optim": {"lr": 0.1}, "runtime": {"log_every": 50}}, {"weights": weights})
    _, again = make(tmp_path, epochs=2)
    again.task.resume_may_change = ("runtime.*",)
    with pytest.raises(fp.FingerprintMismatch, match=r"config\.optim\.lr: 0\.1 -> 0\.2"):
        again.fit(resume=True,
                  fingerprint=fp.make({"optim": {"lr": 0.2}, "runtime": {"log_every": 5}},
                                                   {"weights": weights}))
    weights.write_bytes(b"two")
    with pytest.raises(fp.FingerprintMismatch, match="input weights"):
        again.fit(resume=True, fingerprint=fp.make(cfg, {"weights": weights}))
    weights.write_bytes(b"one")
    # a runtime key may change
    assert again.fit(resume=True, fingerprint=ok) == {} and again.step == 4


def test_an_existing_checkpoint_is_never_overwritten_without_resume_or_force(tmp_path):
    task, engine = make(tmp_path, epochs=1)
    engine.fit()
    before = (tmp_path / "run" / CKPT).read_bytes()
    _, again = make(tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"continue it \(resume=True; the tools continue by "
                       r"default\), or start "
                                         r"over \(force=True; the tools' --force\)"):
        again.fit()
    assert (tmp_path / "run" / CKPT).read_bytes() == before
    _, forced = make(tmp_path, epochs=1)
    assert forced.fit(force=True) == {} and forced.step == 2


def test_an_infinite_input_with_clipping_stops_before_anything_is_saved(tmp_path):
    task, engine = make(tmp_path, epochs=1, clip_grad_norm=1.0)
    task.x[3, 1] = float("inf")  # that batch's loss and gradient are non-finite
    with pytest.raises(NonFiniteLossError):
        engine.fit()
    assert not (tmp_path / "run" / CKPT).exists()


def test_a_nan_is_found_at_the_next_read_and_the_checkpoint_stays_finite(tmp_path):
    """Metrics are read every log_every steps, not every step: a NaN loss at step 11 (8 steps per
    epoch, log_every
    4) is found at the read after step 12, names step 11, and the checkpoint of epoch 1 (step 8) is
       what is kept."""
    class PoisonedAtStep11(RegressionTask):
        def before_step(self, micro_step):
            self.micro_step = micro_step

        def inputs(self, batch):
            x, y = batch
            # micro-steps count from 0
            return (x * float("nan") if self.micro_step == 10 else x), y

    task = PoisonedAtStep11(batch=2, micro=2)
    opt = build_optimizer("sgd", task.param_groups(), 0.1, momentum=0.9)
    settings = LoopSettings(total_steps=16, device=torch.device("cpu"), log_every=4)
    engine = Engine(task, tmp_path / "run", settings, opt, lambda step: 1.0)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 11;"):
        engine.fit()
    assert engine.step == 12  # the read after step 12 found it
    kept = torch.load(tmp_path / "run" / CKPT, weights_only=True)
    assert kept["step"] == 8 and all(torch.isfinite(v).all() for v in kept["model"].values())
    logs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # step 1 is logged at the first read
    assert [r["step"] for r in logs if r["event"] == "step"] == [1, 4, 8]
    assert all(math.isfinite(r["loss"]) for r in logs if r["event"] == "step")


def test_grad_norm_is_measured_on_the_device_and_logged(tmp_path):
    """grad_norm2 of step 1 equals the squared norm of the first batch's gradient computed by
    hand."""
    task, engine = make(tmp_path, epochs=1, grad_norm=True)
    ref = RegressionTask()
    x, y = next(iter(ref.batches(0, 0)))
    ref.model(x, y)["loss"].backward()
    expect = sum(float((p.grad**2).sum()) for p in ref.model.parameters())
    engine.fit()
    logs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in logs if r["event"] == "step")
    assert first["step"] == 1 and first["grad_norm2"] == pytest.approx(expect, rel=1e-5)
    epoch = next(r for r in logs if r["event"] == "epoch")
    steps = [r["grad_norm2"] for r in logs if r["event"] == "step"]
    assert len(steps) == 2 and epoch["grad_norm2"] == pytest.approx(sum(steps) / 2, rel=1e-6)


def test_task_declares_everything_the_engine_reads():
    """Every attribute the engine reads from its task is declared on `Task` (no getattr fallbacks),
    and the step's accounting is the task's: a plain Task adds no counts, a ClassificationTask
    counts the clean logits' top-1."""
    import ast
    import inspect

    from mixup_transfer.core import engine
    from mixup_transfer.core.engine import ClassificationTask

    source = inspect.getsource(engine.Engine)
    read = {n.attr for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "task"}
    assert {"step_metrics", "epoch_metrics", "resume_may_change",
            "resumable_across_world_sizes"} <= read
    assert read <= set(vars(Task)) | set(Task.__annotations__), sorted(read - set(vars(Task)))
    assert "getattr" not in source
    batch, out = (None, torch.tensor([1, 2, 0])), {"logits": torch.tensor([[0.0, 1, 0], [0, 0, 1],
                                                                           [0, 1, 0]])}
    assert Task().step_metrics(batch, out) == {} and Task().epoch_metrics({"correct": 2.0,
                                                                           "count": 3.0}) == {}
    counts = ClassificationTask().step_metrics(batch, out)
    assert counts["correct"].item() == 2 and counts["count"] == 3.0
    assert ClassificationTask().step_metrics(batch, {"loss": torch.tensor(1.0)}) == {}
    assert ClassificationTask().epoch_metrics({"correct": 3.0,
                                               "count": 4.0}) == {"train_top1": 75.0}
    assert ClassificationTask().epoch_metrics({"loss": 1.0}) == {}
