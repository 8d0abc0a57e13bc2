"""The teacher logit cache: the ``cache-logits`` stage that writes it, and the reader that distillation uses.

A cache is a directory of shard files and ``index.json``. Window ``i`` is the ``i``-th sample of the
distillation sampler's global order (``data.train_sampler`` of the cache's data, one prepared dataset or a blend,
with its ``seq_length`` and ``seed``): a distillation step ``s`` of global batch ``G`` reads windows ``s*G .. s*G+G-1``,
whatever its micro-batch size, data-parallel size or tensor/pipeline layout. Per token of a window (its
``seq_length`` input positions) the cache holds the teacher's top-k token ids (int32), their log-probabilities
(of the full-vocabulary softmax at temperature 1; bf16 or fp32) and ``log_tail`` (fp32), the log of the
teacher's probability outside those k tokens (-inf when k is the vocabulary).

Shard ``n`` (``shard-00000n.bin``) holds windows ``n*W .. n*W+W-1`` (``W = windows_per_shard``; the last shard
may hold fewer) as raw little-endian arrays, one after the other, each C-ordered: ``window_hash`` uint64 [w]
(BLAKE2b-64 of the window's ``seq_length + 1`` tokens as int64, checked against the tokens distillation reads),
``ids`` int32 [w, s, k], ``log_tail`` float32 [w, s], ``logprobs`` [w, s, k] (bf16 as its uint16 bits, or
float32). Nothing is pickled: the index is JSON and the shards are read with ``numpy.memmap``.

Atomic and resumable: ``pending.json`` (the cache's identity) is written first, each shard is written to a
temporary name and renamed, and ``index.json`` (identity, shard list with sizes and SHA-256) comes last. A
killed run leaves complete shards, which a rerun of the same config keeps; the windows and the micro-batches
that compute each shard are fixed by the config, so the rerun writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from nemo_minitron.checkpoint.integrity import check_model
from nemo_minitron.checkpoint.io import load_model, read_model_config, resolve_model_dir
from nemo_minitron.data import DataSource, prepared_components, train_sampler
from nemo_minitron.distill.cache_loss import CachedLogitKD
from nemo_minitron.distill.config import (
    CacheLogitsConfig,
    LossConfig,
    TeacherCacheConfig,
    TrainConfig,
    check_cache_loss,
)
from nemo_minitron.distill.losses import _chunks, _logits, _matmul_operand, _row_dot
from nemo_minitron.distill.pair import DistillationPair, output_weight
from nemo_minitron.dtypes import resolve, torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import DirectoryLock, atomic_write_text, check_can_create
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.schedule import forward_backward
from nemo_minitron.parallel.sharding import check_divisible

FORMAT = "nemo_minitron.logit_cache/1"
INDEX = "index.json"
PENDING = "pending.json"
IDENTITY_KEYS = ("format", "teacher", "tokenizer", "data", "seq_length", "seed", "windows", "top_k", "dtype",
                 "windows_per_shard")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_LOGPROB_DTYPES = {"bfloat16": np.uint16, "float32": np.float32}


# ------------------------------------------------------------------------------------------ identity


def _sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            while block := stream.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def teacher_identity(ref: str) -> dict[str, Any]:
    """Where the teacher is, its architecture, and a SHA-256 of its config and every weight file's content."""
    path = resolve_model_dir(ref)
    cfg = read_model_config(path)
    weights = sorted(path.glob("*.safetensors"))
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    digest.update(_sha256_files(weights).encode())
    return {"path": str(path.absolute()), "sha256": digest.hexdigest(), "vocab_size": cfg.vocab_size}


