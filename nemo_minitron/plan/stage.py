"""``nemo-minitron plan JOB.yaml cluster=CLUSTER.yaml``: per-GPU memory, tokens/s, wall time and checkpoint sizes of
each parallel stage of a job, before anything is submitted.

:func:`run_plan` is the entry point (a dict); :func:`plan_stage` is the CLI stage (prints a table or JSON);
:func:`check_launch` is what ``launch slurm`` asks before it writes anything. Architectures come from the
models' ``model_config.json`` / ``config.json`` (never weights), from a known name, or from ``plan.architecture``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import ValidationError

from nemo_minitron.bench.flops import flops_per_token
from nemo_minitron.config import format_validation_error, load_config, parse_overrides
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.models.known import KNOWN, known_config
from nemo_minitron.plan import memory as mem
from nemo_minitron.plan.config import PlanConfig
from nemo_minitron.plan.gpus import GB
from nemo_minitron.plan.settings import PlanSettings, Role
from nemo_minitron.prune.config import importance_dtype

USAGE = "usage: nemo-minitron plan JOB.yaml cluster=CLUSTER.yaml [stage=NAME] [plan.KEY=VALUE ...] [key=value ...]"
# Columns of a stage's per-GPU memory, in table order.
TERMS = ("teacher_weights", "weights", "gradients", "optimizer", "activations", "transient", "workspace")


# ---------------------------------------------------------------------------------------------- architectures


def architecture(role: Role, ref: str, settings: PlanSettings) -> tuple[ModelConfig, str]:
    """The architecture of the job's ``role`` model at ``ref``, and where it came from."""
    from nemo_minitron.checkpoint.io import read_model_config, resolve_model_dir

    given = settings.architecture.get(role)
    if isinstance(given, ModelConfig):
        return given, f"plan.architecture.{role}"
    if given is not None:
        cfg = known_config(given)
        if cfg is None:
            raise UserError(f"plan.architecture.{role}: '{given}' is not a known architecture "
                            f"(one of {', '.join(KNOWN)}; or give a model config)")
        return cfg, f"known: {given}"
    if not ref.startswith("embedded:"):  # (an embedded model would be prepared to be read: its name is known)
        try:
            return read_model_config(resolve_model_dir(ref)), f"{ref} (its config)"
        except UserError:
            pass
    cfg = known_config(ref)
    if cfg is None:
        raise UserError(f"{role}: {ref} is not a model directory on this machine and names no known architecture: "
                        f"give plan.architecture.{role}=NAME (one of {', '.join(KNOWN)}) or a model config")
    return cfg, f"known: {Path(ref.removeprefix('embedded:')).name}"


# ---------------------------------------------------------------------------------------------- stage plans


class Layout:
    def __init__(self, tp: int, pp: int, world: int) -> None:
        if world % (tp * pp):
            raise UserError(f"world size {world} is not divisible by TP*PP = {tp * pp} of the job config")
        self.tp, self.pp, self.world, self.dp = tp, pp, world, world // (tp * pp)


def _divisible(name: str, model: ModelConfig, layout: Layout, other: Optional[ModelConfig]) -> None:
    from nemo_minitron.parallel.sharding import check_divisible

    for cfg in (model, other):
        if cfg is not None:
            try:
                check_divisible(cfg, layout.tp, layout.pp)
            except UserError as exc:
                raise UserError(f"{name}: {exc}") from None


def _bytes(dtype: str) -> int:
    # A planned job runs on GPUs, where "auto" is bfloat16.
    return mem.DTYPE_BYTES["bfloat16" if dtype == "auto" else dtype]


def _seconds(tokens: Optional[int], flops: float, settings: PlanSettings, cluster_flops: float) -> dict:
    if tokens is None:
        return {"tokens": None, "model_flops_per_token": flops, "tokens_per_second": None, "seconds": None}
    rate = settings.mfu * cluster_flops / flops
    return {"tokens": tokens, "model_flops_per_token": flops, "tokens_per_second": rate, "seconds": tokens / rate}


