"""Shared pieces of the reliability tests: a tiny teacher and student on a prepared corpus, the ``distill``
command line for them, and one finished, uninterrupted run that tests compare with or start from.


Teacher (hidden 64) and student (hidden 32) have 4 layers and the real SmolLM2 tokenizer (vocabulary 49152),
so a training step takes a fraction of a second and a checkpoint is about 49 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from conftest import DIST_ENV, destroy_state

STEPS = 8
# Metrics that depend on the wall clock, not on the computation.
TIMING = ("tokens_per_second",)


def make_models(root: Path) -> dict[str, Path]:
    """``teacher``, ``student`` (Hugging Face directories) and ``data`` (prepared, train and valid splits)."""
    from tiny import prepare_tiny_corpus, write_tiny_hf

    common = dict(vocab_size=49152, with_tokenizer=True)
    dirs = {
        "teacher": write_tiny_hf(root / "teacher", hidden_size=64, intermediate_size=96, seed=61, **common),
        "student": write_tiny_hf(root / "student", hidden_size=32, intermediate_size=64, seed=62, **common),
    }
    dirs["data"] = prepare_tiny_corpus(root, dirs["teacher"])
    return dirs


def distill_args(models: dict[str, Path], output: Path, **changes: object) -> list[str]:
    """``distill key=value ...`` for the tiny pair: STEPS steps, a checkpoint after every step, fp32."""
    args: dict[str, object] = {
        "student": models["student"], "teacher": models["teacher"], "data": models["data"], "output": output,
        "train.seq_length": 16, "train.micro_batch_size": 2, "train.global_batch_size": 4,
        "train.max_steps": STEPS, "train.dtype": "float32", "train.teacher_dtype": "float32",
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 1,
        "checkpoint.every_steps": 1, "checkpoint.keep_last": 2,
        "eval.every_steps": 4, "eval.max_windows": 4, "log.tensorboard": False, "log.progress": False,
    }
    args.update(changes)
    return ["distill"] + [f"{k}={v}" for k, v in args.items() if v is not None]


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "nemo_minitron.cli", *args]


def cli_env() -> dict[str, str]:
    """This process's environment (PYTHONPATH included) without launcher variables."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def run_cli(args: list[str], cwd: Path, preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(args), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def main_in_process(args: list[str]) -> int:
    """``nemo-minitron ARGS`` in this process (its exit status); megatron's state is torn down afterwards."""
    from nemo_minitron.cli import main

    try:
        return main(args)
    finally:
        destroy_state()


def metrics(output: Path) -> list[dict]:
    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def checkpoint_dirs(output: Path) -> dict[int, Path]:
    """Step -> directory of every ``step_N`` directory present (complete or not)."""
    root = Path(output) / "checkpoints"
    found = root.glob("step_*") if root.is_dir() else []
    return {int(p.name.removeprefix("step_")): p for p in found}


def load_shard(step_dir: Path) -> dict:
    """A checkpoint's step (from its meta.json), its counters, its weights and its optimizer state (whole
    tensors, by name)."""
    import torch

    from nemo_minitron.distill.checkpointing import read_tensors

    tensors = read_tensors(step_dir)
    return {
        "step": json.loads((step_dir / "meta.json").read_text())["step"],
        "train": torch.load(step_dir / "common.pt", weights_only=True)["train"],
        "model": {k: v for k, v in tensors.items() if not k.startswith("optimizer.")},
        "optimizer": {k: v for k, v in tensors.items() if k.startswith("optimizer.")},
    }


def leftovers(output: Path) -> list[str]:
    """Temporary files and folders of interrupted writes anywhere under ``output``."""
    return sorted(str(p.relative_to(output)) for p in Path(output).rglob("*")
                  if p.name.endswith((".tmp", ".part", ".old")) or ".tmp-" in p.name or ".old-" in p.name)


def finished_run(models: dict[str, Path], out: Path) -> Path:
    """``out`` after one uninterrupted run of ``distill_args`` in this process."""
    assert main_in_process(distill_args(models, out)) == 0
    return out


def copy_run(src: Path, dst: Path, drop_final: bool = False) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if drop_final:
        shutil.rmtree(dst / "final")
    return dst


def newest_step(output: Path) -> Optional[int]:
    from nemo_minitron.distill.checkpointing import step_dirs

    found = step_dirs(Path(output) / "checkpoints")
    return found[-1][0] if found else None
