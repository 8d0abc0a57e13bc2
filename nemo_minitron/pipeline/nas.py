"""Architecture search (Minitron §NAS): which pruned shape, among those within a parameter budget, recovers best.

Importance is computed once; every candidate is cut from the same scores and ranked by its held-out loss
right after pruning; the best ``top_k`` get a short distillation each and are ranked again (the ranking can
change: that is why the paper distils before choosing). The stage entry is :func:`run_nas`.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from nemo_minitron.checkpoint.hf import check_exportable
from nemo_minitron.checkpoint.io import LoadedModel, load_model, read_model_config, resolve_model_dir, save_checkpoint
from nemo_minitron.data import DataSource, HeldOut, heldout_sets, prepared_components
from nemo_minitron.distill.cache import check_cache_fits, read_index, run_cache_logits
from nemo_minitron.distill.config import CacheLogitsConfig, CheckpointConfig, LogConfig, TeacherCacheConfig
from nemo_minitron.distill.trainer import check_fp8_train, distill
from nemo_minitron.dtypes import torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.loss import windows_loss_sums
from nemo_minitron.models.builder import check_fp8_shapes
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.config import ParallelConfig
from nemo_minitron.parallel.sharding import check_divisible
from nemo_minitron.pipeline.config import NASConfig, NASStageConfig, RunDistill
from nemo_minitron.prune.config import WIDTH_KEYS, PruneTarget
from nemo_minitron.prune.stage import calibration_batches, cut, heatmap_png, resolved_dtype, score, target_config

SEARCH_KEYS = (*WIDTH_KEYS, "num_layers")


def budget(params: float, reference: ModelConfig) -> int:
    """Absolute parameter budget: ``params`` is a fraction of ``reference`` when <= 1, a count otherwise."""
    return round(params * reference.num_params()) if params <= 1 else int(params)


def candidates(src: ModelConfig, cfg: NASConfig, max_params: int, tp: int = 1, pp: int = 1,
               fp8: bool = False) -> list[PruneTarget]:
    """Targets from the search space that ``src`` can be cut to, that split into ``tp``/``pp``, that
    transformers can load (with ``fp8``: that FP8 GEMMs accept), and whose parameter count is in
    ``[max_params * (1 - tolerance), max_params]``; largest first, at most ``max_candidates``."""
    axes = [getattr(cfg.search, k) or [getattr(src, k)] for k in SEARCH_KEYS]
    found: list[tuple[int, PruneTarget]] = []
    for values in itertools.product(*axes):
        target = PruneTarget(**dict(zip(SEARCH_KEYS, values)))
        try:
            shape = target_config(src, target)
            check_divisible(shape, tp, pp)
            check_exportable(shape)
            if fp8:
                check_fp8_shapes(shape, tp)
        except UserError:
            continue
        n = shape.num_params()
        if max_params * (1 - cfg.tolerance) <= n <= max_params:
            found.append((n, target))
    found.sort(key=lambda item: -item[0])
    return [target for _, target in found[: cfg.max_candidates]]


def name_of(target: PruneTarget) -> str:
    short = {"hidden_size": "h", "ffn_hidden_size": "ffn", "num_attention_heads": "heads",
             "num_query_groups": "groups", "num_layers": "L"}
    return "-".join(f"{short[k]}{getattr(target, k)}" for k in SEARCH_KEYS)


def cache_config(teacher: str, data: DataSource, output: str, distill: RunDistill, windows: int,
                 parallel: ParallelConfig) -> CacheLogitsConfig:
    """The ``cache-logits`` config of ``distill.teacher_cache`` (auto): ``windows`` windows of the order that
    ``distill``'s distillations read ``data`` in (its seq_length and seed), from ``teacher`` in its
    ``train.teacher_dtype``."""
    auto, train = distill.teacher_cache, distill.train
    return CacheLogitsConfig(teacher=teacher, data=data, output=output, seq_length=train.seq_length,
                             seed=train.seed, windows=windows, top_k=auto.top_k, dtype=auto.dtype,
                             teacher_dtype=train.teacher_dtype, micro_batch_size=train.micro_batch_size,
                             windows_per_shard=16 * train.micro_batch_size,
                             chunk_tokens=distill.loss.logits.chunk_tokens, parallel=parallel)


def check_cache_top_k(distill: RunDistill, vocab_size: int) -> None:
    """One-line UserError when ``distill.teacher_cache`` (auto) asks for more tokens than the vocabulary has."""
    if distill.teacher_cache is not None and distill.teacher_cache.top_k > vocab_size:
        raise UserError(f"distill.teacher_cache.top_k {distill.teacher_cache.top_k} exceeds the teacher's "
                        f"vocabulary ({vocab_size} tokens)")


def _teacher_cache(cfg: NASStageConfig) -> TeacherCacheConfig | None:
    """The cache the short distillations read: the one given, or with distill.teacher_cache auto one written
    now under ``output``; None when they run the teacher."""
    if cfg.teacher_cache is not None or not cfg.nas.short_kd_tokens:
        return cfg.teacher_cache if cfg.nas.short_kd_tokens else None
    if cfg.distill.teacher_cache is None:
        return None
    path = str(Path(cfg.output) / "teacher_cache")
    run_cache_logits(cache_config(cfg.teacher, cfg.data, path, cfg.distill,
                                  cfg.distill.windows(cfg.nas.short_kd_tokens), cfg.parallel))
    return cfg.distill.cache_reader(path)


def _search(cfg: NASStageConfig) -> list[PruneTarget]:
    """The candidates of ``cfg`` in the model's parameter budget (none: a one-line error)."""
    src = read_model_config(resolve_model_dir(cfg.model))
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    limit = budget(cfg.params, src)
    found = candidates(src, cfg.nas, limit, tp, pp, fp8=bool(cfg.distill.train.fp8))
    if not found:
        raise UserError(f"nas: no candidate of the search space has {limit * (1 - cfg.nas.tolerance):,.0f}.."
                        f"{limit:,} parameters (the model has {src.num_params():,}); widen nas.search or tolerance")
    return found