def _finish(stage: dict, per_rank: list[dict], workspace: int, gpu_bytes: Optional[int]) -> dict:
    """The busiest rank's terms and total, and whether it fits."""
    for terms in per_rank:
        terms["workspace"] = workspace
        terms["total"] = sum(terms[k] for k in TERMS)
    busiest = max(per_rank, key=lambda t: t["total"])
    stage.update(memory=busiest, per_pipeline_stage=per_rank)
    stage["fits"] = None if gpu_bytes is None else busiest["total"] <= gpu_bytes
    stage["shortfall"] = None if gpu_bytes is None else max(0, busiest["total"] - gpu_bytes)
    return stage


def train_plan(name: str, trained: ModelConfig, frozen: Optional[ModelConfig], train, tokens: int,
               chunk_tokens: int, with_teacher_logits: bool, layout: Layout, settings: PlanSettings,
               cluster_flops: float, gpu_bytes: Optional[int], keep_checkpoints: int, fp32_norms: bool = False) -> dict:
    """A training stage: ``trained`` under megatron's DDP and distributed optimizer, ``frozen`` (a teacher)
    beside it in ``train.teacher_dtype``, the fused KD loss (a CE loss without ``with_teacher_logits``).
    ``fp32_norms``: as megatron's local spec builds the norms (on CPU); GPU jobs run the TE spec."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    _divisible(name, trained, layout, frozen)
    e, et = _bytes(train.dtype), _bytes(train.teacher_dtype)
    if train.global_batch_size % (train.micro_batch_size * dp):
        raise UserError(f"{name}: global_batch_size {train.global_batch_size} is not divisible by micro_batch_size "
                        f"x data-parallel size = {train.micro_batch_size * dp}")
    num_micro = train.global_batch_size // (train.micro_batch_size * dp)
    b = mem.Batch(train.seq_length, train.micro_batch_size, e, tp, train.sequence_parallel)
    bt = mem.Batch(train.seq_length, train.micro_batch_size, et, tp, train.sequence_parallel)
    rows = trained.padded_vocab_size(tp) // tp
    h_t = frozen.hidden_size if frozen is not None else 0
    per_rank = []
    for r in range(pp):
        first, last = r == 0, r == pp - 1
        states = [mem.trained_state(trained, e, tp, pp, dp, r, q, fp32_norms) for q in range(dp)]
        state = max(states, key=lambda s: s.optimizer)
        flight = mem.in_flight(pp, r, num_micro)
        layers = mem.stage_layers(trained, pp)
        saved = flight * layers * mem.layer_saved_bytes(trained, b, train.recompute, fp32_norms)
        # Between stages both hidden states travel as one tensor [T/sp, h_s + h_t], kept until backward.
        boundary = b.tokens // b.sp * (trained.hidden_size + h_t) * e
        saved += flight * boundary * ((not first) + (not last))
        working = mem.layer_working_bytes(trained, b)
        if train.recompute == "full":  # the layer recomputed for its backward holds its activations again
            working += mem.layer_saved_bytes(trained, b, None, fp32_norms)
        if frozen is not None:
            working = max(working, mem.forward_working_bytes(frozen, bt))
        loss = 0
        if last:
            saved += 2 * b.tokens // b.sp * trained.hidden_size * e  # the final norm's input and its copy
            loss = mem.kd_loss_bytes(rows, trained.hidden_size, b.tokens, chunk_tokens, e, with_teacher_logits)
            loss += b.tokens * trained.hidden_size * e + b.tokens * h_t * et  # both final hidden states
        per_rank.append({
            "pipeline_rank": r,
            "teacher_weights": 0 if frozen is None else mem.frozen_weights(frozen, et, tp, pp, r, fp32_norms),
            "weights": state.weights, "gradients": state.gradients, "optimizer": state.optimizer,
            "activations": saved, "kd_loss": loss, "transient": max(working, loss),
            "micro_batches_in_flight": flight,
        })
    options = {}
    for sp in ([False, True] if tp > 1 else [False]):
        for recompute in (None, "selective", "full"):
            ob = mem.Batch(train.seq_length, train.micro_batch_size, e, tp, sp)
            options[f"recompute={recompute or 'none'},sp={'on' if sp else 'off'}"] = (
                mem.in_flight(pp, 0, num_micro) * mem.stage_layers(trained, pp)
                * mem.layer_saved_bytes(trained, ob, recompute, fp32_norms))
    flops = flops_per_token(trained, train.seq_length, 3)
    if frozen is not None:
        flops += flops_per_token(frozen, train.seq_length, 1)
    padded = trained.model_copy(update={"vocab_size": trained.padded_vocab_size(tp)}).num_params()
    # A training checkpoint holds the weights, fp32 master copies and both Adam moments of every parameter once.
    checkpoint = padded * (e + 4 + 8)
    stage = {
        "name": name, "kind": "train", "params": trained.num_params(),
        "teacher_params": frozen.num_params() if frozen is not None else None,
        "seq_length": train.seq_length, "micro_batch_size": train.micro_batch_size,
        "global_batch_size": train.global_batch_size, "micro_batches_per_step": num_micro,
        "dtype": train.dtype, "sequence_parallel": train.sequence_parallel, "recompute": train.recompute,
        "activation_options_first_stage": options,
        **_seconds(tokens, flops, settings, cluster_flops),
        "checkpoint_bytes": checkpoint, "checkpoints_on_disk_bytes": checkpoint * keep_checkpoints,
        "final_model_bytes": trained.num_params() * e,
    }
    return _finish(stage, per_rank, int(settings.workspace_gb * GB), gpu_bytes)


def forward_plan(name: str, model: ModelConfig, dtype: str, seq_length: int, micro_batch_size: int,
                 tokens: Optional[int], passes: int, layout: Layout, settings: PlanSettings, cluster_flops: float,
                 gpu_bytes: Optional[int], also: Optional[ModelConfig] = None, logits: bool = True,
                 sequence_parallel: bool = False, host_bytes: int = 0) -> dict:
    """A forward-only stage (calibration, evaluation, the teacher's logit cache): the model's weights, one
    layer's working set, full logits for a loss; ``also`` a second model held beside it (the pruned one)."""
    tp, pp = layout.tp, layout.pp
    _divisible(name, model, layout, also)
    e = _bytes(dtype)
    b = mem.Batch(seq_length, micro_batch_size, e, tp, sequence_parallel)
    rows = model.padded_vocab_size(tp) // tp
    per_rank = []
    for r in range(pp):
        weights = mem.frozen_weights(model, e, tp, pp, r)
        if also is not None:
            weights += mem.frozen_weights(also, e, tp, pp, r)
        transient = mem.forward_working_bytes(model, b)
        if logits and r == pp - 1:
            transient = max(transient, mem.logits_bytes(rows, b.tokens, e))
        per_rank.append({"pipeline_rank": r, "teacher_weights": 0, "weights": weights, "gradients": 0,
                         "optimizer": 0, "activations": 0, "transient": transient})
    stage = {"name": name, "kind": "forward", "params": model.num_params(), "seq_length": seq_length,
             "micro_batch_size": micro_batch_size, "dtype": dtype, "passes": passes,
             "host_bytes_per_rank": host_bytes,
             **_seconds(None if tokens is None else tokens * passes, flops_per_token(model, seq_length, 1), settings,
                        cluster_flops)}
    return _finish(stage, per_rank, int(settings.workspace_gb * GB), gpu_bytes)


def export_plan(name: str, model: ModelConfig, dtype: str) -> dict:
    """Export runs on one process from the canonical checkpoint on the host: no GPU memory."""
    size = model.num_params() * _bytes(dtype)
    return {"name": name, "kind": "export", "params": model.num_params(), "dtype": dtype, "memory": None,
            "fits": None, "shortfall": None, "host_bytes_per_rank": size, "output_bytes": size, "tokens": None,
            "seconds": None}


# ---------------------------------------------------------------------------------------------- jobs


def _calibration_passes(prune_target, importance, pruned_loss: bool, num_layers: int) -> int:
    """Forward passes over the calibration set: the hooked importance pass, the depth search, the pruned loss."""
    passes = 1 + (1 if pruned_loss else 0)
    if prune_target.num_layers is not None and prune_target.drop_layers is None:
        dropped = num_layers - prune_target.num_layers
        if importance.depth == "drop_one":
            passes += num_layers
        elif importance.depth == "contiguous":
            passes += num_layers - dropped + 1
    return passes


def _plan_distill(cfg, ctx: dict) -> list[dict]:
    settings = ctx["settings"]
    student, source_s = architecture("student", cfg.student, settings)
    ctx["sources"]["student"] = source_s
    online = cfg.mode == "kd" and cfg.teacher_cache is None
    teacher = None
    if online:
        teacher, source_t = architecture("teacher", cfg.teacher, settings)
        ctx["sources"]["teacher"] = source_t
    tokens = cfg.train.steps() * cfg.train.global_batch_size * cfg.train.seq_length
    return [train_plan("distill", student, teacher, cfg.train, tokens, cfg.loss.logits.chunk_tokens,
                       cfg.mode == "kd", ctx["layout"], settings, ctx["flops"], ctx["gpu_bytes"],
                       cfg.checkpoint.keep_last)]


def _prune_host_bytes(model: ModelConfig, pruned: ModelConfig, dtype: str, layout: Layout) -> int:
    """Host memory of pruning on one rank: its shard of the source and of the pruned model, and one full tensor
    in flight (the largest, the embedding) while the shards are cut from tensors sent one at a time."""
    shards = (model.num_params() + pruned.num_params()) / (layout.tp * layout.pp)
    return int((shards + model.padded_vocab_size(layout.tp) * model.hidden_size) * _bytes(dtype))


def _plan_prune(cfg, ctx: dict) -> list[dict]:
    from nemo_minitron.prune.stage import target_config

    settings = ctx["settings"]
    model, source = architecture("model", cfg.model, settings)
    ctx["sources"]["model"] = source
    pruned = target_config(model, cfg.target)
    c = cfg.calibration
    passes = _calibration_passes(cfg.target, cfg.importance, cfg.pruned_loss, model.num_layers)
    dtype = importance_dtype(cfg.dtype, model.num_params())
    host = _prune_host_bytes(model, pruned, dtype, ctx["layout"])
    return [forward_plan("prune", model, dtype, c.seq_length, c.micro_batch_size, c.num_samples * c.seq_length,
                         passes, ctx["layout"], settings, ctx["flops"], ctx["gpu_bytes"], also=pruned,
                         host_bytes=host)]


def _plan_eval(cfg, ctx: dict) -> list[dict]:
    settings = ctx["settings"]
    if cfg.backend != "megatron":
        raise UserError(f"plan: eval backend {cfg.backend} runs one process outside megatron; only backend "
                        "megatron is planned")
    model, source = architecture("model", cfg.model, settings)
    ctx["sources"]["model"] = source
    tokens = None if cfg.max_windows is None else cfg.max_windows * cfg.seq_length
    return [forward_plan("eval", model, cfg.dtype, cfg.seq_length, cfg.micro_batch_size, tokens, 1, ctx["layout"],
                         settings, ctx["flops"], ctx["gpu_bytes"])]


def _plan_run(cfg, ctx: dict) -> list[dict]:
    from nemo_minitron.pipeline.nas import budget, candidates
    from nemo_minitron.pipeline.run import cache_windows
    from nemo_minitron.prune.stage import target_config

    settings, layout = ctx["settings"], ctx["layout"]
    teacher, source = architecture("teacher", cfg.teacher, settings)
    ctx["sources"]["teacher"] = source
    d, e = cfg.distill, cfg.eval
    common = (layout, settings, ctx["flops"], ctx["gpu_bytes"])
    stages = []
    if cfg.teacher_correction is not None:
        tc = d.train.for_tokens(cfg.teacher_correction.tokens)
        stages.append(train_plan("teacher_correction", teacher, None, tc, tc.steps() * tc.global_batch_size
                                 * tc.seq_length, d.loss.logits.chunk_tokens, False, layout, settings,
                                 ctx["flops"], ctx["gpu_bytes"], d.checkpoint.keep_last))
    windows = cache_windows(cfg)
    if windows:
        stages.append(forward_plan("teacher_cache", teacher, d.train.teacher_dtype, d.train.seq_length,
                                   d.train.micro_batch_size, windows * d.train.seq_length, 1, *common,
                                   sequence_parallel=d.train.sequence_parallel))
    eval_tokens = None if e.max_windows is None else e.max_windows * e.seq_length
    stages.append(forward_plan("eval.teacher", teacher, e.dtype, e.seq_length, e.micro_batch_size, eval_tokens, 1,
                               *common))
    shape = teacher
    c = cfg.calibration
    for i, step in enumerate(cfg.schedule, 1):
        if step.target is not None:
            target, kind = step.target, "prune"
        else:
            found = candidates(shape, cfg.nas, budget(step.params, teacher), layout.tp, layout.pp)
            if not found:
                raise UserError(f"schedule[{i - 1}]: nas: no candidate within the parameter budget")
            target, kind = found[0], "nas"  # the largest candidate: the search's heaviest distillation
        new = target_config(shape, target)
        passes = _calibration_passes(target, cfg.importance, False, shape.num_layers)
        dtype = importance_dtype(cfg.prune_dtype, shape.num_params())
        stages.append(forward_plan(f"step{i}.{kind}", shape, dtype, c.seq_length, c.micro_batch_size,
                                   c.num_samples * c.seq_length, passes, *common, also=new,
                                   host_bytes=_prune_host_bytes(shape, new, dtype, layout)))
        if step.kd_tokens:
            train = d.train.for_tokens(step.kd_tokens)
            frozen = None if d.teacher_cache is not None else teacher
            stages.append(train_plan(f"step{i}.distill", new, frozen, train,
                                     train.steps() * train.global_batch_size * train.seq_length,
                                     d.loss.logits.chunk_tokens, frozen is not None, layout, settings, ctx["flops"],
                                     ctx["gpu_bytes"], d.checkpoint.keep_last))
            stages.append(forward_plan(f"step{i}.eval_distilled", new, e.dtype, e.seq_length, e.micro_batch_size,
                                       eval_tokens, 1, *common))
        shape = new
    stages.append(export_plan("export", shape, d.train.dtype))
    return stages


_PLANNERS = {"run": _plan_run, "distill": _plan_distill, "prune": _plan_prune, "eval": _plan_eval}


def run_plan(cfg: PlanConfig) -> dict:
    """The plan of ``cfg.job`` on ``cfg.cluster``: per stage, the busiest GPU's memory by term and whether it fits,
    tokens/s at ``plan.mfu``, wall time and checkpoint sizes; and the job's totals."""
    cluster, settings = cfg.cluster, cfg.plan
    parallel = cfg.job.parallel
    gpus = cluster.nodes * (cluster.gpus_per_node or cluster.tasks_per_node)
    layout = Layout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                    cluster.nodes * cluster.tasks_per_node)
    gpu = cluster.gpu
    if cluster.gpus_per_node and gpu is None:
        raise UserError("cluster.gpu is needed to plan a GPU job: give cluster.gpu.type (or memory_gb and "
                        "peak_tflops)")
    gpu_bytes = gpu.memory_bytes() if gpu is not None and cluster.gpus_per_node else None
    cluster_flops = gpu.peak_flops() * gpus if gpu is not None and cluster.gpus_per_node else None
    ctx = {"settings": settings, "layout": layout, "gpu_bytes": gpu_bytes, "sources": {},
           # Without GPUs (a CPU cluster) there is no peak to scale: times are left out.
           "flops": cluster_flops or math.nan}
    stages = _PLANNERS[cfg.stage](cfg.job, ctx)
    if cluster_flops is None:
        for stage in stages:
            stage.update(tokens_per_second=None, seconds=None)
    timed = [s["seconds"] for s in stages if s.get("seconds") is not None]
    sized = [s for s in stages if s.get("memory")]
    busiest = max(sized, key=lambda s: s["memory"]["total"]) if sized else None
    return {
        "job": cfg.stage,
        "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                    "gpu": None if gpu is None else gpu.model_dump(exclude_none=True),
                    "gpu_memory_bytes": gpu_bytes, "peak_flops_per_gpu": None if gpu is None else gpu.peak_flops()},
        "layout": {"world": layout.world, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
        "assumptions": {"mfu": settings.mfu, "workspace_bytes": int(settings.workspace_gb * GB),
                        "architectures": ctx["sources"]},
        "stages": stages,
        "fits": None if gpu_bytes is None else all(s["fits"] for s in sized),
        "busiest_stage": None if busiest is None else busiest["name"],
        "seconds": sum(timed) if timed else None,
        "untimed_stages": [s["name"] for s in stages if s.get("seconds") is None],
    }


