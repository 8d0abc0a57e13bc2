"""Kill and resume: a ``distill`` run (the CLI in a subprocess) is interrupted at seeded random points — five
SIGKILLs, one of them at the start-up and two aimed at checkpoint writes, and one SIGTERM — and rerun from its
run directory each time. The resumed run must end with the loss curve and the weights of an uninterrupted run,
bit for bit; no kill may leave a checkpoint that loads but is incomplete; SIGTERM must save and exit 0.

The points are found with Linux inotify: the trainer creates ``checkpoints/.step_N.tmp`` when it starts writing
checkpoint N and renames it to ``step_N`` when done, so a kill on the creation event lands inside the write and
a kill a moment after the rename lands in the next step; ``metrics.jsonl`` is appended to after every step.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import select
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from .reliability_helpers import (
    STEPS,
    checkpoint_dirs,
    cli_command,
    cli_env,
    distill_args,
    leftovers,
    load_shard,
    metrics,
)

SEED = 6
IN_MODIFY, IN_CREATE, IN_MOVED_TO = 0x2, 0x100, 0x80
# The SIGTERM run checkpoints only when stopped (and at the end), so the checkpoint it leaves is the one the
# signal made it write. How often a run checkpoints does not change what it computes.
NO_PERIODIC_CHECKPOINT = {"checkpoint.every_steps": 100}


@dataclass(frozen=True)
class KillPoint:
    """When to send ``signal`` (SIGKILL, or SIGTERM for a pre-emption) to the run, ``delay`` seconds after:
    ``startup``: the start of the process; ``write``: it starts writing checkpoint ``step`` (or a later one);
    ``after_checkpoint``: checkpoint ``step`` (or a later one) is complete; ``after_step``: it logs step
    ``step`` (or a later one). ``changes``: overrides of this run's command line."""

    kind: str
    step: int
    delay: float
    signal: int = signal.SIGKILL
    changes: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        sig = signal.Signals(self.signal).name
        return f"{sig} {self.kind}" + (f" step {self.step}" if self.kind != "startup" else "") + f" +{self.delay:.3f}s"


def kill_points(seed: int = SEED) -> list[KillPoint]:
    """One start-up kill, then five points at distinct increasing steps 1..6 (two checkpoint writes, two
    mid-step kills, one SIGTERM) in a seeded random order; steps 7 and 8 are always left for the last run."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, STEPS - 1), 5))
    kinds = ["write", "write", "after_checkpoint", "after_checkpoint", "sigterm"]
    rng.shuffle(kinds)
    points = [KillPoint("startup", 0, rng.uniform(0.5, 3.0))]
    for step, kind in zip(steps, kinds):
        if kind == "write":  # a write of the tiny checkpoint lasts ~50 ms: kill within its first 10 ms
            points.append(KillPoint("write", step, rng.uniform(0.0, 0.01)))
        elif kind == "after_checkpoint":
            points.append(KillPoint("after_checkpoint", step, rng.uniform(0.0, 0.2)))
        else:
            points.append(KillPoint("after_step", step, rng.uniform(0.0, 0.2), signal.SIGTERM,
                                    tuple(NO_PERIODIC_CHECKPOINT.items())))
    return points


class DirectoryWatch:
    """inotify on a run directory and its ``checkpoints``: names created, renamed into place or written to."""

    def __init__(self, output: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for path in (output, output / "checkpoints"):
            if libc.inotify_add_watch(self.fd, str(path).encode(), IN_CREATE | IN_MOVED_TO | IN_MODIFY) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def events(self, timeout: float) -> list[tuple[int, str]]:
        """(mask, name) of the events within ``timeout`` seconds (an empty list when there was none)."""
        poller = select.poll()  # not select.select: it fails on descriptors above 1023
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return []
        buf, out, i = os.read(self.fd, 65536), [], 0
        while i < len(buf):
            _, mask, _, length = struct.unpack_from("iIII", buf, i)
            out.append((mask, buf[i + 16 : i + 16 + length].rstrip(b"\0").decode()))
            i += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


def last_logged_step(output: Path) -> int:
    """The step of the last training record in ``metrics.jsonl`` (0 when there is none)."""
    path = output / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [r["step"] for r in (json.loads(line) for line in lines if line.endswith("}")) if "loss" in r]
    return max(steps, default=0)


def _triggers(point: KillPoint, output: Path, mask: int, name: str) -> bool:
    if point.kind == "write" and mask & IN_CREATE and name.startswith(".step_") and name.endswith(".tmp"):
        return int(name[len(".step_") : -len(".tmp")]) >= point.step
    if point.kind == "after_checkpoint" and mask & IN_MOVED_TO and name.startswith("step_"):
        return int(name[len("step_") :]) >= point.step
    # Appends (IN_MODIFY) come from this process only: the trimming on resume renames a new file into place.
    if point.kind == "after_step" and mask & IN_MODIFY and name == "metrics.jsonl":
        return last_logged_step(output) >= point.step
    return False


@dataclass
class Interruption:
    point: KillPoint
    returncode: int
    stdout: str
    # Complete checkpoint steps before the run; what the interruption left: complete checkpoint steps,
    # temporary checkpoint directories, the last step in metrics.jsonl.
    before: list[int] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    last_logged: int = 0
    temporaries: list[str] = field(default_factory=list)
    # Every complete checkpoint loaded with every tensor of the reference's, in its shape.
    all_load: bool = False


def interrupt(args: list[str], cwd: Path, output: Path, point: KillPoint) -> tuple[int, str]:
    """Start the CLI, send ``point.signal`` at ``point``; return its exit status and stdout."""
    watch = DirectoryWatch(output)
    proc = subprocess.Popen(cli_command(args), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        if point.kind == "startup":
            time.sleep(point.delay)
        else:
            hit = False
            while not hit and proc.poll() is None:
                hit = any(_triggers(point, output, mask, name) for mask, name in watch.events(0.2))
            assert hit, f"{point}: the run ended before the kill point ({proc.returncode})"
            time.sleep(point.delay)
        proc.send_signal(point.signal)
        stdout, _ = proc.communicate(timeout=300)
        return proc.returncode, stdout
    finally:
        watch.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def layout(value: object) -> object:
    """The structure of a checkpoint payload: containers and keys, and each tensor's dtype and shape."""
    import torch

    if isinstance(value, dict):
        return {k: layout(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [layout(v) for v in value]
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape))
    return type(value).__name__


