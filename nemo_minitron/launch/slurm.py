"""``nemo-minitron launch slurm JOB.yaml cluster=CLUSTER.yaml [stage=NAME] [dry_run=true] [key=value ...]``

Renders an sbatch script from a strict cluster config (:class:`ClusterConfig`) and a stage's job config, writes
both (``job.sbatch``, ``job.yaml``) into a fresh run directory and submits the script with ``sbatch``. The
script is environment plumbing only: it derives every rank's ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` and the
rendezvous ``MASTER_ADDR`` / ``MASTER_PORT`` from Slurm and runs ``nemo-minitron <stage> job.yaml`` on each rank.

On the command line, ``cluster=`` names the cluster YAML and ``cluster.KEY=VALUE`` overrides it; ``stage=``
(default: the folder of JOB.yaml, as in ``conf/prune/``), ``dry_run=`` and ``run_dir=`` steer the launch;
every other ``key=value`` overrides the job's config. Both configs are validated, and the world size checked
against the job's TP x PP, before anything is written. :func:`launch_slurm` is the entry point.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import Field, StringConstraints, ValidationError

from nemo_minitron.config import StrictModel, format_validation_error, load_config, parse_overrides
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory
from nemo_minitron.stages import STAGES, Stage

# Values written verbatim into `#SBATCH` lines, which sbatch reads itself: no shell quoting can protect them.
SlurmWord = Annotated[str, StringConstraints(pattern=r"^[\w.+\-]+$")]
# Jobs may name several partitions: the first that can run them takes them.
SlurmWords = Annotated[str, StringConstraints(pattern=r"^[\w.+\-]+(,[\w.+\-]+)*$")]
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
SlurmTime = Annotated[str, StringConstraints(pattern=r"^(\d+-\d+(:\d{2}){0,2}|\d+(:\d{2}){0,2})$")]
SlurmMemory = Annotated[str, StringConstraints(pattern=r"^\d+[KMGT]?$")]
# pyxis joins mounts with ',' and splits each at ':'.
Mount = Annotated[str, StringConstraints(pattern=r"^[^:,\s]+:[^:,\s]+(:[\w+]+)?$")]
NoSpace = Annotated[str, StringConstraints(pattern=r"^\S+$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]

# Set by the script for each rank; a cluster config that set them would be silently overridden.
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Keys of the command line that belong to the launch itself, not to the job's config.
LAUNCH_KEYS = ("cluster", "stage", "dry_run", "run_dir")
USAGE = "usage: nemo-minitron launch slurm JOB.yaml cluster=CLUSTER.yaml [stage=NAME] [dry_run=true] [key=value ...]"


class ContainerConfig(StrictModel):
    """A pyxis/enroot container for every rank (``srun --container-image/--container-mounts``)."""

    image: NoSpace = Field(description="enroot URI (nvcr.io#org/image:tag) or a squashfs file on the nodes")
    mounts: list[Mount] = Field(default_factory=list, description="SRC:DST[:FLAGS]; the run directory is added")
    workdir: Optional[NoSpace] = Field(None, description="working directory inside the container")


class ClusterConfig(StrictModel):
    """Where and how a job runs: the allocation, the container and the environment of its ranks."""

    job_name: SlurmWord = Field("nemo-minitron", description="the Slurm job is <job_name>-<stage>")
    partition: Optional[SlurmWords] = None
    account: Optional[SlurmWord] = None
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1, description="ranks per node: one per GPU")
    gpus_per_node: int = Field(0, ge=0, description="0: a CPU job (gloo)")
    cpus_per_task: int = Field(1, ge=1, description="CPU cores per rank (also its OMP_NUM_THREADS)")
    mem: Optional[SlurmMemory] = Field(None, description="memory per node; '0' is all of it")
    time: SlurmTime = "01:00:00"
    exclusive: bool = False
    overcommit: bool = Field(False, description="let more tasks than CPUs start (CPU test clusters)")
    signal_before_end_s: Optional[int] = Field(
        None, ge=1, description="SIGTERM the ranks this long before the time limit (distill checkpoints, exits)"
    )
    launcher: Literal["srun", "torchrun"] = Field(
        "srun", description="srun: one Slurm task per rank; torchrun: one Slurm task per node starting its ranks"
    )
    container: Optional[ContainerConfig] = None
    env: dict[EnvName, Union[str, int, float]] = Field(default_factory=dict)
    output_dir: str = Field("runs/slurm", min_length=1, description="run directories are created under it")
    workdir: Optional[str] = Field(
        None, min_length=1, description="the job's working directory (relative job paths); default: where launched"
    )


class SlurmLaunch(StrictModel):
    """One submission: a stage's validated job config on a cluster."""

    stage: str
    job: StrictModel = Field(description="the stage's config, e.g. a PruneConfig")
    cluster: ClusterConfig
    dry_run: bool = Field(False, description="write the run directory, do not submit")
    run_dir: Optional[Path] = Field(None, description="default: <output_dir>/<job name>-<timestamp>")


