"""A stage (or the whole pipeline) as a SLURM job through submitit: N nodes x G GPUs, requeued on
preemption or time-out, continuing from the run's last checkpoint. `tools/submit.py` is the command
line.

One task of the job is one DDP process. `StageJob.__call__` turns submitit's `JobEnvironment` into
the variables torchrun sets (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE), so that `mixup_transfer.core.runtime.init_distributed` joins the process group
exactly as under torchrun, and calls the stage's one entry point. When SLURM signals a preemption
or the coming time limit, submitit calls `StageJob.checkpoint` on rank 0: it returns the same job
with resume=True, which submitit requeues; that job continues `run_dir/checkpoints/last.pth` bit
for bit (mixup_transfer.core.engine). The steps after that checkpoint are redone: on ImageNet set
`runtime.checkpoint_every_steps` (pretraining) so that a requeue loses minutes, not an epoch.

| stage        | entry point                     | tasks                                   |
|--------------|---------------------------------|-----------------------------------------|
| pretrain     | `pretrain.task.run`             | N x G (DDP)                             |
| detection    | `transfer.detection.stage.run`  | N x G (DDP, as under torchrun)          |
| wsol         | `wsol.finetune.run`             | N x G (a)                               |
| robustness   | `transfer.robustness.stage.run` | N x G (b)                               |
| pipeline     | `pipeline.run.run_pipeline`     | N x G (c)                               |

(a) all ranks fine-tune, evaluation sharded, rank 0 writes; (b) sharded; evaluation only:
restarts if requeued; (c) as under torchrun; finished stages skipped when requeued. (`pipeline` is
`mixup_transfer.pipeline`.)

A job with one task sets none of the variables: it runs as `python tools/run_<stage>.py` would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path

from mixup_transfer.core import runtime as rt
from mixup_transfer.core.config import ConfigError, load_config
from mixup_transfer.core.lock import run_lock
from mixup_transfer.pipeline import stages as declared_stages
from mixup_transfer.pipeline.stages import NAMES

log = logging.getLogger("launch")

# the declared stages (mixup_transfer/pipeline/stages.py) and the whole pipeline
STAGES = NAMES + ("pipeline",)


def default_gpus_per_node(name: str) -> int:
    """A job's GPUs per node unless given: the stage's declared default; the pipeline 1 (it runs
    its stages in one process group, as under torchrun)."""
    return 1 if name == "pipeline" else declared_stages.stage(name).gpus_per_node


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a job runs; every path absolute (the job may start in another folder, on another
    node)."""

    stage: str                          # one of STAGES
    config: str | None                  # the stage's YAML (robustness: optional)
    overrides: tuple[str, ...] = ()     # KEY=VALUE, as on the stage's own command line
    run_dir: str | None = None          # output folder (pipeline: its config's out_root/name)
    weights: str | None = None          # detection, wsol: backbone checkpoint (None: random init)
    checkpoint: str | None = None       # robustness: the checkpoint to evaluate
    imagenet: str | None = None         # robustness: ImageNet-layout root
    # pretrain: the teacher checkpoint (supermix); or its config key teacher
    teacher: str | None = None
    # continue run_dir's run (the default of every tool; False with force)
    resume: bool = True
    # start over in a run_dir that holds a run (first start only)
    force: bool = False
    # relative paths inside the config (data.root, ...) are read from here
    cwd: str = "."
    # --allow-pickle: unpickle --weights / --checkpoint (trusted files only)
    allow_pickle: bool = False


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the job asks the cluster for (translated to submitit's parameters in
    `executor_parameters`)."""

    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None   # None: one per GPU (at least one)
    cpus_per_task: int = 10
    mem_gb: int | None = None           # per node; None: the partition's default
    # the job's time limit; it is requeued before it (signal_delay_s)
    timeout_min: int = 1440
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    name: str = "mixup-transfer"
    signal_delay_s: int = 120           # SLURM signals USR2 this long before the time limit
    # time-outs after which the job is not requeued again (preemptions: any)
    max_requeues: int = 3

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


# -- the distributed environment of one task
# ----------------------------------------------------------------------
def master_port(job_id: str) -> int:
    """A port in [20000, 40000) that every task of the job derives alike from its id."""
    return 20000 + zlib.crc32(str(job_id).encode()) % 20000


def distributed_env(job_id: str, hostnames: Sequence[str], num_nodes: int, num_tasks: int,
                    global_rank: int, local_rank: int, port: int | None = None) -> dict[str, str]:
    """The torchrun variables for one task of a job ({} for a one-task job: no process group). The
    first node of the job hosts the rendezvous (127.0.0.1 when the job has one node); `port`
    defaults to `master_port`."""
    if num_tasks == 1:
        return {}
    if num_tasks % num_nodes:
        raise ConfigError(f"{num_tasks} tasks do not split evenly over {num_nodes} nodes")
    return {"MASTER_ADDR": "127.0.0.1" if num_nodes == 1 else str(hostnames[0]),
            "MASTER_PORT": str(port if port is not None else master_port(job_id)),
            "RANK": str(global_rank), "WORLD_SIZE": str(num_tasks), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes)}


def _submitit():
    try:
        import submitit
    except ImportError as e:
        raise ImportError("launching jobs needs submitit: pip install 'mixup-transfer[cluster]' "
                          "(or pip install submitit)") from e
    return submitit


def _job_environment():
    """submitit's JobEnvironment when running inside a submitit job, else None (a direct call)."""
    submitit = _submitit()
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


