"""The pretraining stage's declaration (mixup_transfer/core/stage.py): a mixing method on an
ImageNet-, CIFAR- or TinyImageNet-layout dataset -> backbone.pth (the backbone contract of
mixup_transfer/core/checkpoint.py)."""

from pathlib import Path

from mixup_transfer.core.stage import Stage

STAGE = Stage(
    name="pretrain",
    entry="pretrain.task:run",
    schema="pretrain.task:DEFAULTS",
    inputs=(),  # its dataset is data.root in its config
    # the frozen teacher of a method that needs one (supermix); or the teacher key
    optional_inputs=("teacher",),
    outputs=("backbone.pth", "metrics.json", "log.jsonl", "checkpoints/last.pth"),
    gpus_per_node=8,
    options=("resume", "force"),
    run_dir=lambda cfg, config, cwd: Path(cwd) / "runs" / cfg["name"],
    description="pretrain a backbone with a mixing method",
)