@dataclass(frozen=True)
class SlurmSubmission:
    job_id: Optional[str]  # None for a dry run
    run_dir: Path
    script: Path
    job_config: Path


def _launchable() -> dict[str, Stage]:
    return {name: stage for name, stage in STAGES.items() if name != "launch" and stage.launchable}


def _stage(name: str) -> Stage:
    stages = _launchable()
    if name in STAGES and name not in stages and name != "launch":
        raise UserError(f"stage: {name} starts the ranks of its stages itself, on one machine: run "
                        f"`nemo-minitron {name}` there instead of launching it")
    if name not in stages:
        raise UserError(f"stage: '{name}' is not a stage (one of {', '.join(sorted(stages))})")
    return stages[name]


def _check(request: SlurmLaunch) -> None:
    """What the schemas cannot see: the job's type, one rank per GPU, and world size against TP x PP."""
    expected = _stage(request.stage).config_class()
    if not isinstance(request.job, expected):
        raise UserError(
            f"job: a {type(request.job).__name__}, but stage {request.stage} takes a {expected.__name__}"
        )
    cluster = request.cluster
    if cluster.gpus_per_node and cluster.gpus_per_node != cluster.tasks_per_node:
        raise UserError(
            f"cluster: one rank per GPU, but tasks_per_node {cluster.tasks_per_node} != "
            f"gpus_per_node {cluster.gpus_per_node}"
        )
    taken = sorted(set(cluster.env) & set(RANK_ENV))
    if taken:
        raise UserError(f"cluster: env.{taken[0]} is set for every rank by the launcher")
    parallel = getattr(request.job, "parallel", None)
    model_parallel = parallel.model_parallel_size if parallel is not None else 1
    world = cluster.nodes * cluster.tasks_per_node
    if world % model_parallel:
        raise UserError(
            f"world size {world} (nodes {cluster.nodes} x tasks_per_node {cluster.tasks_per_node}) is not "
            f"divisible by TP*PP = {model_parallel} of the job config"
        )


def _run_dir(request: SlurmLaunch, job_name: str) -> Path:
    if request.run_dir is not None:
        run_dir = request.run_dir.resolve()
        if run_dir.exists():
            raise UserError(f"run directory already exists: {run_dir}")
        return run_dir
    base = Path(request.cluster.output_dir).resolve() / f"{job_name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir, n = base, 1
    while run_dir.exists():  # two launches within one second
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def _container_mounts(container: ContainerConfig, run_dir: Path) -> list[str]:
    """The configured mounts, plus the run directory at its own path: every rank reads job.yaml from there."""
    if any(c in str(run_dir) for c in ":,"):
        raise UserError(f"run directory {run_dir} cannot be a container mount (it holds ':' or ',')")
    for mount in container.mounts:
        src, dst = mount.split(":")[:2]
        if src == dst and run_dir.is_relative_to(src):
            return list(container.mounts)
    return [*container.mounts, f"{run_dir}:{run_dir}"]


def _render(request: SlurmLaunch, job_name: str, run_dir: Path, workdir: Path) -> str:
    cluster, stage = request.cluster, request.stage
    torchrun = cluster.launcher == "torchrun"
    job_config = run_dir / "job.yaml"
    sbatch = [f"--job-name={job_name}"]
    sbatch += [f"--partition={cluster.partition}"] if cluster.partition else []
    sbatch += [f"--account={cluster.account}"] if cluster.account else []
    sbatch += [
        f"--nodes={cluster.nodes}",
        # torchrun starts the node's ranks itself, from one Slurm task that holds all their CPUs.
        f"--ntasks-per-node={1 if torchrun else cluster.tasks_per_node}",
        f"--cpus-per-task={cluster.cpus_per_task * (cluster.tasks_per_node if torchrun else 1)}",
    ]
    sbatch += [f"--gpus-per-node={cluster.gpus_per_node}"] if cluster.gpus_per_node else []
    sbatch += [f"--mem={cluster.mem}"] if cluster.mem is not None else []
    sbatch += [f"--time={cluster.time}"]
    sbatch += ["--exclusive"] if cluster.exclusive else []
    sbatch += ["--overcommit"] if cluster.overcommit else []
    sbatch += [f"--signal=TERM@{cluster.signal_before_end_s}"] if cluster.signal_before_end_s else []
    sbatch += [f"--chdir={workdir}", f"--output={run_dir}/slurm-%j.out"]

    lines = [
        "#!/bin/bash",
        f"# Written by `nemo-minitron launch slurm` for stage {stage}; the job's config is job.yaml beside this file.",
        *(f"#SBATCH {flag}" for flag in sbatch),
        "set -euo pipefail",
        "",
    ]
    env = {"OMP_NUM_THREADS": str(cluster.cpus_per_task), **{k: str(v) for k, v in cluster.env.items()}}
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    if cluster.container is None:
        lines += [
            "# No container: the ranks run the installation that launched the job (a shared filesystem).",
            f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
        ]
    lines += [
        "",
        "# Rendezvous on the first node; a port derived from the job id keeps jobs that share a node apart.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export MASTER_ADDR MASTER_PORT",
        "",
    ]
    srun = ["srun --kill-on-bad-exit=1"]
    if cluster.container is not None:
        srun += [
            f"--container-image={shlex.quote(cluster.container.image)}",
            f"--container-mounts={shlex.quote(','.join(_container_mounts(cluster.container, run_dir)))}",
        ]
        if cluster.container.workdir:
            srun += [f"--container-workdir={shlex.quote(cluster.container.workdir)}"]
    if torchrun:
        lines.append("# One torchrun per node starts its ranks and sets RANK, LOCAL_RANK and WORLD_SIZE.")
        rank_cmd = (
            'exec torchrun --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" '
            f"--nproc-per-node={cluster.tasks_per_node} "
            '--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" '
            f'--no-python nemo-minitron {stage} "$0"'
        )
    else:
        lines.append("# One Slurm task per rank, its coordinates from Slurm. A failed rank ends the others.")
        rank_cmd = (
            "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; "
            f'exec nemo-minitron {stage} "$0"'
        )
    srun.append(f"bash -c '{rank_cmd}' {shlex.quote(str(job_config))}")
    lines.append(" \\\n    ".join(srun))
    return "\n".join(lines) + "\n"