# ---------------------------------------------------------------------------------------------- rendering


def _gb(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / GB:.1f}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def render(plan: dict) -> str:
    """The plan as a readable table: per stage the busiest GPU's memory (GB) by term, then speed and time."""
    c, lay, a = plan["cluster"], plan["layout"], plan["assumptions"]
    gpu = c["gpu"] or {}
    lines = [f"{plan['job']} on {c['nodes']} node(s) x {c['gpus_per_node']} GPU(s) "
             f"({gpu.get('type') or 'GPU'}, {_gb(c['gpu_memory_bytes'])} GB each): "
             f"TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}; mfu {a['mfu']}",
             "architectures: " + "; ".join(f"{k} {v}" for k, v in a["architectures"].items()), ""]
    head = ["stage", "teacher", "weights", "grads", "optim", "activ", "transient", "workspace", "total", "fits"]
    rows = []
    for s in plan["stages"]:
        m = s.get("memory")
        if m is None:
            rows.append([s["name"], *["-"] * 8, "host only"])
            continue
        fits = "-" if s["fits"] is None else ("yes" if s["fits"] else f"NO (-{_gb(s['shortfall'])})")
        rows.append([s["name"], *(_gb(m[k]) for k in TERMS[:6]), _gb(m["workspace"]), _gb(m["total"]), fits])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines += ["per-GPU memory of the busiest rank, GB (10^9 bytes):", fmt.format(*head)]
    lines += [fmt.format(*r) for r in rows]
    lines += ["", "speed and size:"]
    for s in plan["stages"]:
        rate = s.get("tokens_per_second")
        parts = [f"{s['tokens']:,} tokens" if s.get("tokens") else "tokens not fixed",
                 f"{rate:,.0f} tokens/s" if rate else None, _duration(s.get("seconds"))]
        if s.get("checkpoint_bytes"):
            kept = s["checkpoints_on_disk_bytes"] // s["checkpoint_bytes"]
            parts.append(f"checkpoint {_gb(s['checkpoint_bytes'])} GB ({kept} kept: "
                         f"{_gb(s['checkpoints_on_disk_bytes'])} GB)")
        if s.get("host_bytes_per_rank"):
            parts.append(f"host {_gb(s['host_bytes_per_rank'])} GB per rank")
        if s.get("output_bytes"):
            parts.append(f"writes {_gb(s['output_bytes'])} GB")
        lines.append(f"  {s['name']}: " + ", ".join(p for p in parts if p))
    if plan["seconds"] is not None:
        untimed = f" (not counting {', '.join(plan['untimed_stages'])})" if plan["untimed_stages"] else ""
        lines.append(f"wall time at mfu {a['mfu']}: {_duration(plan['seconds'])}{untimed}")
    verdict = {None: "memory not checked (no GPU memory in the cluster config)", True: "fits",
               False: "DOES NOT FIT"}[plan["fits"]]
    lines.append(f"verdict: {verdict}; busiest stage {plan['busiest_stage']}")
    return "\n".join(lines)