def check_complete(output: Path, want: object) -> bool:
    """Every ``step_N`` directory has its meta.json, and a shard of step N whose whole structure (model,
    optimizer and RNG states, counters) is ``want``, the structure of a checkpoint of the uninterrupted run."""
    for step, path in checkpoint_dirs(output).items():
        assert json.loads((path / "meta.json").read_text())["step"] == step, path
        payload = load_shard(path)
        assert payload["step"] == step, path
        assert layout(payload) == want, path
    return True


@pytest.fixture(scope="module")
def runs(models, reference, tmp_path_factory) -> dict:
    """The interrupted run, with what every interruption left, next to the uninterrupted ``reference``."""
    root = tmp_path_factory.mktemp("kill_and_resume")
    want = layout(load_shard(checkpoint_dirs(reference)[STEPS]))

    output = root / "interrupted"
    (output / "checkpoints").mkdir(parents=True)  # watched from the start
    args = distill_args(models, output)
    interruptions = []
    started = time.perf_counter()
    for point in kill_points():
        before = sorted(checkpoint_dirs(output))
        code, stdout = interrupt(args + [f"{k}={v}" for k, v in point.changes], root, output, point)
        found = Interruption(point, code, stdout, before=before, last_logged=last_logged_step(output))
        found.checkpoints = sorted(checkpoint_dirs(output))
        found.temporaries = sorted(p.name for p in (output / "checkpoints").glob(".step_*.tmp"))
        found.all_load = check_complete(output, want)
        interruptions.append(found)
    final = subprocess.run(cli_command(args), cwd=root, env=cli_env(), capture_output=True, text=True, timeout=300)
    return {"reference": reference, "output": output, "interruptions": interruptions, "final": final,
            "seconds": time.perf_counter() - started}


def test_kill_points_are_seeded_and_cover_a_checkpoint_write():
    points = kill_points()
    assert points == kill_points()  # the same seed, the same points
    assert sum(p.signal == signal.SIGKILL for p in points) == 5
    assert sum(p.signal == signal.SIGTERM for p in points) == 1
    assert [p.kind for p in points].count("write") == 2
    steps = [p.step for p in points[1:]]
    assert steps == sorted(set(steps)) and steps[-1] < STEPS - 1


def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(runs):
    from safetensors.torch import load_file

    assert runs["final"].returncode == 0, runs["final"].stderr[-3000:]
    output, reference = runs["output"], runs["reference"]
    assert metrics(output) == metrics(reference)  # every loss, gradient norm, lr and eval value
    assert ((output / "final" / "model.safetensors").read_bytes()
            == (reference / "final" / "model.safetensors").read_bytes())
    got, want = load_file(output / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)
    # The last checkpoint too: weights and optimizer state.
    mine, theirs = load_shard(checkpoint_dirs(output)[STEPS]), load_shard(checkpoint_dirs(reference)[STEPS])
    for key, value in theirs["model"].items():
        assert np.array_equal(mine["model"][key].numpy(), value.numpy()), key
    assert json.loads((output / "result.json").read_text())["final_loss"] == metrics(reference)[STEPS - 1]["loss"]


def test_every_kill_leaves_only_complete_checkpoints_and_resume_cleans_up(runs):
    kills = [i for i in runs["interruptions"] if i.point.signal == signal.SIGKILL]
    assert len(kills) == 5
    for i in kills:
        assert i.returncode == -signal.SIGKILL, f"{i.point}: exit {i.returncode}"
        assert i.all_load, str(i.point)
        # keep_last 2, and one more when the kill fell between a rename and the deletion of the oldest.
        assert len(i.checkpoints) <= 3, f"{i.point}: found {i.checkpoints}"
    # The points aimed at writes did land inside one: the checkpoint being written stayed a temporary
    # directory, newer than every complete checkpoint, and was never renamed into place.
    inside = [i for i in kills if i.point.kind == "write" and i.temporaries]
    assert inside, [(str(i.point), i.checkpoints, i.temporaries) for i in kills]
    for i in inside:
        (name,) = i.temporaries
        assert int(name[len(".step_") : -len(".tmp")]) > max(i.checkpoints, default=0), str(i.point)
    # The reruns removed every temporary file and folder of the killed writes.
    assert leftovers(runs["output"]) == []
    assert sorted(checkpoint_dirs(runs["output"])) == [STEPS - 1, STEPS]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(runs):
    """The SIGTERM run writes no periodic checkpoint: the one it leaves is the one the signal made it save.
    (That the run resumed from it continues exactly is part of the bit-for-bit test above.)"""
    (term,) = [i for i in runs["interruptions"] if i.point.signal == signal.SIGTERM]
    assert term.returncode == 0, str(term.point)
    printed = json.loads(term.stdout[term.stdout.index("{"):])
    assert printed["stopped_early"] is True
    # It finished the step it was in, saved it, and stopped there.
    assert term.point.step <= printed["steps"] == term.last_logged < STEPS
    assert term.checkpoints[-1] == printed["steps"] and printed["steps"] not in term.before
    assert term.temporaries == [] and term.all_load
