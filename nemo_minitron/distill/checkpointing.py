"""Training checkpoints in megatron-core's distributed format: written once, resharded on load, complete or absent.

A checkpoint is the directory ``<root>/step_<N>``:

- megatron ``dist_checkpointing`` files (``torch_dist`` format: ``*.distcp``, ``.metadata``, ``common.pt``,
  ``metadata.json``) holding the model's and the optimizer's sharded state dicts, the run's counters, and the
  optimizer's parameter groups. Every tensor is written once by one rank (replicas over data parallelism split
  the writing among them), and every tensor carries its place in the whole model, so the checkpoint loads at any
  tensor-, pipeline- and data-parallel layout: the distributed optimizer's state is saved per model parameter
  (megatron's ``fully_reshardable`` format) and cut again for the new layout.
- ``rng/rank<R>.pt``: each rank's random-generator states, restored when the layout is the same.
- ``meta.json``: the architecture, batch shape and layout; written last.

All ranks write into a hidden temporary directory; only when every rank has finished does rank 0 write
``meta.json`` and rename the directory into place, so a crash at any moment leaves either the previous
checkpoints or a complete new one. Checkpoints beyond ``keep_last`` are renamed to a hidden name before they are
deleted, for the same reason. Nothing read runs code (see :mod:`nemo_minitron.parallel.mcore_fixes`): the
metadata is unpickled with an allow-list of its classes, every other file with ``torch.load(weights_only=True)``.
When the newest checkpoint cannot be read, the previous one is used and a line says so.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.parallel import mcore_fixes, state

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
RNG_DIR = "rng"


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def layout() -> dict[str, int]:
    """This run's parallel layout, as a checkpoint records it."""
    return {"tensor_model_parallel_size": state.tp_size(), "pipeline_model_parallel_size": state.pp_size(),
            "data_parallel_size": state.dp_size(), "world_size": _rank_world()[1]}


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


def _write_rng(directory: Path, rank: int, rng: dict[str, Any]) -> None:
    part = directory / f"rank{rank:05d}.pt.part"
    with open(part, "wb") as f:
        torch.save(rng, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, directory / f"rank{rank:05d}.pt")


def save(root: Path, step: int, sharded_state: dict[str, Any], rng: dict[str, Any], meta: dict[str, Any],
         keep_last: int) -> Path:
    """Write ``sharded_state`` (megatron's sharded state dict; plain values in it are written once, from rank 0)
    and this rank's ``rng`` states as the checkpoint of ``step``. Collective: every rank calls it."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from torch.distributed.checkpoint.api import CheckpointException

    mcore_fixes.apply()
    mcore_fixes.take_write_error()  # (forget an earlier one)
    rank, _ = _rank_world()
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    error: Optional[str] = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        strategy = get_default_save_sharded_strategy("torch_dist")
        if dist.is_initialized():
            # Replicated tensors (over data parallelism) are written by one of their replicas each, shared out.
            strategy = FullyParallelSaveStrategyWrapper(
                strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist_checkpointing.save(sharded_state, str(tmp), sharded_strategy=strategy)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        _write_rng(tmp / RNG_DIR, rank, rng)
    except (Exception, CheckpointException) as exc:  # torch's checkpoint writer raises the latter per failed rank
        cause = mcore_fixes.take_write_error() or _cause(exc)
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
        error = f"cannot write checkpoint {final}: {reason}"
    if not _all_ok(error is None):
        _barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(error or f"cannot write checkpoint {final}: another rank failed")
    if rank == 0:
        try:
            (tmp / META).write_text(json.dumps({**meta, "step": step, "layout": layout()}, indent=2) + "\n")
            for directory in (tmp / RNG_DIR, tmp):
                _fsync_dir(directory)
            if final.exists():  # the same step saved again: out of the way in one step, then deleted
                _delete(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            for _, old in step_dirs(root)[:-keep_last]:
                _delete(old)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"cannot write checkpoint {final}: {exc.strerror or exc}"
    state.raise_rank0_error(error)
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


def remove_all(root: Path) -> None:
    """Delete every checkpoint under ``root``, then ``root`` itself if nothing else is left in it (collective:
    rank 0 deletes while the others wait). Each one goes as :func:`_delete` removes it: whole or not at all."""
    rank, _ = _rank_world()
    _barrier()
    if rank == 0 and root.is_dir():
        for _, step_dir in step_dirs(root):
            _delete(step_dir)
        remove_partial(root)
        try:
            root.rmdir()
        except OSError:
            pass
    _barrier()


def remove_partial(root: Path) -> None:
    """Remove what a run killed while saving or deleting a checkpoint left (rank 0, before training)."""
    if root.is_dir():
        for stale in [*root.glob(".step_*.tmp"), *root.glob(".step_*.old")]:
            shutil.rmtree(stale, ignore_errors=True)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / META}: unreadable ({exc})") from None


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
    of another model or batch shape (the parallel layout may differ); without, there are any (keep_last would
    delete by step, mixing two runs)."""
    found = step_dirs(root)
    if not found:
        return
    if not resume:
        raise UserError(f"{root} holds checkpoints of an earlier run and checkpoint.resume is false: remove them "
                        "or choose another output")
    path = found[-1][1]
    _check_meta(path, _read_meta(path), expect_meta)