def validate(cfg: NASStageConfig) -> None:
    """Every check that needs no compute: the inputs exist, the model splits into TP/PP, there are candidates."""
    src = read_model_config(resolve_model_dir(cfg.model))
    read_model_config(resolve_model_dir(cfg.teacher))
    check_divisible(src, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    train = cfg.distill.train
    if train.fp8:
        # Candidates are distilled in FP8 here or, the winner, later in the run: only FP8-able shapes qualify.
        check_fp8_train(train.fp8, train.seq_length, train.compile)
    _search(cfg)
    prepared_components(cfg.data, "data")
    check_cache_top_k(cfg.distill, read_model_config(resolve_model_dir(cfg.teacher)).vocab_size)
    if cfg.teacher_cache is not None and cfg.nas.short_kd_tokens:
        # The candidates do not exist yet: the tokenizer checked is the source model's, which they keep.
        check_cache_fits(read_index(cfg.teacher_cache.path), data=cfg.data, seq_length=train.seq_length,
                         seed=train.seed, windows_needed=cfg.distill.windows(cfg.nas.short_kd_tokens),
                         student_dir=resolve_model_dir(cfg.model), student_vocab=src.vocab_size, teacher=cfg.teacher,
                         top_k=cfg.teacher_cache.top_k)
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise UserError(f"output directory already exists: {cfg.output} (set overwrite=true to replace it)")


def _heldout_windows(cfg: NASStageConfig) -> list[HeldOut]:
    """The ranking windows: ``nas.eval_windows`` of each component of ``data`` (one for a single dataset)."""
    return heldout_sets(cfg.data, cfg.distill.train.seq_length, cfg.nas.eval_windows)


def _heldout_loss(loaded: LoadedModel, sets: list[HeldOut], micro_batch_size: int) -> float:
    """Held-out loss on ``sets``: each component's on its own windows, weighted as the blend."""
    loaded.model.eval()
    loss = 0.0
    for heldout in sets:
        total, count = windows_loss_sums(loaded.model, loaded.cfg.vocab_size, heldout.windows, micro_batch_size)
        loss += heldout.weight * (total / count)
    return loss


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def run_nas(cfg: NASStageConfig) -> dict:
    """Rank every candidate after pruning, distil the ``top_k`` briefly, rank again; write ``nas.json`` and
    the short-listed candidates (``candidates/<name>/pruned`` and ``.../short_kd``) under ``output``."""
    found = _search(cfg)
    state.initialize(cfg.parallel, cfg.seed)
    out = Path(cfg.output)
    if _is_writer() and out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    cache = _teacher_cache(cfg)
    if cache is not None:
        state.initialize(cfg.parallel, cfg.seed)  # the same random state as without the cache
    dtype = torch_dtype(resolved_dtype(cfg.prune_dtype, cfg.model))
    loaded = load_model(cfg.model, dtype=dtype, use_te=False)
    scored = score(loaded, calibration_batches(cfg.calibration), cfg.importance, progress=cfg.calibration.progress,
                   grams=cfg.prune_correction == "lsq")
    if _is_writer():
        out.mkdir(parents=True, exist_ok=True)
        heatmap = {"importance": scored.scores.to_json(loaded.cfg.num_query_groups), "dropped_layers": []}
        (out / "importance.png").write_bytes(heatmap_png(heatmap))
    windows = _heldout_windows(cfg)
    mb = cfg.distill.train.micro_batch_size
    table = []
    for target in found:
        pruned, report = cut(loaded, scored, target, calibration_loss=False, correction=cfg.prune_correction,
                             damping=cfg.prune_correction_damping)
        table.append({
            "name": name_of(target),
            "target": {k: getattr(target, k) for k in SEARCH_KEYS},
            "params": report["target_params"],
            "param_ratio": report["param_ratio"],
            "dropped_layers": report["dropped_layers"],
            "loss_pruned": _heldout_loss(pruned, windows, mb),
        })
        del pruned
        if _is_writer():
            row = table[-1]
            print(f"[nas] {row['name']}: {row['params'] / 1e6:.1f}M parameters, held-out loss after pruning "
                  f"{row['loss_pruned']:.4f}", flush=True)
    table.sort(key=lambda row: row["loss_pruned"])
    for rank, row in enumerate(table, 1):
        row["rank_pruned"] = rank
    fp8, sp = cfg.distill.train.fp8, cfg.distill.train.sequence_parallel
    teacher = (load_model(cfg.teacher, dtype=torch_dtype(cfg.distill.train.teacher_dtype), fp8=fp8,
                          sequence_parallel=sp)
               if cfg.nas.short_kd_tokens and cache is None else None)
    shortlist = table[: cfg.nas.top_k]
    for row in shortlist:
        home = out / "candidates" / row["name"]
        pruned, _ = cut(loaded, scored, PruneTarget(**row["target"]), calibration_loss=False,
                        correction=cfg.prune_correction, damping=cfg.prune_correction_damping)
        save_checkpoint(pruned, home / "pruned", overwrite=True)
        del pruned
        row["pruned"] = str(home / "pruned")
        if not cfg.nas.short_kd_tokens:
            row["loss_short_kd"], row["student"] = row["loss_pruned"], row["pruned"]
            continue
        student = load_model(row["pruned"], dtype=torch_dtype(cfg.distill.train.dtype), fp8=fp8, sequence_parallel=sp,
                             recompute=cfg.distill.train.recompute)
        result = distill(
            student, teacher, cfg.data, home / "short_kd",
            cfg.distill.train.for_tokens(cfg.nas.short_kd_tokens),
            cfg.distill.optim, cfg.distill.loss,
            CheckpointConfig(every_steps=10**9, keep_last=1, resume=False, keep_when_done=False),
            cfg.distill.eval.model_copy(update={"every_steps": 0}),
            LogConfig(tensorboard=False, progress=cfg.distill.log.progress),
            teacher_cache=cache,
        )
        save_checkpoint(student, home / "short_kd" / "final", overwrite=True)
        del student
        row["student"] = str(home / "short_kd" / "final")
        # Scored like the pruned candidates: a plain model (the trainer's student computes the loss from hidden
        # states) in the same precision, on the same windows.
        distilled = load_model(row["student"], dtype=dtype, use_te=False)
        row["loss_short_kd"] = _heldout_loss(distilled, windows, mb)
        row["short_kd_tokens"] = result.tokens
        del distilled
        if _is_writer():
            print(f"[nas] {row['name']}: held-out loss after {result.tokens:,} distillation tokens "
                  f"{row['loss_short_kd']:.4f}", flush=True)
    ranked = sorted(shortlist, key=lambda row: row["loss_short_kd"])
    for rank, row in enumerate(ranked, 1):
        row["rank_short_kd"] = rank
    best = ranked[0]
    summary = {
        "budget_params": budget(cfg.params, loaded.cfg),
        "source_params": loaded.cfg.num_params(),
        "candidates": table,
        "best": best["name"],
        "best_pruned": best["pruned"],
        "best_student": best["student"],
        "ranking_changed": [r["name"] for r in shortlist] != [r["name"] for r in ranked],
        "short_kd_tokens_total": sum(r.get("short_kd_tokens", 0) for r in shortlist),
        "teacher_cache": None if cache is None else cache.path,
        "heldout_tokens": sum(len(h.windows) for h in windows) * (cfg.distill.train.seq_length - 1),
        "seconds": time.perf_counter() - start,
        "importance_seconds": scored.seconds,
        "correction": cfg.prune_correction,
    }
    if _is_writer():
        (out / "nas.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