def plan_stage(cfg: PlanConfig) -> None:
    """The CLI stage: print the plan (table or JSON), write it to ``plan.output`` when given."""
    from nemo_minitron.fsutil import atomic_write_text

    plan = run_plan(cfg)
    text = json.dumps(plan, indent=2)
    if cfg.plan.output:
        atomic_write_text(Path(cfg.plan.output), text + "\n")
    print(render(plan) if cfg.plan.format == "table" else text)


def shortfall_line(plan: dict) -> Optional[str]:
    """One line naming the first stage that does not fit and by how much, None when all fit."""
    for s in plan["stages"]:
        if s.get("fits") is False:
            m = s["memory"]
            return (f"stage {s['name']} needs {_gb(m['total'])} GB per GPU (pipeline rank {m['pipeline_rank']}), "
                    f"{_gb(s['shortfall'])} GB more than the {_gb(plan['cluster']['gpu_memory_bytes'])} GB of "
                    "cluster.gpu (force=true submits anyway)")
    return None


def check_launch(request) -> None:
    """``launch slurm``'s check (a ``SlurmLaunch``) before anything is written: a one-line error when the job's
    plan does not fit the cluster's GPUs, unless ``force``. A job the plan cannot size (a stage it does not
    cover, a cluster without ``gpu``, a model whose architecture is not readable here) goes on with one line on
    stderr saying why it was not checked."""
    import sys

    from nemo_minitron.launch.slurm import _check

    _check(request)  # the launcher's own checks (job type, one rank per GPU, world size) come first
    reason = None
    if request.stage not in _PLANNERS:
        reason = f"stage {request.stage} is not planned"
    elif not request.cluster.gpus_per_node or request.cluster.gpu is None:
        reason = "the cluster config gives no cluster.gpu"
    else:
        try:
            plan = run_plan(PlanConfig(stage=request.stage, job=request.job, cluster=request.cluster,
                                       plan=request.plan))
        except UserError as exc:
            if "no known architecture" not in str(exc):
                raise
            reason = str(exc)
    if reason is not None:
        print(f"plan: memory not checked: {reason}", file=sys.stderr)
        return
    line = shortfall_line(plan)
    if line is not None:
        if not request.force:
            raise UserError(line)
        line = line.removesuffix(" (force=true submits anyway)")
        print(f"plan: {line}; submitted as force=true asks", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- command line


def parse_cli(args: Sequence[str]) -> PlanConfig:
    """``JOB.yaml cluster=CLUSTER.yaml [stage=NAME] [cluster.K=V ...] [plan.K=V ...] [key=value ...]``."""
    from nemo_minitron.launch.slurm import ClusterConfig
    from nemo_minitron.stages import STAGES

    if not args or "=" in args[0]:
        raise UserError(f"the job's CONFIG.yaml comes first ({USAGE})")
    job_path, items = Path(args[0]), list(args[1:])
    parse_overrides(items)  # every item is key=value, or one line saying which is not
    own = {k: v for k, v in (item.split("=", 1) for item in items) if k in ("cluster", "stage")}
    prefixed = {p: [i.removeprefix(p + ".") for i in items if i.startswith(p + ".")] for p in ("cluster", "plan")}
    job_overrides = [i for i in items if i.split("=", 1)[0] not in own and not i.startswith(("cluster.", "plan."))]
    if "cluster" not in own:
        raise UserError(f"cluster=CLUSTER.yaml is required ({USAGE})")
    stage = own.get("stage") or job_path.parent.name.replace("_", "-")
    if stage not in _PLANNERS:
        raise UserError(f"stage: a plan covers {', '.join(_PLANNERS)}, not '{stage}'"
                        + ("" if "stage" in own else f" (the folder of {job_path}; give stage=NAME)"))
    cluster = _load(ClusterConfig, own["cluster"], prefixed["cluster"], "cluster")
    job = _load(STAGES[stage].config_class(), job_path, job_overrides, "job")
    try:
        settings = PlanSettings.model_validate(parse_overrides(prefixed["plan"]))
    except ValidationError as exc:
        raise UserError(f"plan.{format_validation_error(exc)}") from None
    return PlanConfig(stage=stage, job=job, cluster=cluster, plan=settings)


def _load(cls: type, path: str | Path, overrides: Sequence[str], what: str) -> Any:
    try:
        return load_config(cls, path, overrides)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
