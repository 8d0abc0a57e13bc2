"""Faults during training: a run that diverges to non-finite numbers, and a disk that fills up. Both continue
a finished 8-step run (a copy of it) for more steps: the run must stop with one line, a non-zero exit status,
and the checkpoints written before the fault exactly as they were."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

from .reliability_helpers import (
    STEPS,
    checkpoint_dirs,
    copy_run,
    distill_args,
    leftovers,
    load_shard,
    main_in_process,
    metrics,
    run_cli,
)


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_divergence_skips_non_finite_steps_then_stops_with_the_last_good_checkpoint(models, reference, tmp_path,
                                                                                   capsys):
    """Continued with a learning rate of 1e30, the first step's update is finite but ruinous: every later step
    has non-finite gradients. Two are skipped (train.max_skipped_steps=2), the third stops the run."""
    out = copy_run(reference, tmp_path / "run", drop_final=True)
    before = files(checkpoint_dirs(out)[STEPS])
    capsys.readouterr()
    status = main_in_process(distill_args(models, out, **{
        "train.max_steps": STEPS + 6, "optim.lr": 1e30, "optim.min_lr": 1e29, "train.max_skipped_steps": 2}))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"nemo-minitron distill: error: step {STEPS + 4}: loss or gradients not finite for 3 steps in a "
                   "row; stopping (the last checkpoint is intact)"]
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 4))
    assert [r.get("skipped", 0.0) for r in rows[STEPS:]] == [0.0, 1.0, 1.0]
    assert all("lr" not in r for r in rows[STEPS + 1 :])  # no optimizer step was taken
    # No checkpoint of a skipped step: the newest is the last step that was finite, the one before it untouched.
    assert sorted(checkpoint_dirs(out)) == [STEPS, STEPS + 1]
    assert files(checkpoint_dirs(out)[STEPS]) == before
    last_good = load_shard(checkpoint_dirs(out)[STEPS + 1])
    counters = last_good["train"]
    assert (last_good["step"], counters["step"], counters["skipped"], counters["skipped_in_a_row"]) == (
        STEPS + 1, STEPS + 1, 0, 0)
    assert not (out / "final").exists() and leftovers(out) == []


def limit_file_size(max_bytes: int):
    """For a subprocess: no file may grow past ``max_bytes`` (writes fail with EFBIG, as on a full disk)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoints(models, reference, tmp_path):
    """The continued run may write files of at most 1 MiB: metrics.jsonl grows, the next checkpoint (tens of MB)
    cannot be written."""
    out = copy_run(reference, tmp_path / "run", drop_final=True)
    before = {step: files(path) for step, path in checkpoint_dirs(out).items()}
    proc = run_cli(distill_args(models, out, **{"train.max_steps": STEPS + 2}), cwd=tmp_path,
                   preexec_fn=limit_file_size(1 << 20))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"nemo-minitron distill: error: cannot write checkpoint {out / 'checkpoints' / f'step_{STEPS + 1:08d}'}: "
        "File too large"]
    # Step 9 was trained and logged; its checkpoint was never completed; the earlier ones are as they were.
    assert [r["step"] for r in metrics(out) if "loss" in r][-1] == STEPS + 1
    assert {step: files(path) for step, path in checkpoint_dirs(out).items()} == before
    assert leftovers(out) == [] and not (out / "final").exists()
    assert json.loads((out / "result.json").read_text())["steps"] == STEPS  # the finished run's, untouched


def test_an_unreadable_newest_checkpoint_is_passed_over_for_the_previous_one(models, reference, tmp_path):
    """A disk fault truncated the newest checkpoint's data file: the rerun says so in one line, resumes from the
    checkpoint before it, and redoes the last step bit for bit."""
    out = copy_run(reference, tmp_path / "run", drop_final=True)
    newest = checkpoint_dirs(out)[STEPS]
    data = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    proc = run_cli(distill_args(models, out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("nemo-minitron:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"nemo-minitron: checkpoint step_{STEPS:08d} is unreadable (") and lines[0].endswith(
        f"); resuming from step_{STEPS - 1:08d}"), proc.stderr[-3000:]
    assert ((out / "final" / "model.safetensors").read_bytes()
            == (reference / "final" / "model.safetensors").read_bytes())
    assert [r for r in metrics(out) if "loss" in r] == [r for r in metrics(reference) if "loss" in r]


def test_a_cache_entry_wanted_by_processes_at_once_is_made_once(tmp_path):
    """The embedded teacher's conversion and the Austen texts are made on first use (create_once): processes
    that start together on an empty cache (jobs, test workers) wait for one of them to make it, then all read
    the same complete directory."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom pathlib import Path\n"
            "from nemo_minitron.fsutil import atomic_directory, create_once\n"
            "def make(target):\n"
            "    with atomic_directory(target) as tmp:\n"
            "        time.sleep(1.0)\n"
            "        (tmp / 'made-by').write_text(sys.argv[2])\n"
            "        with open(Path(sys.argv[1]).parent / 'calls', 'a') as f: f.write(sys.argv[2] + '\\n')\n"
            "print(create_once(Path(sys.argv[1]), Path.is_dir, make).joinpath('made-by').read_text())\n")
    target = tmp_path / "cache" / "entry"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(3)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    makers = (tmp_path / "cache" / "calls").read_text().split()
    assert len(makers) == 1 and outputs == makers * 3