# -- the stages
# -------------------------------------------------------------------------------------------------
def load_stage_config(name: str, config: str | None, overrides: Sequence[str] = ()) -> dict:
    """The stage's config as its own command line reads it (unknown keys rejected)."""
    if name == "pipeline":
        if config is None:
            raise ConfigError("stage pipeline needs --config")
        from mixup_transfer.pipeline.run import DEFAULTS

        return load_config(config, overrides, defaults=DEFAULTS)
    return declared_stages.stage(name).load_config(config, overrides)


def default_run_dir(name: str, config: str | None, cfg: dict, cwd: Path) -> Path | None:
    """Where the stage's own command line (tools/run_<stage>.py) writes; None for the pipeline (its
    config says)."""
    return None if name == "pipeline" else declared_stages.stage(name).run_dir(cfg, config, cwd)


def _absolute(path: str | None, cwd: Path) -> str | None:
    return None if path in (None, "", "none", "None") else str((cwd / path).resolve())


def make_spec(stage: str, config: str | None, overrides: Sequence[str] = (),
              run_dir: str | None = None, weights: str | None = None,
              checkpoint: str | None = None, imagenet: str | None = None, force: bool = False,
              cwd: str | os.PathLike | None = None, allow_pickle: bool = False,
              teacher: str | None = None) -> JobSpec:
    """Check a job before it waits in the queue: the stage, its config and inputs. Like the stage's
    own tool, the job continues a run folder that holds a run (a changed config is refused when it
    starts) unless `force`. Returns the spec with absolute paths."""
    cwd = Path(cwd or os.getcwd()).resolve()
    config = _absolute(config, cwd)
    cfg = load_stage_config(stage, config, overrides)
    if stage == "pipeline" and (run_dir or force):
        raise ConfigError("the pipeline writes to its config's out_root/name and resumes by "
                          "itself (finished stages are skipped); --run-dir and --force are not "
                          "for it (tools/run_pipeline.py --force STAGE redoes a stage)")
    _check_inputs(stage, {"weights": weights, "checkpoint": checkpoint, "imagenet": imagenet,
                          "teacher": teacher})
    weights, checkpoint, imagenet, teacher = (_absolute(p, cwd)
                                              for p in (weights, checkpoint, imagenet, teacher))
    for name, path in (("--weights", weights), ("--checkpoint", checkpoint),
                       ("--imagenet", imagenet), ("--teacher", teacher)):
        if path and not Path(path).exists():
            raise FileNotFoundError(2, f"{name} does not exist", path)
    out = Path(_absolute(run_dir, cwd)) if run_dir else default_run_dir(stage, config, cfg, cwd)
    if force and stage != "pipeline" and "force" not in declared_stages.stage(stage).options:
        raise ConfigError(f"{stage} only evaluates (it starts over every time): it has no --force")
    return JobSpec(stage, config, tuple(overrides), None if out is None else str(out),
                   weights=weights, checkpoint=checkpoint, imagenet=imagenet, teacher=teacher,
                   resume=not force, force=force, cwd=str(cwd), allow_pickle=allow_pickle)


def _check_inputs(name: str, given: dict) -> None:
    """The stage's declared inputs: the required ones given, no others."""
    flags = {"weights": "--weights", "checkpoint": "--checkpoint", "imagenet": "--imagenet",
             "teacher": "--teacher"}
    declared = () if name == "pipeline" else declared_stages.stage(name).inputs
    optional = () if name == "pipeline" else declared_stages.stage(name).optional_inputs
    missing = [flags[k] for k in declared if not given.get(k)]
    if missing:
        raise ConfigError(f"stage {name} needs {' and '.join(missing)}")
    for key, value in given.items():
        if value and key not in declared + optional:
            users = [n for n in NAMES
                     if key in declared_stages.stage(n).inputs
                     + declared_stages.stage(n).optional_inputs]
            raise ConfigError(f"{flags[key]} is for {' and '.join(users)}, not {name}")