def tokenizer_identity(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """The vocabulary size and a SHA-256 of the tokenizer files in ``model_dir`` (None when it has none)."""
    files = [model_dir / name for name in _TOKENIZER_FILES if (model_dir / name).is_file()]
    return {"vocab_size": vocab_size, "sha256": _sha256_files(files) if files else None}


_DATA_SAMPLES, _DATA_BLOCK = 256, 4096


def data_identity(data: DataSource) -> dict[str, Any]:
    """The train split of the prepared dataset (of every component of a blend, with its weight): a SHA-256 of its
    index file, its token file's size and content (all of it up to 1 MiB, else 256 blocks of 4 KiB spread evenly
    over it: cheap on terabytes, and every window a distillation reads is checked against its cached hash
    besides)."""
    digest = hashlib.sha256()
    paths = []
    for component in prepared_components(data, "data"):
        prefix = component.path / "train"
        idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
        if not (idx.is_file() and bin_.is_file()):
            raise UserError(f"data: {component.path} is not a prepared dataset (run prepare-data first)")
        paths.append(str(component.path.absolute()))
        digest.update(repr(component.weight).encode() + idx.read_bytes())
        size = bin_.stat().st_size
        digest.update(str(size).encode())
        with open(bin_, "rb") as f:
            if size <= _DATA_SAMPLES * _DATA_BLOCK:
                digest.update(f.read())
            else:
                for i in range(_DATA_SAMPLES):
                    f.seek(i * (size - _DATA_BLOCK) // (_DATA_SAMPLES - 1))
                    digest.update(f.read(_DATA_BLOCK))
    return {"path": paths[0] if len(paths) == 1 else paths, "sha256": digest.hexdigest()}


def cache_identity(cfg: CacheLogitsConfig) -> dict[str, Any]:
    """Everything that decides a cache's bytes (see IDENTITY_KEYS); paths are recorded but not compared."""
    teacher = teacher_identity(cfg.teacher)
    return {
        "format": FORMAT,
        "teacher": {**teacher, "dtype": resolve(cfg.teacher_dtype)},
        "tokenizer": tokenizer_identity(resolve_model_dir(cfg.teacher), teacher["vocab_size"]),
        "data": data_identity(cfg.data),
        "seq_length": cfg.seq_length,
        "seed": cfg.seed,
        "windows": cfg.num_windows(),
        "top_k": cfg.top_k,
        "dtype": cfg.dtype,
        "windows_per_shard": cfg.windows_per_shard,
    }


def _comparable(identity: dict) -> dict:
    """The identity without the places things were found (a moved teacher or dataset is the same one)."""
    out = {k: identity.get(k) for k in IDENTITY_KEYS}
    out["teacher"] = {k: v for k, v in (out["teacher"] or {}).items() if k != "path"}
    out["data"] = {k: v for k, v in (out["data"] or {}).items() if k != "path"}
    return out


def window_hash(tokens: np.ndarray) -> int:
    """BLAKE2b-64 of a window's ``seq_length + 1`` tokens, as int64 bytes."""
    raw = np.ascontiguousarray(tokens, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------ shard layout


def shard_name(n: int) -> str:
    return f"shard-{n:06d}.bin"


def num_shards(windows: int, per_shard: int) -> int:
    return math.ceil(windows / per_shard)


def shard_windows(n: int, windows: int, per_shard: int) -> range:
    return range(n * per_shard, min((n + 1) * per_shard, windows))


def _layout(w: int, seq: int, k: int, dtype: str) -> list[tuple[str, Any, tuple[int, ...]]]:
    return [("window_hash", np.uint64, (w,)), ("ids", np.int32, (w, seq, k)), ("log_tail", np.float32, (w, seq)),
            ("logprobs", _LOGPROB_DTYPES[dtype], (w, seq, k))]


def shard_bytes(w: int, seq: int, k: int, dtype: str) -> int:
    return sum(np.dtype(t).itemsize * math.prod(shape) for _, t, shape in _layout(w, seq, k, dtype))


def bytes_per_token(k: int, dtype: str) -> float:
    """Disk bytes per cached token (the per-window hash is 8 bytes per window on top)."""
    return k * (4 + np.dtype(_LOGPROB_DTYPES[dtype]).itemsize) + 4


def write_shard(path: Path, arrays: dict[str, np.ndarray], seq: int, k: int, dtype: str) -> None:
    """Write one shard atomically: to a temporary sibling, fsync, rename."""
    w = len(arrays["window_hash"])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for name, t, shape in _layout(w, seq, k, dtype):
                array = arrays[name]
                if array.shape != shape or array.dtype != np.dtype(t):
                    raise ValueError(f"shard array {name}: {array.dtype}{array.shape}, expected {np.dtype(t)}{shape}")
                f.write(np.ascontiguousarray(array).astype(np.dtype(t).newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_shard(path: Path, w: int, seq: int, k: int, dtype: str) -> dict[str, np.ndarray]:
    """Read-only memory maps of a shard's arrays."""
    out, offset = {}, 0
    for name, t, shape in _layout(w, seq, k, dtype):
        dt = np.dtype(t).newbyteorder("<")
        out[name] = np.memmap(path, dtype=dt, mode="r", offset=offset, shape=shape)
        offset += dt.itemsize * math.prod(shape)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ reading


def read_index(path: str | Path) -> dict[str, Any]:
    """The index of the cache at ``path``, checked: format, and every shard file present at its size."""
    root = Path(path)
    index_file = root / INDEX
    if not index_file.is_file():
        hint = " (an unfinished cache: run cache-logits again to complete it)" if (root / PENDING).is_file() else ""
        raise UserError(f"teacher_cache: {root} is not a logit cache: no {INDEX}{hint}")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"teacher_cache: {index_file} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"teacher_cache: {index_file} is not a {FORMAT} index")
    for shard in index["shards"]:
        f = root / shard["file"]
        if not f.is_file() or f.stat().st_size != shard["bytes"]:
            raise UserError(f"teacher_cache: {f} is missing or not {shard['bytes']} bytes (the cache is damaged: "
                            "write it again)")
    return index


def check_cache_fits(index: dict[str, Any], *, data: DataSource, seq_length: int, seed: int, windows_needed: int,
                     student_dir: Path, student_vocab: int, teacher: Optional[str], top_k: Optional[int]) -> None:
    """One-line UserError unless the cache was made for this data, tokenizer, sequence length, sampler seed
    and (when ``teacher`` is given) teacher, and holds the windows and the top-k the distillation reads."""
    where = "teacher_cache"
    if index["data"]["sha256"] != data_identity(data)["sha256"]:
        raise UserError(f"{where}: made for other data ({index['data']['path']}), not {data}")
    if index["seq_length"] != seq_length:
        raise UserError(f"{where}: made for seq_length {index['seq_length']}, not train.seq_length {seq_length}")
    if index["seed"] != seed:
        raise UserError(f"{where}: made for the window order of seed {index['seed']}, not train.seed {seed}")
    tokenizer = index["tokenizer"]
    mine = tokenizer_identity(student_dir, student_vocab)
    if tokenizer["vocab_size"] != student_vocab or (
            tokenizer["sha256"] and mine["sha256"] and tokenizer["sha256"] != mine["sha256"]):
        raise UserError(f"{where}: made with another tokenizer (vocabulary {tokenizer['vocab_size']}) than the "
                        f"student's (vocabulary {student_vocab})")
    if teacher is not None and teacher_identity(teacher)["sha256"] != index["teacher"]["sha256"]:
        raise UserError(f"{where}: made from another teacher ({index['teacher']['path']}) than {teacher}")
    if index["windows"] < windows_needed:
        raise UserError(f"{where}: holds {index['windows']} windows; this distillation reads {windows_needed} "
                        f"(steps x global_batch_size)")
    if top_k is not None and top_k > index["top_k"]:
        raise UserError(f"{where}: top_k {top_k} exceeds the cached {index['top_k']}")


def check_teacher_cache(cache: TeacherCacheConfig, data: DataSource, train: TrainConfig, student_dir: Path,
                        student_vocab: int, teacher: Optional[str]) -> None:
    """One-line UserError unless the cache fits this distillation (:func:`check_cache_fits`)."""
    check_cache_fits(read_index(cache.path), data=data, seq_length=train.seq_length, seed=train.seed,
                     windows_needed=train.steps() * train.global_batch_size, student_dir=Path(student_dir),
                     student_vocab=student_vocab, teacher=teacher, top_k=cache.top_k)


@dataclass
class CachedTargets:
    """The cached teacher targets of the tokens of a micro-batch, flattened as the loss reads them."""

    logprobs: torch.Tensor  # [T, k] float32
    ids: torch.Tensor  # [T, k] int64
    log_tail: torch.Tensor  # [T] float32


class LogitCache:
    """Read a cache by window: ``targets(indices, tokens)`` for a micro-batch of global window indices."""

    def __init__(self, path: str | Path, top_k: Optional[int] = None) -> None:
        self.root = Path(path)
        self.index = read_index(self.root)
        self.k = self.index["top_k"]
        self.top_k = top_k or self.k
        if self.top_k > self.k:
            raise UserError(f"teacher_cache: top_k {self.top_k} exceeds the cached {self.k}")
        self.seq = self.index["seq_length"]
        self.per_shard = self.index["windows_per_shard"]
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def _shard(self, n: int) -> dict[str, np.ndarray]:
        if n not in self._shards:
            meta = self.index["shards"][n]
            self._shards[n] = read_shard(self.root / meta["file"], meta["windows"], self.seq, self.k,
                                         self.index["dtype"])
        return self._shards[n]

    def targets(self, indices: list[int], tokens: torch.Tensor) -> CachedTargets:
        """The targets of windows ``indices`` (global order), after checking that ``tokens`` [b, seq + 1] are
        those windows' tokens."""
        if tokens.shape != (len(indices), self.seq + 1):
            raise UserError(f"teacher_cache: windows of {self.seq + 1} tokens expected, got {tuple(tokens.shape)}")
        rows = []
        for i, row in zip(indices, tokens.cpu().numpy()):
            if i >= self.index["windows"]:
                raise UserError(f"teacher_cache: window {i} is past the cache's {self.index['windows']}")
            shard = self._shard(i // self.per_shard)
            j = i % self.per_shard
            if int(shard["window_hash"][j]) != window_hash(row):
                raise UserError(f"teacher_cache: window {i} holds other tokens than the distillation reads (a "
                                "cache of other data or another sampler)")
            rows.append((shard["logprobs"][j], shard["ids"][j], shard["log_tail"][j]))
        logprobs = torch.from_numpy(np.stack([r[0] for r in rows]))
        if self.index["dtype"] == "bfloat16":
            logprobs = logprobs.view(torch.bfloat16)
        logprobs = logprobs.float().reshape(-1, self.k)
        ids = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64)).reshape(-1, self.k)
        log_tail = torch.from_numpy(np.stack([r[2] for r in rows])).reshape(-1)
        if self.top_k < self.k:
            # The dropped cached tokens join the tail.
            log_tail = torch.logaddexp(log_tail, torch.logsumexp(logprobs[:, self.top_k:], dim=1))
            logprobs, ids = logprobs[:, : self.top_k].contiguous(), ids[:, : self.top_k].contiguous()
        return CachedTargets(logprobs=logprobs, ids=ids, log_tail=log_tail)

    def step_windows(self, step: int, micro: int, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                     dp_size: int) -> list[int]:
        """Global window indices of micro-batch ``micro`` of training step ``step`` on data-parallel rank
        ``dp_rank``: SequenceSampler.batches' order (micro-batch after micro-batch, each the rank's run of
        ``micro_batch_size`` in a run of ``micro_batch_size * dp_size``)."""
        first = step * global_batch_size + micro * micro_batch_size * dp_size + dp_rank * micro_batch_size
        return list(range(first, first + micro_batch_size))


# ------------------------------------------------------------------------------------------ writing


def teacher_top_k(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, k: int,
                  chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k of each token from its final hidden states, vocabulary-parallel.

    hidden [T, h] (replicated over TP), weight [V/tp, h] this rank's output rows. Returns, identical on every
    TP rank: ``logprobs`` [T, k] (log-softmax over the whole vocabulary at the top-k tokens, descending),
    ``ids`` [T, k] int64 (global), ``log_tail`` [T] (log of the probability outside them; -inf when none). Each
    rank sends only its own k best candidates per token (an all-gather of k values and ids); one SUM
    all-reduce gives the partition function and the tail: the ``[T, V]`` logits never exist.
    """
    rank, size = state.tp_rank(), state.tp_size()
    rows = weight.shape[0]
    row_start, n_valid = rank * rows, min(rows, vocab_size - rank * rows)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    w = _matmul_operand(weight[:n_valid], hidden.dtype)
    out_lp, out_ids, out_tail = [], [], []
    for sl in _chunks(hidden.shape[0], chunk_tokens):
        z = _logits(_matmul_operand(hidden[sl], w.dtype), w, dtype)
        n = z.shape[0]
        vals, idx = z.topk(min(k, n_valid), dim=-1)
        if vals.shape[1] < k:  # fewer real rows than k on this rank: candidates that never win
            vals = torch.nn.functional.pad(vals, (0, k - vals.shape[1]), value=float("-inf"))
            idx = torch.nn.functional.pad(idx, (0, k - idx.shape[1]))
        if size > 1:
            all_vals = torch.stack(state.all_gather(vals, state.tp_group())).permute(1, 0, 2).reshape(n, size * k)
            all_ids = torch.stack(state.all_gather(idx + row_start, state.tp_group())).permute(1, 0, 2)
            all_ids = all_ids.reshape(n, size * k)
        else:
            all_vals, all_ids = vals, idx
        top_vals, pos = all_vals.topk(k, dim=-1)
        ids = all_ids.gather(1, pos)
        # The global maximum is the first winner: exp(z - max) <= 1 on every rank without a MAX all-reduce.
        top = top_vals[:, :1]
        local = ids - row_start
        owned = ((local >= 0) & (local < n_valid)).to(dtype)
        e = z.sub_(top).exp_()
        keep = torch.ones_like(e).scatter_add_(1, torch.where(owned > 0, local, 0), -owned)
        sums = torch.stack([e.sum(-1), _row_dot(e, keep)], dim=1)
        if size > 1:
            dist.all_reduce(sums, group=state.tp_group())
        log_z = top[:, 0] + sums[:, 0].log()
        out_lp.append(top_vals - log_z[:, None])
        out_ids.append(ids)
        out_tail.append(sums[:, 1].log() + top[:, 0] - log_z)
    return torch.cat(out_lp), torch.cat(out_ids), torch.cat(out_tail)


_KNOWN = (INDEX, PENDING, ".lock")


def _check_output(out: Path, identity: dict[str, Any]) -> bool:
    """True when ``out`` holds this finished cache; False when it is to be (re)written; UserError when it holds
    something else."""
    if (out / INDEX).is_file():
        index = json.loads((out / INDEX).read_text(encoding="utf-8"))
        if _comparable(index) != _comparable(identity):
            raise UserError(f"output: {out} holds a logit cache of another config or teacher or data; remove it "
                            "or choose another")
        return True
    if (out / PENDING).is_file():
        pending = json.loads((out / PENDING).read_text(encoding="utf-8"))
        if _comparable(pending) != _comparable(identity):
            raise UserError(f"output: {out} holds part of a logit cache of another config or teacher or data; "
                            "remove it or choose another")
        return False
    if out.is_dir():
        # Besides the lock: what a run killed while writing its first files leaves (fsutil's and write_shard's
        # temporary names).
        ours = (".pending.json.part", ".index.json.part")
        strangers = [p.name for p in out.iterdir()
                     if p.name not in _KNOWN and p.name not in ours and not p.name.startswith(".shard-")]
        if strangers:
            raise UserError(f"output: {out} exists and is not a logit cache ({strangers[0]}); remove it or choose "
                            "another")
    return False


def validate_cache_logits(cfg: CacheLogitsConfig) -> None:
    """Every check of ``cache-logits`` that needs no compute."""
    check_can_create(cfg.output, "output", directory=True)
    teacher = read_model_config(resolve_model_dir(cfg.teacher))
    check_divisible(teacher, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    if cfg.top_k > teacher.vocab_size:
        raise UserError(f"top_k {cfg.top_k} exceeds the teacher's vocabulary ({teacher.vocab_size} tokens)")
    for component in prepared_components(cfg.data, "data"):
        data, meta = component.path, component.meta
        if meta.get("vocab_size", 0) > teacher.vocab_size:
            raise UserError(f"data: {data} was tokenized with {meta['vocab_size']} token ids, more than the "
                            f"teacher's vocab_size {teacher.vocab_size}")
        tokens = meta.get("num_train_tokens")
        if tokens is not None and tokens < cfg.seq_length + 1:
            raise UserError(f"data: the train split of {data} has {tokens} tokens, fewer than one window of "
                            f"seq_length + 1 = {cfg.seq_length + 1}")
    check_model(cfg.teacher)
    _check_output(Path(cfg.output), cache_identity(cfg))


def _window_arrays(results: list[dict[str, torch.Tensor]], hashes: list[int], seq: int, k: int,
                   dtype: str) -> dict[str, np.ndarray]:
    lp = torch.cat([r["logprobs"] for r in results]).reshape(-1, seq, k)
    if dtype == "bfloat16":
        logprobs = lp.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        logprobs = lp.to(torch.float32).numpy()
    return {
        "window_hash": np.array(hashes, dtype=np.uint64),
        "ids": torch.cat([r["ids"] for r in results]).reshape(-1, seq, k).to(torch.int32).numpy(),
        "log_tail": torch.cat([r["log_tail"] for r in results]).reshape(-1, seq).to(torch.float32).numpy(),
        "logprobs": logprobs,
    }


def run_cache_logits(cfg: CacheLogitsConfig) -> dict[str, Any]:
    """The ``cache-logits`` stage: the teacher's top-k on the distillation's windows, shard by shard.

    Data-parallel ranks (started by a launcher) take shards in turn; in each model-parallel group the last
    stage's first TP rank writes. Shards already on disk are kept. Global rank 0 writes the index at the end.
    """
    state.initialize(cfg.parallel, cfg.seed)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out = Path(cfg.output)
    start = time.perf_counter()
    lock = DirectoryLock(out, "output")
    error, done, identity = None, False, None
    if rank0:
        try:
            lock.__enter__()
            identity = cache_identity(cfg)
            done = _check_output(out, identity)
            if not done:
                atomic_write_text(out / PENDING, json.dumps(identity, indent=1))
                for stale in out.glob(".shard-*.tmp-*"):  # left by a run killed while writing a shard
                    stale.unlink(missing_ok=True)
        except UserError as exc:
            error = str(exc)
    try:
        state.raise_rank0_error(error)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [done]
            dist.broadcast_object_list(box, src=0)
            done = box[0]
        written = 0
        if not done:
            written = _write_shards(cfg, out)
            if dist.is_initialized():
                dist.barrier()
            error = None
            if rank0:
                try:
                    _write_index(cfg, out, identity)
                except OSError as exc:
                    error = f"cannot write {out / INDEX}: {exc.strerror or exc}"
            state.raise_rank0_error(error)
    finally:
        if rank0:
            lock.__exit__()
    index = read_index(out)
    total = index["windows"] * index["seq_length"]
    size = sum(s["bytes"] for s in index["shards"])
    seconds = time.perf_counter() - start
    return {"output": str(out), "windows": index["windows"], "tokens": total, "top_k": index["top_k"],
            "dtype": index["dtype"], "shards": len(index["shards"]), "shards_written_here": written,
            "bytes": size, "bytes_per_token": size / total, "seconds": seconds}


def _write_index(cfg: CacheLogitsConfig, out: Path, identity: dict[str, Any]) -> None:
    shards = []
    for n in range(num_shards(cfg.num_windows(), cfg.windows_per_shard)):
        f = out / shard_name(n)
        shards.append({"file": f.name, "first_window": n * cfg.windows_per_shard,
                       "windows": len(shard_windows(n, cfg.num_windows(), cfg.windows_per_shard)),
                       "bytes": f.stat().st_size, "sha256": _sha256(f)})
    index = {**identity, "bytes_per_token": bytes_per_token(cfg.top_k, cfg.dtype), "shards": shards}
    atomic_write_text(out / INDEX, json.dumps(index, indent=1))
    (out / PENDING).unlink(missing_ok=True)


def _write_shards(cfg: CacheLogitsConfig, out: Path) -> int:
    """Compute and write this data-parallel rank's missing shards; the number written here."""
    teacher = load_model(cfg.teacher, dtype=torch_dtype(cfg.teacher_dtype))
    pair = DistillationPair(teacher.model, None)  # the teacher in the student's seat: final hidden states out
    pair.model_type = teacher.model.model_type  # read by megatron's schedules
    vocab, k, seq = teacher.cfg.vocab_size, cfg.top_k, cfg.seq_length
    sampler = train_sampler(cfg.data, seq, 1, seed=cfg.seed)
    writer = state.is_last_stage() and state.tp_rank() == 0
    windows, per_shard = cfg.num_windows(), cfg.windows_per_shard

    def loss_fn(hidden: torch.Tensor, _labels: torch.Tensor):
        lp, ids, tail = teacher_top_k(hidden.reshape(-1, hidden.shape[-1]), output_weight(teacher.model), vocab, k,
                                      cfg.chunk_tokens)
        return torch.zeros(()), {"logprobs": lp, "ids": ids, "log_tail": tail}

    written = 0
    try:
        for n in range(state.dp_rank(), num_shards(windows, per_shard), state.dp_size()):
            path = out / shard_name(n)
            span = shard_windows(n, windows, per_shard)
            if path.is_file() and path.stat().st_size == shard_bytes(len(span), seq, k, cfg.dtype):
                continue
            rows = [np.asarray(sampler.sample(i), dtype=np.int64) for i in span]
            tokens = torch.from_numpy(np.stack(rows))
            mb = cfg.micro_batch_size
            full = len(rows) // mb * mb
            groups = [[tokens[i : i + mb] for i in range(0, full, mb)]]
            if full < len(rows):  # the last shard's remainder: one smaller micro-batch of its own
                groups.append([tokens[full:]])
            results: list[dict[str, torch.Tensor]] = []
            with torch.no_grad():
                for micro_batches in groups:
                    if micro_batches:
                        results += forward_backward(pair, micro_batches, loss_fn, forward_only=True)
            if writer:
                write_shard(path, _window_arrays(results, [window_hash(r) for r in rows], seq, k, cfg.dtype),
                            seq, k, cfg.dtype)
                written += 1
    finally:
        pair.restore()
    return written


# ------------------------------------------------------------------------------------------ the trainer's seam


class CachedTeacher:
    """Where a distillation's teacher outputs come from when they are cached: :meth:`read_step` reads the targets
    of a step's micro-batches (last pipeline stage only), :meth:`loss` takes them in order, one micro-batch per
    call, as megatron's schedules compute the micro-batches' losses in their order."""

    def __init__(self, cfg: TeacherCacheConfig, data: DataSource, train: TrainConfig, loss: LossConfig,
                 student_dir: Path, student: ModelConfig) -> None:
        try:
            check_cache_loss(loss)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        check_teacher_cache(cfg, data, train, student_dir, student.vocab_size, None)
        self.cache = LogitCache(cfg.path, cfg.top_k)
        self.train = train
        self.kd = CachedLogitKD(loss.logits, student.vocab_size, cfg.tail)
        self.pending: list[CachedTargets] = []

    def read_step(self, step: int, micro_batches: list[torch.Tensor]) -> None:
        self.pending = []
        if not state.is_last_stage():
            return
        for micro, tokens in enumerate(micro_batches):
            windows = self.cache.step_windows(step, micro, self.train.micro_batch_size,
                                              self.train.global_batch_size, state.dp_rank(), state.dp_size())
            self.pending.append(self.cache.targets(windows, tokens))

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """CachedLogitKD of the next micro-batch: hidden [T, h], this rank's output weight, labels [T]."""
        targets = self.pending.pop(0)
        device = hidden.device
        return self.kd(hidden, weight, targets.logprobs.to(device), targets.ids.to(device),
                       targets.log_tail.to(device), labels)
