"""Training checkpoints that are complete or absent, and load without unpickling arbitrary objects.

A checkpoint is the directory ``<root>/step_<N>`` with one ``rank<R>.pt`` per rank (this rank's model
shard, optimizer and RNG states, data position) and ``meta.json``. All ranks write into a hidden
temporary directory; only when every rank has finished does rank 0 write ``meta.json`` and rename the
directory into place, so a crash at any moment leaves either the previous checkpoints or a complete new one.
Checkpoints beyond ``keep_last`` are renamed to a hidden name before they are deleted, for the same reason.
Files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.parallel import state

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool) -> bool:
    """True only if ``ok`` on every rank."""
    return int(state.all_reduce(torch.tensor([0 if ok else 1]))) == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteRecorder:
    """The file ``torch.save`` writes through, remembering the OSError of a failed write: torch itself reports
    a full disk only as a RuntimeError ("unexpected pos")."""

    def __init__(self, file) -> None:
        self.file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / META).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def save(root: Path, step: int, payload: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Write this rank's ``payload`` for ``step`` (collective: every rank calls it)."""
    rank, world = _rank_world()
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    error: Optional[str] = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if dist.is_initialized():
        dist.barrier()
    try:
        part = tmp / f"rank{rank:05d}.pt.part"
        with open(part, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(payload, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, tmp / f"rank{rank:05d}.pt")
    except OSError as exc:
        error = f"cannot write checkpoint {final}: {exc.strerror or exc}"
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(error or f"cannot write checkpoint {final}: another rank failed")
    if rank == 0:
        try:
            (tmp / META).write_text(json.dumps({**meta, "step": step, "world_size": world}, indent=2) + "\n")
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again: out of the way in one step, then deleted
                _delete(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            for _, old in step_dirs(root)[:-keep_last]:
                _delete(old)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"cannot write checkpoint {final}: {exc.strerror or exc}"
    if dist.is_initialized() and world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    return final


def _delete(step_dir: Path) -> None:
    """Delete a checkpoint directory so that a crash midway cannot leave a ``step_N`` with files missing:
    renamed to a hidden name first (one atomic step), then removed. A failure leaves it whole, as it was."""
    doomed = step_dir.with_name(f".{step_dir.name}.old")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(step_dir, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def remove_partial(root: Path) -> None:
    """Remove what a run killed while saving or deleting a checkpoint left (rank 0, before training)."""
    if root.is_dir():
        for stale in [*root.glob(".step_*.tmp"), *root.glob(".step_*.old")]:
            shutil.rmtree(stale, ignore_errors=True)


def _newest(root: Path) -> Optional[tuple[int, Path, dict[str, Any]]]:
    """(step, directory, meta) of the newest complete checkpoint under ``root``, or None."""
    found = step_dirs(root)
    if not found:
        return None
    step, path = found[-1]
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / META}: unreadable ({exc})") from None
    return step, path, meta


def _check_meta(path: Path, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    for key, value in expect.items():
        have = meta.get(key)
        if have == value:
            continue
        if isinstance(have, dict) and isinstance(value, dict):  # name the first differing field
            sub = next(k for k in sorted(set(have) | set(value)) if have.get(k) != value.get(k))
            key, have, value = f"{key}.{sub}", have.get(sub), value.get(sub)
        raise UserError(f"{path}: {key} is {have!r} in the checkpoint, {value!r} in this run")


def check_resumable(root: Path, expect_meta: dict[str, Any], resume: bool) -> None:
    """UserError when this run cannot start among the checkpoints under ``root``: with ``resume``, the newest is
    of another layout or model; without, there are any (keep_last would delete by step, mixing two runs)."""
    newest = _newest(root)
    if newest is None:
        return
    if not resume:
        raise UserError(f"{root} holds checkpoints of an earlier run and checkpoint.resume is false: remove them "
                        "or choose another output")
    _check_meta(newest[1], newest[2], expect_meta)


def load_latest(root: Path, expect_meta: dict[str, Any]) -> Optional[tuple[int, dict[str, Any]]]:
    """(step, this rank's payload) of the newest complete checkpoint, or None when there is none.

    ``expect_meta`` entries (parallel layout, architecture) must match the checkpoint's, else UserError.
    """
    newest = _newest(root)
    if newest is None:
        return None
    step, path, meta = newest
    rank, world = _rank_world()
    if meta.get("world_size") != world:
        raise UserError(f"{path}: written by {meta.get('world_size')} ranks, this run has {world}")
    _check_meta(path, meta, expect_meta)
    file = path / f"rank{rank:05d}.pt"
    if not file.is_file():
        raise UserError(f"{path}: shard {file.name} is missing")
    try:
        payload = torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        # It names a Python object to build: that runs code, which a checkpoint never needs.
        raise UserError(f"{file}: refused: it holds objects other than tensors and plain data") from None
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise UserError(f"{file}: unreadable checkpoint shard "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return step, payload