def run_stage(spec: JobSpec) -> dict:
    """Run the stage of `spec` in this process (under DDP when the torchrun variables are set); its
    metrics.

    The job holds its run folder's lock as the stage's own command line does (rank 0; the pipeline
    takes its own), so a second job, or a command run by hand, into the same folder is refused
    while this one runs; a requeued job finds the lock of its killed predecessor stale and takes it
    over."""
    cfg = load_stage_config(spec.stage, spec.config, spec.overrides)
    if spec.allow_pickle:  # the submitting command line's --allow-pickle, for the files it named
        from mixup_transfer.core.checkpoint import trust_pickled

        for path in (spec.weights, spec.checkpoint, spec.teacher):
            if path:
                trust_pickled(path)
    if spec.stage == "pipeline":
        from mixup_transfer.pipeline.run import run_pipeline

        return {"report": str(run_pipeline(spec.config, spec.overrides))}
    with run_lock(spec.run_dir, f"{spec.stage} job"):
        return _dispatch(spec, cfg)


def _dispatch(spec: JobSpec, cfg: dict) -> dict:
    declared = declared_stages.stage(spec.stage)
    inputs = {k: getattr(spec, k) for k in declared.inputs + declared.optional_inputs}
    # a no-op with one task; every stage is rank-aware (mixup_transfer/core/distributed.py)
    rt.init_distributed()
    return declared.run(cfg, inputs or None, spec.run_dir, resume=spec.resume, force=spec.force)


# -- the job
# -------------------------------------------------------------------------------------------------
class StageJob:
    """The callable submitit pickles and runs on every task; `checkpoint` makes it requeueable."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __call__(self) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        os.chdir(self.spec.cwd)
        env = _job_environment()
        if env is not None:
            # a user's choice wins over the one derived from the job id
            port = os.environ.get("MASTER_PORT")
            variables = distributed_env(env.job_id, env.hostnames, env.num_nodes, env.num_tasks,
                                        env.global_rank, env.local_rank,
                                        int(port) if port else None)
            os.environ.update(variables)
            log.info("%s: %s", env, variables or "one task, no process group")
        try:
            return run_stage(self.spec)
        finally:
            rt.cleanup_distributed()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption / time-out: the same job, continuing the run's last
        checkpoint (never starting over: force is dropped)."""
        from submitit.helpers import DelayedSubmission

        log.info("requeueing %s; it resumes from %s", self.spec.stage,
                 self.spec.run_dir or "its run folders")
        return DelayedSubmission(StageJob(dataclasses.replace(self.spec, resume=True,
                                                              force=False)))

    def __repr__(self) -> str:
        return f"StageJob({self.spec.stage}, {self.spec.config})"


# -- the executor
# -------------------------------------------------------------------------------------------------
def executor_parameters(res: Resources, cluster: str) -> dict:
    """submitit's update_parameters for SLURM (SlurmExecutor names) or the local executor."""
    if cluster == "local":
        if res.nodes != 1:
            raise ConfigError(f"--local runs on the local machine: one node, not {res.nodes}")
        return {"tasks_per_node": res.tasks, "gpus_per_node": res.gpus_per_node,
                "timeout_min": res.timeout_min, "signal_delay_s": res.signal_delay_s}
    if cluster != "slurm":
        raise ConfigError(f"cluster must be slurm or local, got {cluster!r}")
    params = {"job_name": res.name, "nodes": res.nodes, "ntasks_per_node": res.tasks,
              "gpus_per_node": res.gpus_per_node, "cpus_per_task": res.cpus_per_task,
              "time": res.timeout_min, "signal_delay_s": res.signal_delay_s,
              "partition": res.partition, "account": res.account, "qos": res.qos,
              "mem": f"{res.mem_gb}GB" if res.mem_gb else None}
    return {k: v for k, v in params.items() if v is not None
            and not (k == "gpus_per_node" and v == 0)}


def make_executor(job_dir: str | os.PathLike, res: Resources, cluster: str = "slurm"):
    """A submitit executor writing its scripts and logs in `job_dir` (`%j` becomes the job id)."""
    submitit = _submitit()

    params = executor_parameters(res, cluster)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=job_dir, max_num_timeout=res.max_requeues)
    else:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise ConfigError("sbatch/srun not found: this is not a SLURM machine (try --local "
                              "to run the job here)")
        executor = submitit.SlurmExecutor(folder=job_dir, max_num_timeout=res.max_requeues)
    executor.update_parameters(**params)
    return executor


def submit(spec: JobSpec, res: Resources, job_dir: str | os.PathLike, cluster: str = "slurm"):
    """Queue `spec` with `res`; returns the submitit job (job.results()[0] waits for rank 0's
    metrics)."""
    job = make_executor(job_dir, res, cluster).submit(StageJob(spec))
    log.info("submitted %s as job %s (%d node(s) x %d task(s)); logs in %s", spec.stage,
             job.job_id, res.nodes, res.tasks, job.paths.folder)
    return job
