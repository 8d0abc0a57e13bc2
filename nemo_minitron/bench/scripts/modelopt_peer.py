"""NVIDIA ModelOpt's Minitron pruning (mode ``mcore_minitron``) next to ours, on the same teacher and batches.

    .venv/bin/python benchmarks/modelopt_peer.py conf/prune/smollm2_width_55.yaml [key=value ...] \\
        [--workdir runs/bench/modelopt] [--eval conf/eval/teacher.yaml] [--repeats 1] [--overwrite] \\
        [--correction [--also hidden_size=378,ffn_hidden_size=640,num_attention_heads=6 ...]]

The prune config gives the teacher, the width/depth target and the calibration set (``key=value`` overrides
as for ``nemo-minitron prune``, e.g. ``calibration.num_samples=64``). In one process, on one rank (TP=1,
PP=1), both pruners score the teacher on the same calibration micro-batches and write a nemo_minitron
checkpoint each, ``<workdir>/ours`` and ``<workdir>/modelopt``, which ``eval`` and ``distill`` read as they
read any pruned model. Printed (and written to ``<workdir>/comparison.json``): the time of our importance
estimation, of our whole pruning and of ModelOpt's pruning call (its importance estimation, sorting and
slicing; the fastest of ``--repeats`` alternating runs), the share of our kept units that ModelOpt keeps too,
and with ``--eval`` the held-out loss of the teacher and both students.

With ``--correction`` (and ``--eval``), our pruning is also scored once more with the input Grams of weight
correction (``correction: lsq``; the time of that pass is printed beside the plain one) and cut to the target and
to every ``--also`` target (comma-separated ``key=value`` sizes) twice, with ``correction`` none and lsq
(``correction_damping`` of the prune config), and with lsq on ``linear_fc2`` and ``linear_proj`` alone: the
held-out losses, side by side, go under ``correction``.

ModelOpt is a peer, not a dependency: ``make install-modelopt`` installs ``nvidia-modelopt==0.43.0``, the
last release whose ``mcore_minitron`` runs without Transformer Engine. On CPU it needs three fixes, applied
only while it runs (:func:`modelopt_cpu_fixes`). ModelOpt keeps every query group (it prunes heads inside
them) and picks dropped layers itself, so a target with fewer query groups or an explicit ``drop_layers`` list
is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from nemo_minitron.checkpoint.io import LoadedModel, load_model, read_model_config, resolve_model_dir, save_checkpoint
from nemo_minitron.config import build_config, load_config
from nemo_minitron.data.blend import prepared_components
from nemo_minitron.dtypes import DTYPE_NAMES, torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.config import EvalConfig
from nemo_minitron.evaluation.loss import token_loss_sums, windows_loss_sums
from nemo_minitron.evaluation.stage import eval_tokens, evaluate
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.cpu import cuda_available
from nemo_minitron.parallel.sharding import gather_canonical
from nemo_minitron.prune.config import CalibrationConfig, ImportanceConfig, PruneConfig, PruneTarget
from nemo_minitron.prune.correction import LINEARS, PARTS
from nemo_minitron.prune.slicing import Selection, slice_canonical
from nemo_minitron.prune.stage import calibration_batches, cut, resolved_dtype, score, target_config, validate

MODELOPT_VERSION = "0.43.0"
# A reloaded checkpoint runs the same weights through the same code: its logits may differ by rounding only.
RELOAD_TOL = 1e-4


def require_modelopt() -> None:
    """One-line error unless the supported ModelOpt release is importable."""
    try:
        import modelopt
    except ImportError:
        raise UserError("NVIDIA ModelOpt is not installed "
                        f"(make install-modelopt: nvidia-modelopt=={MODELOPT_VERSION})") from None
    if modelopt.__version__ != MODELOPT_VERSION:
        raise UserError(f"nvidia-modelopt {modelopt.__version__} is installed; this comparison runs {MODELOPT_VERSION}")


@contextlib.contextmanager
def modelopt_cpu_fixes() -> Iterator[None]:
    """What ModelOpt 0.43.0's ``mcore_minitron`` needs to run on megatron-core's local spec on CPU, undone on exit:

    1. ``torch.nn.RMSNorm`` (the local spec's norm) registered as a ModelOpt dynamic module, whose weight
       loses the pruned hidden channels like the other norms ModelOpt knows;
    2. ``Tensor.cuda`` an identity when CUDA is absent (ModelOpt moves tensors to CUDA before collectives);
    3. gloo's ``all_gather_into_tensor`` given a 1-d tensor where ModelOpt passes a 0-d one (depth pruning).
    """
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry

    class _DynamicRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    registered = torch.nn.RMSNorm not in DMRegistry
    if registered:
        DMRegistry.register({torch.nn.RMSNorm: "nn.RMSNorm"})(_DynamicRMSNorm)
    tensor_cuda = torch.Tensor.cuda
    all_gather_into_tensor = dist.all_gather_into_tensor

    def gather_1d(output, input, *args, **kwargs):
        return all_gather_into_tensor(output, input.reshape(1) if input.dim() == 0 else input, *args, **kwargs)

    if not cuda_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    dist.all_gather_into_tensor = gather_1d
    try:
        yield
    finally:
        dist.all_gather_into_tensor = all_gather_into_tensor
        torch.Tensor.cuda = tensor_cuda
        if registered:
            DMRegistry.unregister(torch.nn.RMSNorm)


def export_config(src: ModelConfig, target: PruneTarget) -> dict[str, int]:
    """ModelOpt's ``export_config`` for ``target``; one-line error for what ModelOpt cannot prune."""
    if target.num_query_groups is not None and target.num_query_groups != src.num_query_groups:
        raise UserError(
            f"target.num_query_groups {target.num_query_groups}: ModelOpt keeps all {src.num_query_groups} query "
            "groups (it prunes heads inside them)"
        )
    if target.drop_layers is not None:
        raise UserError("target.drop_layers: ModelOpt chooses the layers to drop itself; give target.num_layers")
    new = target_config(src, target)
    keys = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers")
    return {k: getattr(new, k) for k in keys if getattr(target, k) is not None}


def modelopt_prune(loaded: LoadedModel, target: PruneTarget,
                   calibration: list[torch.Tensor]) -> tuple[LoadedModel, dict]:
    """``loaded`` pruned IN PLACE by ModelOpt's ``mcore_minitron`` to ``target``, its importance estimated on
    ``calibration`` micro-batches [b, s+1] (forward passes through our pipeline schedule, as our pruner does).

    Returns the pruned model and the seconds of ModelOpt's whole pruning call (``importance_s``: conversion,
    calibration passes, sorting, slicing) and of its calibration passes alone (``forward_loop_s``).
    """
    require_modelopt()
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    if state.tp_size() != 1 or state.pp_size() != 1:
        raise UserError("ModelOpt prunes at tensor_model_parallel_size 1 and pipeline_model_parallel_size 1 only")
    config = export_config(loaded.cfg, target)
    new_cfg = target_config(loaded.cfg, target)
    # ModelOpt's default search space only offers multiples of 256 (hidden) and 512 (MLP): allow every size.
    space = get_mcore_minitron_config(hidden_size_divisor=1, ffn_hidden_size_divisor=1, num_layers_divisor=1)
    loop_seconds = []

    def forward_loop(model) -> None:
        start = time.perf_counter()
        token_loss_sums(model, loaded.cfg.vocab_size, calibration)
        loop_seconds.append(time.perf_counter() - start)

    log = io.StringIO()  # ModelOpt prints every score it sorts by
    with modelopt_cpu_fixes(), contextlib.redirect_stdout(log):
        start = time.perf_counter()
        model, _ = mtp.prune(
            loaded.model,
            mode=[("mcore_minitron", space)],
            constraints={"export_config": config},
            dummy_input=None,
            config={"forward_loop": forward_loop},
        )
        seconds = time.perf_counter() - start
    model.eval()
    got = {k: getattr(model.config, k) for k in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers")}
    want = {k: getattr(new_cfg, k) for k in got}
    if got != want:
        raise RuntimeError(f"ModelOpt pruned to {got}, not to the target {want}")
    return LoadedModel(cfg=new_cfg, model=model, tokenizer_dir=loaded.tokenizer_dir), {
        "importance_s": seconds,
        "forward_loop_s": sum(loop_seconds),
    }


def _match_rows(reference: torch.Tensor, found: torch.Tensor, what: str) -> torch.Tensor:
    """For each row of ``found``, the index of the one equal row of ``reference``."""
    key = min(reference.shape[1], 32)
    candidates = (reference[:, None, :key] == found[None, :, :key]).all(-1)  # [R, N]
    index = []
    for j in range(found.shape[0]):
        hits = [i for i in candidates[:, j].nonzero().flatten().tolist() if torch.equal(reference[i], found[j])]
        if len(hits) != 1:
            raise RuntimeError(f"{what} {j} of the pruned model equals {len(hits)} of the source's, not one")
        index.append(hits[0])
    return torch.tensor(index)


def kept_units(source: dict[str, torch.Tensor], cfg: ModelConfig,
               pruned: dict[str, torch.Tensor], new_cfg: ModelConfig) -> Selection:
    """Which layers, channels, heads and neurons of ``source`` survive in ``pruned`` (both canonical state
    dicts), read off the weights, in the pruned model's order; error when ``pruned`` is not a slice of
    ``source`` at those units."""
    d, hpg, new_hpg = cfg.kv_channels, cfg.heads_per_group, new_cfg.heads_per_group
    emb = "embedding.word_embeddings.weight"
    channels = _match_rows(source[emb].T, pruned[emb].T, "hidden channel")

    def qkv(tensors: dict, layer: int, heads_per_group: int, ch: torch.Tensor | None = None) -> torch.Tensor:
        w = tensors[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"]
        w = (w if ch is None else w[:, ch]).reshape(cfg.num_query_groups, heads_per_group + 2, d, -1)
        return w.flatten(2)  # [groups, heads + k + v, d * h']

    # A layer is recognised by its k heads, which width pruning slices by channel only.
    src_k = torch.stack([qkv(source, i, hpg, channels)[:, hpg].flatten() for i in range(cfg.num_layers)])
    new_k = torch.stack([qkv(pruned, i, new_hpg)[:, new_hpg].flatten() for i in range(new_cfg.num_layers)])
    layers = _match_rows(src_k, new_k, "layer").tolist()
    groups, heads, neurons = {}, {}, {}
    for new, old in enumerate(layers):
        src_q, new_q = qkv(source, old, hpg, channels), qkv(pruned, new, new_hpg)
        groups[old] = torch.arange(cfg.num_query_groups)
        heads[old] = torch.stack([
            _match_rows(src_q[g, :hpg], new_q[g, :new_hpg], f"layer {new} group {g} head")
            for g in range(cfg.num_query_groups)
        ])
        gate = source[f"decoder.layers.{old}.mlp.linear_fc1.weight"][: cfg.ffn_hidden_size, channels]
        new_gate = pruned[f"decoder.layers.{new}.mlp.linear_fc1.weight"][: new_cfg.ffn_hidden_size]
        neurons[old] = _match_rows(gate, new_gate, f"layer {new} MLP neuron")
    selection = Selection(layers=layers, channels=channels, groups=groups, heads=heads, neurons=neurons)
    expected = slice_canonical(source, cfg, new_cfg, selection)
    for key, tensor in pruned.items():
        if not torch.equal(expected[key], tensor):
            raise RuntimeError(f"{key} of the pruned model is not the source's tensor sliced at its kept units")
    return selection


def logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return loaded.model(ids, pos, None)[..., : loaded.cfg.vocab_size].float()


def prune_with_modelopt(teacher: str, target: PruneTarget, calibration: CalibrationConfig, output: Path,
                        overwrite: bool = False, dtype: str = "float32") -> dict:
    """Prune ``teacher`` to ``target`` with ModelOpt on ``calibration`` and write a nemo_minitron checkpoint to
    ``output``, checked to reload with the in-memory pruned model's logits.

    Runs on one rank (TP=1, PP=1; initialises the process groups like ``nemo-minitron prune`` does).
    Returns ``importance_s`` and ``forward_loop_s`` (see :func:`modelopt_prune`), the pruned ``model_config``,
    its ``params``, the largest logit difference after reloading and the kept units (``selection``).
    """
    require_modelopt()
    output = Path(output)
    if dtype not in DTYPE_NAMES:
        raise UserError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
    export_config(read_model_config(resolve_model_dir(teacher)), target)
    prepared_components(calibration.data, "calibration.data")
    if output.exists() and not overwrite:
        raise UserError(f"output directory already exists: {output} (set overwrite=true to replace it)")
    state.initialize(state.ParallelConfig())
    batches = calibration_batches(calibration)
    loaded = load_model(teacher, dtype=torch_dtype(dtype), use_te=False)
    source = gather_canonical(loaded.model, loaded.cfg)
    source_cfg = loaded.cfg
    pruned, timing = modelopt_prune(loaded, target, batches)
    canonical = gather_canonical(pruned.model, pruned.cfg)
    selection = kept_units(source, source_cfg, canonical, pruned.cfg)
    probe = batches[0][:2, :-1]
    before = logits(pruned, probe)
    save_checkpoint(pruned, output, overwrite, extra_files={
        "modelopt_report.json": json.dumps({**timing, "selection": selection.to_json()}).encode(),
    })
    diff = (logits(load_model(str(output), dtype=torch_dtype(dtype), use_te=False), probe) - before).abs().max().item()
    if not diff <= RELOAD_TOL:
        raise RuntimeError(f"{output} reloads with logits {diff:.3g} away from ModelOpt's in-memory model")
    return {
        **timing,
        "model_config": pruned.cfg.model_dump(),
        "params": pruned.cfg.num_params(),
        "reload_max_abs_diff": diff,
        "selection": selection.to_json(),
    }


def overlap(ours: dict, theirs: dict) -> dict:
    """Share of our kept units that the other selection keeps too (both in ``Selection.to_json`` form), per
    kind; heads and neurons are averaged over the layers both keep."""

    def share(a: list, b: list) -> float:
        return len(set(a) & set(b)) / len(a)

    def heads_by_group(sel: dict, layer: str) -> dict[int, list[int]]:
        return dict(zip(sel["query_groups"][layer], sel["heads"][layer]))

    common = [k for k in ours["neurons"] if k in theirs["neurons"]]
    heads = []
    for k in common:
        mine, other = heads_by_group(ours, k), heads_by_group(theirs, k)
        heads.append(sum(len(set(h) & set(other.get(g, []))) for g, h in mine.items()) / sum(map(len, mine.values())))
    return {
        "layers": share(ours["layers"], theirs["layers"]),
        "channels": share(ours["channels"], theirs["channels"]),
        "heads": sum(heads) / len(heads),
        "neurons": sum(share(ours["neurons"][k], theirs["neurons"][k]) for k in common) / len(common),
    }


def timed_repeat(cfg: PruneConfig, batches: list[torch.Tensor]) -> tuple[float, float, float]:
    """One more timing of both pruners on fresh copies of the teacher, writing nothing: seconds of our
    :func:`score`, of our whole pruning (score and cut), and of ModelOpt's pruning call."""
    loaded = load_model(cfg.model, dtype=torch_dtype(cfg.dtype), use_te=False)
    start = time.perf_counter()
    scored = score(loaded, batches, cfg.importance)
    importance = time.perf_counter() - start
    cut(loaded, scored, cfg.target, calibration_loss=False)
    whole = time.perf_counter() - start
    del scored
    _, timing = modelopt_prune(load_model(cfg.model, dtype=torch_dtype(cfg.dtype), use_te=False), cfg.target, batches)
    return importance, whole, timing["importance_s"]


def parse_target(text: str) -> PruneTarget:
    """``hidden_size=378,ffn_hidden_size=640`` -> a target; one-line error for anything else."""
    sizes = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise UserError(f"--also {text!r}: give comma-separated key=integer sizes, e.g. hidden_size=378")
        sizes[key.strip()] = int(value)
    return build_config(PruneTarget, sizes)


def correction_table(loaded: LoadedModel, batches: list[torch.Tensor], targets: list[PruneTarget],
                     importance: ImportanceConfig, windows: list[torch.Tensor], micro_batch_size: int,
                     damping: float) -> dict:
    """Held-out loss on ``windows`` of ``loaded`` cut to each of ``targets`` with ``correction`` none, lsq on the
    readers of pruned neurons and heads only (``lsq_units``), lsq on every reader but without the norms' rescale
    (``lsq_linears``) and lsq (ridge ``damping``), from one scoring pass on ``batches`` that also accumulates the
    Grams (timed)."""
    start = time.perf_counter()
    scored = score(loaded, batches, importance, grams=True)
    seconds = time.perf_counter() - start
    rows = []
    # none; lsq on linear_fc2 and linear_proj only (the readers of pruned neurons and heads); lsq on all readers;
    # lsq on all readers with the RMS norms rescaled (all of lsq).
    arms = {"none": ("none", ()), "lsq_units": ("lsq", ("fc2", "proj")), "lsq_linears": ("lsq", tuple(LINEARS)),
            "lsq": ("lsq", PARTS)}
    for target in targets:
        loss = {}
        for name, (correction, refit) in arms.items():
            pruned, report = cut(loaded, scored, target, calibration_loss=False, correction=correction,
                                 damping=damping, refit=refit)
            total, count = windows_loss_sums(pruned.model, pruned.cfg.vocab_size, windows, micro_batch_size)
            loss[name] = total / count
            del pruned
        rows.append({"target": target.model_dump(exclude_none=True), "params": report["target_params"],
                     "param_ratio": report["param_ratio"], **{f"loss_{k}": v for k, v in loss.items()},
                     "gain_lsq": loss["none"] - loss["lsq"]})
    return {"importance_with_grams_s": seconds, "damping": damping, "eval_windows": len(windows), "rows": rows}


def compare(cfg: PruneConfig, workdir: Path, eval_cfg: EvalConfig | None = None, repeats: int = 1,
            correction_targets: list[PruneTarget] | None = None) -> dict:
    """Our pruner and ModelOpt's on ``cfg`` (one rank), each writing its student under ``workdir``; with
    ``correction_targets`` (which needs ``eval_cfg``), also :func:`correction_table` at those targets.

    The two are timed alternately ``repeats`` times; the fastest run of each counts (the machine may be busy).
    """
    require_modelopt()
    if cfg.parallel.model_parallel_size != 1:
        raise UserError("parallel: ModelOpt prunes at TP=1, PP=1 only; set both sizes to 1")
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, not {repeats}")
    validate(cfg)
    cfg = cfg.model_copy(update={"dtype": resolved_dtype(cfg.dtype, cfg.model)})  # as prune resolves it
    source_cfg = read_model_config(resolve_model_dir(cfg.model))
    export_config(source_cfg, cfg.target)
    if correction_targets is not None:
        if eval_cfg is None:
            raise UserError("--correction compares held-out losses: give --eval")
        for target in correction_targets:
            target_config(source_cfg, target)
    modelopt_dir = workdir / "modelopt"
    if modelopt_dir.exists() and not cfg.overwrite:
        raise UserError(f"output directory already exists: {modelopt_dir} (set overwrite=true to replace it)")
    state.initialize(cfg.parallel, cfg.seed)
    loaded = load_model(cfg.model, dtype=torch_dtype(cfg.dtype), use_te=False)
    batches = calibration_batches(cfg.calibration)
    start = time.perf_counter()
    scored = score(loaded, batches, cfg.importance, grams=cfg.correction == "lsq")
    ours_importance = [time.perf_counter() - start]
    pruned, report = cut(loaded, scored, cfg.target, calibration_loss=False, correction=cfg.correction,
                         damping=cfg.correction_damping)
    ours_prune = [time.perf_counter() - start]
    save_checkpoint(pruned, Path(cfg.output), cfg.overwrite)
    del loaded, scored, pruned
    theirs = prune_with_modelopt(cfg.model, cfg.target, cfg.calibration, modelopt_dir, cfg.overwrite, cfg.dtype)
    modelopt_seconds = [theirs["importance_s"]]
    for _ in range(repeats - 1):
        for runs, seconds in zip((ours_importance, ours_prune, modelopt_seconds), timed_repeat(cfg, batches)):
            runs.append(seconds)
    best = {"ours_importance": min(ours_importance), "ours_prune": min(ours_prune),
            "modelopt_prune": min(modelopt_seconds)}
    result = {
        "teacher": cfg.model,
        "target": report["target"],
        "params": {"teacher": report["source_params"], "ours": report["target_params"], "modelopt": theirs["params"]},
        "calibration": {"micro_batches": len(batches), "tokens": report["calibration_tokens"]},
        "seconds": {**best, "runs": {"ours_importance": ours_importance, "ours_prune": ours_prune,
                                     "modelopt_prune": modelopt_seconds}},
        "ratio_modelopt_over_ours": {
            "importance": best["modelopt_prune"] / best["ours_importance"],
            "prune": best["modelopt_prune"] / best["ours_prune"],
        },
        "overlap": overlap(report["selection"], theirs["selection"]),
        "reload_max_abs_diff": theirs["reload_max_abs_diff"],
        "students": {"ours": cfg.output, "modelopt": str(modelopt_dir)},
    }
    if eval_cfg is not None:
        result["eval_loss"] = {
            name: evaluate(eval_cfg.model_copy(update={"model": path, "output": None})).loss
            for name, path in (("teacher", cfg.model), *result["students"].items())
        }
    if correction_targets is not None:
        windows = eval_tokens(eval_cfg, resolve_model_dir(cfg.model))
        table = correction_table(load_model(cfg.model, dtype=torch_dtype(cfg.dtype), use_te=False), batches,
                                 [cfg.target, *correction_targets], cfg.importance, windows,
                                 eval_cfg.micro_batch_size, cfg.correction_damping)
        table["ratio_importance_with_grams"] = table["importance_with_grams_s"] / ours_importance[0]
        result["correction"] = table
    return result


def print_correction(table: dict) -> None:
    """The side-by-side held-out losses of :func:`correction_table`, on stderr."""
    print(f"held-out loss after pruning ({table['eval_windows']} windows), correction none vs lsq "
          f"(damping {table['damping']}); importance pass with Grams {table['importance_with_grams_s']:.1f} s "
          f"= {table['ratio_importance_with_grams']:.2f}x the plain pass", file=sys.stderr)
    for row in table["rows"]:
        shape = " ".join(f"{k}={v}" for k, v in row["target"].items())
        print(f"  {shape:<60} {row['param_ratio']:6.1%}  none {row['loss_none']:.4f}  "
              f"lsq fc2+proj {row['loss_lsq_units']:.4f}  lsq linears {row['loss_lsq_linears']:.4f}  "
              f"lsq {row['loss_lsq']:.4f}  gain {row['gain_lsq']:+.4f}",
              file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prune_config", help="a prune config (conf/prune/*.yaml): teacher, target, calibration")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the prune config")
    parser.add_argument("--workdir", default="runs/bench/modelopt", help="both students and comparison.json go here")
    parser.add_argument("--eval", metavar="EVAL_CONFIG",
                        help="an eval config (conf/eval/*.yaml) to score both students with")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each pruner, alternating; the fastest counts")
    parser.add_argument("--overwrite", action="store_true", help="replace the students of an earlier run")
    parser.add_argument("--correction", action="store_true",
                        help="also held-out losses with correction none and lsq at the target and the --also targets "
                             "(needs --eval)")
    parser.add_argument("--also", action="append", default=[], metavar="KEY=N,KEY=N",
                        help="another target of the --correction comparison (repeatable)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    try:
        cfg = load_config(PruneConfig, args.prune_config,
                          [*args.overrides, f"output={workdir / 'ours'}", f"overwrite={str(args.overwrite).lower()}"])
        eval_cfg = load_config(EvalConfig, args.eval) if args.eval else None
        if args.also and not args.correction:
            raise UserError("--also gives targets of the --correction comparison: add --correction")
        also = [parse_target(text) for text in args.also] if args.correction else None
        result = compare(cfg, workdir, eval_cfg, args.repeats, also)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        state.destroy()
    (workdir / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    if "correction" in result:
        print_correction(result["correction"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
