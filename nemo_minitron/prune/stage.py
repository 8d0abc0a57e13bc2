"""The ``prune`` stage: importance on a calibration set, then width and/or depth pruning.

One API call, :func:`prune`, takes a loaded model, a target and calibration batches and returns the pruned
model (built at the same TP/PP) with a report; :func:`run_prune` is the CLI stage around it, writing the
pruned checkpoint, ``importance.json``, ``importance.png`` and ``prune_report.json`` in one atomic step.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Optional

import torch

from nemo_minitron.checkpoint.integrity import check_model
from nemo_minitron.checkpoint.io import LoadedModel, load_model, read_model_config, resolve_model_dir, save_checkpoint
from nemo_minitron.data import prepared_components, train_sampler
from nemo_minitron.dtypes import Dtype, torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import check_can_create
from nemo_minitron.models.builder import build_model
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.exchange import Exchange, Part
from nemo_minitron.parallel.sharding import (
    canonical_shapes,
    check_divisible,
    fetch_canonical,
    held_keys,
    load_canonical_stream,
    shard_exchange,
)
from nemo_minitron.prune import correction as corr_lib
from nemo_minitron.prune import importance as imp_lib
from nemo_minitron.prune import layer_map as map_lib
from nemo_minitron.prune.config import (
    WIDTH_KEYS,
    CalibrationConfig,
    Correction,
    ImportanceConfig,
    PruneConfig,
    PruneTarget,
    importance_dtype,
)
from nemo_minitron.prune.slicing import Selection, bottom_k, select, slice_tensor, source_key


def target_config(src: ModelConfig, target: PruneTarget) -> ModelConfig:
    """The pruned architecture; one-line error when ``target`` cannot be cut from ``src``."""
    values = {k: getattr(target, k) or getattr(src, k) for k in WIDTH_KEYS}
    for key, value in values.items():
        if value > getattr(src, key):
            raise UserError(f"target.{key} {value} is larger than the source's {getattr(src, key)}")
    heads, groups = values["num_attention_heads"], values["num_query_groups"]
    if heads % groups:
        raise UserError(f"target.num_attention_heads {heads} is not divisible by target.num_query_groups {groups}")
    if heads // groups > src.heads_per_group:
        raise UserError(
            f"target has {heads // groups} heads per query group, more than the source's {src.heads_per_group}: "
            "heads are pruned within groups"
        )
    num_layers = src.num_layers
    if target.drop_layers is not None:
        bad = [i for i in target.drop_layers if i >= src.num_layers]
        if bad:
            raise UserError(f"target.drop_layers: layer {bad[0]} does not exist (the source has {src.num_layers})")
        num_layers = src.num_layers - len(target.drop_layers)
        if num_layers == 0:
            raise UserError("target.drop_layers removes every layer")
        if target.num_layers is not None and target.num_layers != num_layers:
            raise UserError(f"target.num_layers {target.num_layers} disagrees with drop_layers (leaves {num_layers})")
    elif target.num_layers is not None:
        if target.num_layers > src.num_layers:
            raise UserError(f"target.num_layers {target.num_layers} is larger than the source's {src.num_layers}")
        num_layers = target.num_layers
    # head_dim stays: fix it explicitly, since hidden/heads changes when either is pruned.
    return src.model_copy(update={**values, "num_layers": num_layers, "head_dim": src.kv_channels})


def resolved_dtype(dtype: Optional[Dtype], model: str) -> Dtype:
    """The precision of the importance passes over ``model`` (a reference as in configs):
    :func:`~nemo_minitron.prune.config.importance_dtype` of its parameter count."""
    return importance_dtype(dtype, read_model_config(resolve_model_dir(model)).num_params())


def validate(cfg: PruneConfig) -> None:
    """Every check that needs no compute."""
    src = read_model_config(resolve_model_dir(cfg.model))
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    check_divisible(src, tp, pp)
    target = target_config(src, cfg.target)
    try:
        check_divisible(target, tp, pp)
    except UserError as exc:
        raise UserError(f"target: {exc}") from None
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise UserError(f"output directory already exists: {cfg.output} (set overwrite=true to replace it)")
    check_can_create(cfg.output, "output", directory=True)
    prepared_components(cfg.calibration.data, "calibration.data")
    check_model(cfg.model)


def calibration_batches(cal: CalibrationConfig) -> list[torch.Tensor]:
    """This DP rank's calibration micro-batches [micro_batch_size, seq_length + 1] from the train split (of each
    component of a blend, in its proportions)."""
    sampler = train_sampler(cal.data, cal.seq_length, cal.micro_batch_size, seed=cal.seed,
                            dp_rank=state.dp_rank(), dp_size=state.dp_size())
    count = max(1, cal.num_samples // sampler.global_batch_size)
    batches = sampler.batches()
    return [next(batches) for _ in range(count)]


def _layers_to_drop(model, cfg: ModelConfig, target: ModelConfig, spec: PruneTarget, how: str,
                    batches: list[torch.Tensor], scores: imp_lib.Importance, progress: bool = False) -> list[int]:
    if spec.drop_layers is not None:
        return spec.drop_layers
    k = cfg.num_layers - target.num_layers
    if k == 0:
        return []
    if how == "block_importance":
        return bottom_k(scores.layers["block_importance"], k)
    if how == "drop_one":
        scores.layers["drop_one"] = imp_lib.drop_one_importance(model, cfg, batches, scores.calibration_loss,
                                                                progress=progress)
        return bottom_k(scores.layers["drop_one"], k)
    losses = imp_lib.contiguous_block_losses(model, cfg, batches, k, progress=progress)
    scores.layers[f"contiguous_block_loss_k{k}"] = losses
    # The block whose removal costs least; on a tie the later one, so that the lower layers are kept as
    # everywhere else.
    start = bottom_k(losses, 1)[0]
    return list(range(start, start + k))


@dataclass
class Scores:
    """Importance of ``loaded``'s units on a calibration set, computed once and usable for any target:
    the scores, the calibration batches (depth criteria that need forward passes and the pruned model's
    calibration loss use them), whether those passes show progress bars, and the input Grams of weight
    correction that this rank solves for (None unless asked). The removed layers' maps of ``cut``'s lsq
    correction are kept by (dropped layers, damping), so that cuts that drop the same layers (NAS candidates of
    one depth) make their calibration pass once."""

    scores: imp_lib.Importance
    calibration: list[torch.Tensor]
    importance: ImportanceConfig
    seconds: float
    progress: bool
    grams: Optional[dict[tuple[int, str], torch.Tensor]] = None
    maps: dict[tuple[tuple[int, ...], float], dict[int, torch.Tensor]] = field(default_factory=dict)


def score(loaded: LoadedModel, calibration: list[torch.Tensor],
          importance: ImportanceConfig = ImportanceConfig(), progress: bool = False, grams: bool = False) -> Scores:
    """Importance of every head, query group, neuron, channel and layer of ``loaded`` on ``calibration``
    micro-batches [b, s+1] (with ``progress``, bars over the passes, here and in :func:`cut`); with ``grams``,
    also the input Grams that ``cut(..., correction="lsq")`` needs (same pass; one-line error first when they
    cannot fit in memory)."""
    cfg, model = loaded.cfg, loaded.model
    if grams:
        corr_lib.check_memory(cfg)
    accumulator = corr_lib.GramAccumulator(cfg) if grams else None
    start = time.perf_counter()
    # Block importance and the calibration loss come from the hooked forward pass for every criterion.
    scores = imp_lib.activation_importance(model, cfg, calibration, importance.seq_agg, importance.batch_agg,
                                           progress, accumulator)
    owned = accumulator.finish() if accumulator is not None else None
    seconds = time.perf_counter() - start
    if importance.criterion != "activation":
        width = (
            imp_lib.magnitude_importance(model, cfg)
            if importance.criterion == "magnitude"
            else imp_lib.random_importance(cfg, importance.seed)
        )
        width.layers, width.calibration_loss, width.norm_energy = scores.layers, scores.calibration_loss, \
            scores.norm_energy
        scores = width
    return Scores(scores, calibration, importance, seconds, progress, owned)


def _cut_weights(loaded: LoadedModel, pruned_model, new_cfg: ModelConfig, selection: Selection,
                 refits: dict[str, tuple[int, str]], grams: Optional[dict[tuple[int, str], torch.Tensor]],
                 damping: float, maps: dict[int, torch.Tensor], norm_scales: dict[str, float]) -> None:
    """Fill this rank's shard ``pruned_model`` of ``new_cfg``, cut from ``loaded`` by ``selection``, with the
    tensors of ``refits`` re-fit (:func:`~nemo_minitron.prune.correction.refit_plan`; the ``linear_fc2`` of each
    layer in ``maps`` with its removed layers' map merged in) and the RMS norm weights of ``norm_scales`` (by
    source name) multiplied by their factor. No rank holds more than
    its shards and one full tensor in flight: each source tensor travels from the ranks that hold it to the
    ranks that need it (:mod:`nemo_minitron.parallel.exchange`), in one order on every rank."""
    cfg = loaded.cfg
    source = shard_exchange(loaded.model)
    names = list(canonical_shapes(new_cfg))
    needed = set(held_keys(pruned_model))
    # Weight correction first: the rank that holds a layer's Gram receives its full weight and solves it.
    solving = {source_key(key, selection): key for key, problem in refits.items() if problem in (grams or {})}
    corrected = {}
    order = [source_key(key, selection) for key in names if key in refits]
    for name, weight in fetch_canonical(source, cfg, order, solving):
        key = solving[name]
        old, kind = refits[key]
        corrected[key] = corr_lib.correct(weight, cfg, selection, old, kind, grams[(old, kind)], damping,
                                          maps.get(old) if kind == "fc2" else None)
    by_source = {source_key(key, selection): key for key in names if key not in refits}

    def sliced():
        wanted = [name for name, key in by_source.items() if key in needed]
        for name, full in fetch_canonical(source, cfg, list(by_source), wanted):
            tensor = slice_tensor(by_source[name], full, cfg, selection)
            yield by_source[name], tensor * norm_scales[name] if name in norm_scales else tensor

    def refitted():
        solved = Exchange({key: Part(0, 1, tensor) for key, tensor in corrected.items()})
        for key, parts in solved.deliver([key for key in names if key in refits], needed & set(refits)):
            yield key, parts[0]

    load_canonical_stream(pruned_model, new_cfg, chain(sliced(), refitted()))


def cut(loaded: LoadedModel, scored: Scores, target: PruneTarget, calibration_loss: bool = True,
        correction: Correction = "none", damping: float = 0.01,
        refit: tuple[str, ...] = corr_lib.PARTS) -> tuple[LoadedModel, dict]:
    """``loaded`` pruned to ``target`` by ``scored`` (from :func:`score` on the same model), at the same TP/PP,
    with a report of the selection and the calibration loss before and (unless not ``calibration_loss``,
    which saves a pass over the calibration set) after. ``correction`` lsq re-fits the linear layers that read
    pruned units and, when hidden channels are removed, rescales the RMS norms: the parts in ``refit`` (default:
    all, see :data:`~nemo_minitron.prune.correction.PARTS`), with ridge ``damping``
    (:mod:`nemo_minitron.prune.correction`; ``scored`` must hold the Grams: ``score(..., grams=True)``), and
    with ``fc2`` among them replaces removed layers by a linear map merged into the ``linear_fc2`` before them
    (:mod:`nemo_minitron.prune.layer_map`; one more calibration pass)."""
    cfg, model = loaded.cfg, loaded.model
    if correction == "lsq" and scored.grams is None:
        raise ValueError("correction lsq needs the Grams of the scoring pass: score(..., grams=True)")
    new_cfg = target_config(cfg, target)
    check_divisible(new_cfg, state.tp_size(), state.pp_size())
    scores, calibration = scored.scores, scored.calibration
    drop = _layers_to_drop(model, cfg, new_cfg, target, scored.importance.depth, calibration, scores,
                           scored.progress)
    keep = [i for i in range(cfg.num_layers) if i not in set(drop)]
    selection = select(scores, cfg, new_cfg, keep)
    pruned_model = build_model(new_cfg, dtype=next(model.parameters()).dtype, use_te=False, init=False)
    refits = corr_lib.refit_plan(selection.layers, refit) if correction == "lsq" else {}
    # Removed layers: one more calibration pass, for the maps merged into the linear_fc2 before them.
    maps = {}
    if correction == "lsq" and "fc2" in refit and drop:
        key = (tuple(drop), damping)
        if key not in scored.maps:
            scored.maps[key] = map_lib.layer_maps(model, cfg, calibration, drop, damping)
        maps = scored.maps[key]
    rescale = correction == "lsq" and "norms" in refit and new_cfg.hidden_size < cfg.hidden_size
    kept = {source_key(key, selection) for key in canonical_shapes(new_cfg)}
    scales = {name: scale for name, scale in corr_lib.norm_scales(scores.norm_energy, selection.channels).items()
              if name in kept} if rescale else {}
    _cut_weights(loaded, pruned_model, new_cfg, selection, refits, scored.grams, damping, maps, scales)
    pruned_model.eval()
    pruned_loss = imp_lib.lm_loss(pruned_model, new_cfg, calibration) if calibration_loss else None
    report = {
        "source": cfg.model_dump(),
        "target": new_cfg.model_dump(),
        "source_params": cfg.num_params(),
        "target_params": new_cfg.num_params(),
        "param_ratio": new_cfg.num_params() / cfg.num_params(),
        "criterion": scores.criterion,
        "correction": correction,
        "correction_damping": damping if correction == "lsq" else None,
        "layer_maps": sorted(maps),
        "norm_scales": scales,
        "depth_criterion": None if target.drop_layers is not None or not drop else scored.importance.depth,
        "dropped_layers": drop,
        "calibration_loss_before": scores.calibration_loss,
        "calibration_loss_after": pruned_loss,
        "calibration_tokens": sum(b.shape[0] * (b.shape[1] - 1) for b in calibration) * state.dp_size(),
        "importance_seconds": scored.seconds,
        "importance": scores.to_json(cfg.num_query_groups),
        "selection": selection.to_json(),
    }
    return LoadedModel(cfg=new_cfg, model=pruned_model, tokenizer_dir=loaded.tokenizer_dir), report


def prune(
    loaded: LoadedModel,
    target: PruneTarget,
    calibration: list[torch.Tensor],
    importance: ImportanceConfig = ImportanceConfig(),
    calibration_loss: bool = True,
    progress: bool = False,
    correction: Correction = "none",
    damping: float = 0.01,
) -> tuple[LoadedModel, dict]:
    """Prune ``loaded`` to ``target`` using importance from ``calibration`` micro-batches [b, s+1] (with
    ``progress``, bars over the passes that take long: importance and the depth criteria); ``correction`` lsq
    re-fits the layers that read pruned neurons, heads and channels (ridge ``damping``) on the same calibration
    pass and rescales the RMS norms of a model whose hidden channels are cut.

    Returns the pruned model (same TP/PP as ``loaded``) and a report with the scores and the selection (and,
    unless not ``calibration_loss``, the pruned model's calibration loss).
    """
    target_config(loaded.cfg, target)  # a bad target fails before the calibration passes
    scored = score(loaded, calibration, importance, progress, grams=correction == "lsq")
    return cut(loaded, scored, target, calibration_loss, correction, damping)


def heatmap_png(report: dict) -> bytes:
    """PNG: layer x head and layer x neuron importance, channel importance, layer scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = report["importance"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, key, title in ((axes[0, 0], "heads", "attention heads"), (axes[0, 1], "neurons", "MLP neurons")):
        # Units are ranked within their layer: each row is scaled by its maximum.
        values = torch.tensor(scores[key])
        values = values / values.amax(dim=1, keepdim=True).clamp_min(1e-30)
        im = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set(title=f"{title} ({scores['criterion']}, / layer max)", xlabel="index", ylabel="layer")
        fig.colorbar(im, ax=ax)
    axes[1, 0].plot(sorted(scores["channels"], reverse=True))
    axes[1, 0].set(title="embedding channels (sorted)", xlabel="rank", ylabel="importance", yscale="log")
    for name, values in scores["layers"].items():
        axes[1, 1].plot(values, marker="o", label=name)
    for layer in report["dropped_layers"]:
        axes[1, 1].axvline(layer, color="red", alpha=0.2)
    axes[1, 1].set(title="layer scores (red: dropped)", xlabel="layer")
    axes[1, 1].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run_prune(cfg: PruneConfig) -> dict:
    """CLI stage: load, calibrate, prune, write the pruned checkpoint with its importance and report."""
    state.initialize(cfg.parallel, cfg.seed)
    # Hooks read the norms' outputs, which Transformer Engine fuses away: calibrate on the local spec.
    dtype = resolved_dtype(cfg.dtype, cfg.model)
    loaded = load_model(cfg.model, dtype=torch_dtype(dtype), use_te=False)
    pruned, report = prune(loaded, cfg.target, calibration_batches(cfg.calibration), cfg.importance, cfg.pruned_loss,
                           progress=cfg.calibration.progress, correction=cfg.correction,
                           damping=cfg.correction_damping)
    summary = {k: v for k, v in report.items() if k not in ("importance", "selection", "source", "target")}
    summary["output"] = cfg.output
    summary["dtype"] = dtype
    files = {
        "importance.json": json.dumps(
            {"importance": report["importance"], "selection": report["selection"]}
        ).encode(),
        "importance.png": heatmap_png(report),
        "prune_report.json": json.dumps({**summary, "config": cfg.model_dump()}, indent=2).encode(),
    }
    save_checkpoint(pruned, Path(cfg.output), cfg.overwrite, extra_files=files)
    return summary