def _submit(script: Path, workdir: Path) -> str:
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], cwd=workdir, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(
            f"sbatch not found: submit {script} on a Slurm login node (dry_run=true only writes it)"
        ) from None
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise UserError(f"sbatch refused {script}: {message}")
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    return done.stdout.strip().split(";")[0]


def launch_slurm(request: SlurmLaunch) -> SlurmSubmission:
    """Validate, write ``job.sbatch`` and ``job.yaml`` into a fresh run directory and submit (unless a dry run)."""
    _check(request)
    cluster = request.cluster
    job_name = f"{cluster.job_name}-{request.stage}"
    workdir = Path(cluster.workdir or ".").resolve()
    if not workdir.is_dir():
        raise UserError(f"cluster: workdir {workdir} is not a directory")
    run_dir = _run_dir(request, job_name)
    for path in (workdir, run_dir):
        if any(c.isspace() for c in str(path)):
            raise UserError(f"'{path}' holds whitespace, which an #SBATCH option cannot")
    script_text = _render(request, job_name, run_dir, workdir)
    # Only what was set (not every default): job.yaml reads like the config it came from.
    job_text = yaml.safe_dump(request.job.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    try:
        with atomic_directory(run_dir) as tmp:
            (tmp / "job.yaml").write_text(job_text, encoding="utf-8")
            (tmp / "job.sbatch").write_text(script_text, encoding="utf-8")
            (tmp / "job.sbatch").chmod(0o755)
    except FileExistsError:
        raise UserError(f"run directory already exists: {run_dir}") from None
    script = run_dir / "job.sbatch"
    job_id = None if request.dry_run else _submit(script, workdir)
    return SlurmSubmission(job_id=job_id, run_dir=run_dir, script=script, job_config=run_dir / "job.yaml")


def _load(cls: type, path: str | Path, overrides: Sequence[str], what: str) -> Any:
    try:
        return load_config(cls, path, overrides)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None


def parse_cli(args: Sequence[str]) -> SlurmLaunch:
    """``slurm JOB.yaml cluster=CLUSTER.yaml [key=value ...]`` (the arguments after ``launch``) -> a request."""
    if not args or args[0] != "slurm":
        raise UserError(f"unknown launcher '{args[0] if args else ''}' ({USAGE})")
    if len(args) < 2 or "=" in args[1]:
        raise UserError(f"the job's CONFIG.yaml comes after 'slurm' ({USAGE})")
    job_path, items = Path(args[1]), list(args[2:])
    parse_overrides(items)  # every item is key=value, or one line saying which is not
    own = {k: v for k, v in (item.split("=", 1) for item in items) if k in LAUNCH_KEYS}
    cluster_overrides = [item.removeprefix("cluster.") for item in items if item.startswith("cluster.")]
    job_overrides = [
        item for item in items if item.split("=", 1)[0] not in LAUNCH_KEYS and not item.startswith("cluster.")
    ]
    if "cluster" not in own:
        raise UserError(f"cluster=CLUSTER.yaml is required ({USAGE})")
    cluster = _load(ClusterConfig, own["cluster"], cluster_overrides, "cluster")
    stage_name = own.get("stage") or job_path.parent.name.replace("_", "-")
    if "stage" not in own and stage_name not in STAGES:
        raise UserError(f"stage=NAME is required: the folder of {job_path} names no stage")
    job = _load(_stage(stage_name).config_class(), job_path, job_overrides, "job")
    try:
        return SlurmLaunch(
            stage=stage_name,
            job=job,
            cluster=cluster,
            # dry_run=yes / true / 1 read as YAML scalars, like every other override.
            dry_run=parse_overrides([f"dry_run={own['dry_run']}"])["dry_run"] if "dry_run" in own else False,
            run_dir=own.get("run_dir"),
        )
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None
