"""The WSOL stage's declaration (mixup_transfer/core/stage.py): CAM fine-tuning of a backbone on
CUB-200-2011 and its localization scores (MaxBoxAcc, MaxBoxAccV2, Top-1 Loc)."""

from pathlib import Path

from mixup_transfer.core.stage import Stage

STAGE = Stage(
    name="wsol",
    entry="wsol.finetune:run",
    schema="wsol.finetune:DEFAULTS",
    inputs=(),
    optional_inputs=("weights",),  # the backbone checkpoint; None: random init
    outputs=("cam_model.pth", "metrics.json"),
    gpus_per_node=1,
    options=("resume", "force"),
    run_dir=lambda cfg, config, cwd: Path(cwd) / "runs" / cfg.get("name", "wsol"),
    cli="wsol.cli",  # the metadata, evaluate and baseline commands beside finetune
    subcommand="finetune",
    description="fine-tune a CAM model on CUB and localize",
)