@dataclass
class Loaded:
    step: int
    state: dict[str, Any]  # the sharded state dict's values, loaded
    rng: Optional[dict[str, Any]]  # this rank's generator states; None when the layout differs
    path: Path


def _load_one(path: Path, sharded_state: Callable[[], dict[str, Any]], same_layout: bool) -> Loaded:
    from megatron.core import dist_checkpointing

    rank, _ = _rank_world()
    # Read here first: torch's reader turns the refusal into the text of another error.
    with open(path / ".metadata", "rb") as stream:
        mcore_fixes.read_checkpoint_metadata(stream)
    loaded = dist_checkpointing.load(sharded_state(), str(path))
    rng = None
    if same_layout:
        rng = torch.load(path / RNG_DIR / f"rank{rank:05d}.pt", weights_only=True, map_location="cpu")
    return Loaded(int(_STEP_DIR.match(path.name).group(1)), loaded, rng, path)


def _cause(exc: BaseException) -> BaseException:
    """The error underneath torch's and megatron's wrappers (a failed rank's exception, a chained cause)."""
    from torch.distributed.checkpoint.api import CheckpointException

    seen = 0
    while seen < 10:
        seen += 1
        if isinstance(exc, CheckpointException) and exc.failures:
            failure = next(iter(exc.failures.values()))
            exc = failure[0] if isinstance(failure, tuple) else failure
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            return exc
    return exc


def load_latest(root: Path, expect_meta: dict[str, Any],
                sharded_state: Callable[[], dict[str, Any]]) -> Optional[Loaded]:
    """The newest complete checkpoint under ``root`` that every rank can read, loaded into the tensors of
    ``sharded_state()`` (a fresh sharded state dict of the run, built as for loading); None when there is none.

    ``expect_meta`` entries (architecture, batch shape) must match the checkpoint's, else UserError. A checkpoint
    that holds objects other than plain data is refused (UserError); one that cannot be read (a truncated file)
    is passed over for the previous one, with a line on stderr.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    mcore_fixes.apply()
    found = step_dirs(root)
    rank, _ = _rank_world()
    skipped: list[str] = []
    for _, path in reversed(found):
        meta = _read_meta(path)
        _check_meta(path, meta, expect_meta)
        refused = error = None
        try:
            result = _load_one(path, sharded_state, meta.get("layout") == layout())
        # A truncated or foreign file: torch and megatron raise many types, torch's checkpoint reader a
        # CheckpointException (not an Exception) holding each failed rank's.
        except (Exception, CheckpointException) as exc:
            cause = _cause(exc)
            if isinstance(cause, pickle.UnpicklingError):
                refused = f"{path}: refused: it holds objects other than tensors and plain data"
            else:
                error = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
        if not _all_ok(refused is None):
            state.raise_rank0_error(refused or f"{path}: refused by another rank")
        if _all_ok(error is None):
            if skipped and rank == 0:
                print(f"nemo-minitron: {'; '.join(skipped)}; resuming from {path.name}", file=sys.stderr)
            return result
        skipped.append(f"checkpoint {path.name} is unreadable ({error or 'on another rank'})")
    if skipped:
        raise UserError(f"{root}: no readable checkpoint: {'; '.join(skipped)}")
    return None


def read_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint ``step_dir``, whole, by its global name (one process, no process group):
    for tools and tests that look into a checkpoint. megatron names a transformer layer's tensors without the
    layer's number and stacks them over the layers: ``decoder.layers.mlp.linear_fc2.weight`` is
    ``[num_layers, hidden, ffn]``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    mcore_fixes.apply()
    loaded = _load_state_dict_from_keys(storage_reader=FileSystemReader(str(step_dir)))
    return {k: v for k, v in loaded.items() if torch.is_tensor(v)}
