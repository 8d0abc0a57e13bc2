"""The ``bench`` stage: every arm of the benchmark in one directory, resumable stage by stage.

Arms (each: prune -> held-out loss -> train -> held-out loss, from the same teacher and data):

- ``ours``: our importance (the config's ``importance``) and logit KD, ``compare_tokens``;
  ``recovery``: the same pruned student distilled for ``recovery_tokens``;
- baselines: ``random`` and ``magnitude`` importance; ``ce`` (the pruned student trained with the LM loss,
  no teacher); ``scratch`` (the student's architecture from random weights, LM loss, ``scratch_tokens``);
- claims: ``depth`` (layers dropped to the parameter count nearest the width target), ``corrected`` (the
  teacher fine-tuned on the corpus first), ``agg.<seq>_<batch>`` (other aggregations, pruned only),
  ``iterative`` (importance re-estimated between intermediate cuts, pruned only);
- beyond the baseline: ``lsq`` (ours with lsq weight correction after the cut) and ``full`` (the full method: the
  shape that NAS finds within the target's parameter count, lsq-corrected), both also at ``recovery_tokens``;
- peer: ``modelopt`` (NVIDIA ModelOpt's Minitron pruning, then our distillation), also at ``recovery_tokens``;
- ``speed.*``: the scripts of :mod:`nemo_minitron.bench.scripts` (``benchmarks/<name>.py`` in a checkout) with
  their own side-by-side measurements.

With ``distill.teacher_cache`` (auto), the teacher runs once into a logit cache (stage ``teacher_cache``) of the
windows of the longest distillation, and every distillation from the original teacher reads it (the arms then differ
only in their students, as before); the ``corrected`` arm distils from its own teacher, online.

``pipeline.json`` in the bench directory records finished stages (see :mod:`nemo_minitron.pipeline.ledger`).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from nemo_minitron.bench.config import BenchConfig
from nemo_minitron.checkpoint.io import read_model_config, resolve_model_dir
from nemo_minitron.data.prepare import list_input_files
from nemo_minitron.distill.config import TeacherCacheConfig
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.pipeline.config import (
    NASConfig,
    NASStageConfig,
    RunConfig,
    RunData,
    RunDistill,
    RunReport,
    ScheduleStep,
)
from nemo_minitron.pipeline.nas import cache_config, candidates, check_cache_top_k
from nemo_minitron.pipeline.run import Runner, check_generated, data_keys, eval_keys
from nemo_minitron.prune.config import Correction, ImportanceConfig, PruneConfig, PruneTarget
from nemo_minitron.prune.stage import resolved_dtype, target_config

# Packaged (not read from a checkout's benchmarks/), so that an installed wheel runs the whole bench.
SCRIPTS = "nemo_minitron.bench.scripts"
SPEED_SCRIPTS = ("kd_throughput", "importance_overhead", "kl_memory", "tp_step_time")  # modules of SCRIPTS


def depth_target(teacher: ModelConfig, width: ModelConfig) -> PruneTarget:
    """The layer count whose parameter count is nearest to ``width``'s (at the teacher's width)."""
    best = min(range(1, teacher.num_layers),
               key=lambda n: abs(teacher.model_copy(update={"num_layers": n}).num_params() - width.num_params()))
    return PruneTarget(num_layers=best)


def stage_keys(cfg: BenchConfig) -> list[str]:
    """Every stage of the bench in the order it runs (the names ``rerun_from`` takes)."""
    def ev(key: str) -> list[str]:
        return eval_keys(cfg.data, key)

    def arm(key: str) -> list[str]:
        return [f"{key}.prune", *ev(f"{key}.eval_pruned"), f"{key}.train", *ev(f"{key}.eval_trained")]

    def recovery(key: str) -> list[str]:
        return [f"{key}.train", *ev(f"{key}.eval_trained")]

    keys = [*data_keys(cfg.out_dir, cfg.data), *(["teacher_cache"] if cfg.distill.teacher_cache else []),
            *ev("eval.teacher"), *arm("ours"), *recovery("recovery"), *arm("lsq")]
    if cfg.nas is not None:
        keys += ["full.nas", *ev("full.eval_pruned"), *recovery("full")]
    if cfg.peers.modelopt:
        keys += arm("modelopt")
    beyond = ["lsq", *(["full"] if cfg.nas is not None else []), *(["modelopt"] if cfg.peers.modelopt else [])]
    for key in beyond:
        keys += recovery(f"{key}.recovery")
    keys += [*arm("random"), *arm("magnitude"), *recovery("ce"), *recovery("scratch"), *arm("depth"),
             "corrected.teacher_correction", *ev("corrected.eval_teacher"), *arm("corrected")]
    for seq_agg, batch_agg in cfg.aggregations:
        if (seq_agg, batch_agg) != (cfg.importance.seq_agg, cfg.importance.batch_agg):
            keys += [f"agg.{seq_agg}_{batch_agg}.prune", *ev(f"agg.{seq_agg}_{batch_agg}.eval_pruned")]
    keys += [f"iterative.step{i}.prune" for i in range(1, len(cfg.iterative_steps) + 2)]
    keys += ev("iterative.eval_pruned")
    if cfg.speed:
        keys += [f"speed.{key}" for key in SPEED_SCRIPTS]
    return keys


def nas_candidates(cfg: BenchConfig, teacher: ModelConfig) -> list[PruneTarget]:
    """The full method's search: ``nas.search``'s shapes with at most the target's parameter count and at least
    ``1 - nas.tolerance`` of it."""
    return candidates(teacher, bench_nas(cfg), target_config(teacher, cfg.target).num_params())


def active_distill(cfg: BenchConfig) -> RunDistill:
    """``distill`` with the active budgets' sequence length (when they set one)."""
    seq = cfg.active.seq_length
    if seq is None:
        return cfg.distill
    return cfg.distill.model_copy(update={"train": cfg.distill.train.model_copy(update={"seq_length": seq})})


def cache_windows(cfg: BenchConfig) -> int:
    """Windows of the bench's teacher logit cache: those of its longest distillation from the teacher."""
    b, nas = cfg.active, bench_nas(cfg)
    tokens = [b.recovery_tokens, b.compare_tokens, nas.short_kd_tokens if nas is not None else 0]
    return max(active_distill(cfg).windows(n) for n in tokens)


def _overridden(model, **values):
    """``model`` with the fields of ``values`` that are not None replaced (the active budgets' overrides)."""
    update = {key: value for key, value in values.items() if value is not None}
    return model.model_copy(update=update) if update else model


def bench_nas(cfg: BenchConfig) -> NASConfig | None:
    """``nas`` with the active budgets' short distillation, candidate count and short list."""
    b = cfg.active
    if cfg.nas is None:
        return None
    return _overridden(cfg.nas, short_kd_tokens=b.nas_short_kd_tokens, max_candidates=b.nas_max_candidates,
                       top_k=b.nas_top_k)


def bench_data(cfg: BenchConfig) -> RunData:
    """``data`` with the active budgets' generated answers: how many prompts, and how long each answer."""
    b, generated = cfg.active, cfg.data.generated
    if generated is None:
        return cfg.data
    sampling = _overridden(generated.sampling, max_new_tokens=b.generated_max_new_tokens)
    return cfg.data.model_copy(update={"generated": _overridden(generated, max_prompts=b.generated_prompts,
                                                                sampling=sampling)})


def validate(cfg: BenchConfig) -> None:
    """Checks that need no compute: teacher, corpus, targets, and the peers the bench runs."""
    teacher = read_model_config(resolve_model_dir(cfg.teacher))
    for ref in [ref for ref, _ in cfg.data.corpora()] + [t.input for t in cfg.data.out_of_blend]:
        list_input_files(ref)
    check_generated(cfg.out_dir, cfg.teacher, bench_data(cfg))
    target = target_config(teacher, cfg.target)
    shape = teacher
    for i, step in enumerate(cfg.iterative_steps):
        try:
            shape = target_config(shape, step)
        except UserError as exc:
            raise UserError(f"iterative_steps[{i}]: {exc}") from None
    shape = target_config(shape, cfg.target)
    if shape != target:
        raise UserError("iterative_steps: the steps must end at target")
    if cfg.nas is not None and not nas_candidates(cfg, teacher):
        raise UserError(f"nas: no candidate of nas.search has {target.num_params() * (1 - cfg.nas.tolerance):,.0f}.."
                        f"{target.num_params():,} parameters (the target's count); widen nas.search or tolerance")
    check_cache_top_k(cfg.distill, teacher.vocab_size)
    if cfg.peers.modelopt and importlib.util.find_spec("modelopt") is None:
        raise UserError("peers.modelopt: NVIDIA ModelOpt is not installed (run `make install-modelopt`, "
                        "or set peers.modelopt=false)")
    if cfg.rerun_from is not None and cfg.rerun_from not in stage_keys(cfg):
        raise UserError(f"rerun_from: no stage {cfg.rerun_from!r}; stages: {', '.join(stage_keys(cfg))}")


def _script(name: str, args: list[str], out: Path, json_flag: bool = True) -> dict:
    """Run the module ``name`` of ``SCRIPTS`` (with ``--json out`` unless it writes ``out`` itself); its results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    module = f"{SCRIPTS}.{name}"
    proc = subprocess.run([sys.executable, "-m", module, *args, *(["--json", str(out)] if json_flag else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{module} failed (exit {proc.returncode}): "
                        f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    sys.stdout.write(proc.stdout)
    return json.loads(out.read_text())


class _Bench:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        b = cfg.active
        seq = {} if b.seq_length is None else {"seq_length": b.seq_length}
        self.distill_cfg = active_distill(cfg)
        run_cfg = RunConfig(
            output=cfg.out_dir, teacher=cfg.teacher, data=bench_data(cfg),
            calibration=cfg.calibration.model_copy(update={"num_samples": b.calibration_samples, **seq}),
            importance=cfg.importance, schedule=[ScheduleStep(target=cfg.target, kd_tokens=b.compare_tokens)],
            distill=self.distill_cfg,
            eval=cfg.eval.model_copy(update={"max_windows": b.eval_windows, **seq}),
            report=RunReport(generation_tokens=0), prune_dtype=cfg.prune_dtype,
            prune_correction_damping=cfg.correction_damping, rerun_from=cfg.rerun_from,
            parallel=cfg.parallel, seed=cfg.seed)
        self.r = Runner(run_cfg)
        self.out, self.data, self.calibration = self.r.out, self.r.data, self.r.calibration
        self.cache: TeacherCacheConfig | None = None

    def write_cache(self) -> None:
        """With ``distill.teacher_cache``: the original teacher's logit cache, read by every distillation from it."""
        if self.cfg.distill.teacher_cache is None:
            return
        path = self.out / "teacher_cache"
        self.r.stage("teacher_cache", "cache-logits",
                     cache_config(self.cfg.teacher, self.data, str(path), self.distill_cfg, cache_windows(self.cfg),
                                  self.cfg.parallel), [path])
        self.cache = self.distill_cfg.cache_reader(str(path))

    def prune(self, key: str, model: str, target: PruneTarget, importance: ImportanceConfig,
              correction: Correction = "none") -> str:
        return self.r.prune(f"{key}.prune", model, self.out / key / "pruned", target, importance, correction)

    def arm(self, key: str, model: str, target: PruneTarget, importance: ImportanceConfig, teacher: str,
            tokens: int, correction: Correction = "none") -> dict:
        """Prune (with ``correction``), evaluate, distill from ``teacher`` for ``tokens``, evaluate."""
        pruned = self.prune(key, model, target, importance, correction)
        return {**self.evaluated_pruned(key, pruned), **self.train(key, "kd", pruned, teacher, tokens)}

    def evaluated_pruned(self, key: str, pruned: str) -> dict:
        return {"pruned": pruned, "pruned_loss": self.r.eval(f"{key}.eval_pruned", pruned)["loss"],
                "pruned_losses": self.r.corpus_losses(f"{key}.eval_pruned")}

    def train(self, key: str, mode: str, student: str, teacher, tokens: int, student_init: str = "checkpoint",
              eval_every_steps: Optional[int] = None) -> dict:
        """Train ``student`` for ``tokens`` (``mode`` kd: from ``teacher``, through the bench's logit cache when it
        has one and ``teacher`` is the original teacher), then evaluate it."""
        out = self.out / key / "train"
        cache = self.cache if mode == "kd" and teacher == self.cfg.teacher else None
        result = self.r.distill(f"{key}.train", mode, student, teacher, tokens, out, student_init=student_init,
                                teacher_cache=cache, eval_every_steps=eval_every_steps)
        return {"tokens": result["tokens"], "loss": self.r.eval(f"{key}.eval_trained", result["final"])["loss"],
                "losses": self.r.corpus_losses(f"{key}.eval_trained"), "curve": _curve(out / "metrics.jsonl"),
                "train_dir": str(out), "teacher_cache": cache is not None}


def _curve(metrics: Path) -> dict:
    """Training loss and periodic held-out loss against tokens, from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {
        "train": [(r["tokens"], r["loss"]) for r in rows if "loss" in r],
        "eval": [(r["tokens"], r["eval_loss"]) for r in rows if "eval_loss" in r],
    }


def run_bench(cfg: BenchConfig) -> dict:
    """Every arm, then ``report.md`` / ``report.json`` / plots in the bench directory; the report's summary."""
    from nemo_minitron.bench import report

    bench = _Bench(cfg)
    r, b, out = bench.r, cfg.active, bench.out
    teacher_cfg = read_model_config(resolve_model_dir(cfg.teacher))
    width_cfg = target_config(teacher_cfg, cfg.target)
    results: dict = {"budgets": b.model_dump(), "quick": cfg.quick, "teacher_params": teacher_cfg.num_params(),
                     "student_params": width_cfg.num_params()}

    r.prepare_data()
    bench.write_cache()
    results["teacher_cache"] = None if bench.cache is None else bench.cache.path
    results["teacher_loss"] = r.eval("eval.teacher", cfg.teacher)["loss"]
    results["teacher_losses"] = r.corpus_losses("eval.teacher")
    results["out_of_blend"] = [t.input for t in cfg.data.out_of_blend]

    # Ours, at the comparison budget and at the recovery budget (the same pruned student).
    ours = results["ours"] = bench.arm("ours", cfg.teacher, cfg.target, cfg.importance, cfg.teacher, b.compare_tokens)
    results["recovery"] = bench.train("recovery", "kd", ours["pruned"], cfg.teacher, b.recovery_tokens,
                                      eval_every_steps=b.recovery_eval_every_steps)

    # Beyond the baseline, first (the bench's target): weight correction, the full method (NAS shape + correction)
    # and ModelOpt at the fixed target, after the comparison budget; then each after the recovery budget.
    results["lsq"] = bench.arm("lsq", cfg.teacher, cfg.target, cfg.importance, cfg.teacher, b.compare_tokens,
                               correction="lsq")
    if cfg.nas is not None:
        results["full"] = _full_arm(bench, cfg, width_cfg)
    if cfg.peers.modelopt:
        results["modelopt"] = _modelopt_arm(bench, cfg)
    for key in ("lsq", "full", "modelopt"):
        if key in results:
            results[key]["recovery"] = bench.train(f"{key}.recovery", "kd", results[key]["pruned"], cfg.teacher,
                                                   b.recovery_tokens, eval_every_steps=b.recovery_eval_every_steps)

    # Baselines.
    for criterion in ("random", "magnitude"):
        results[criterion] = bench.arm(criterion, cfg.teacher, cfg.target,
                                       cfg.importance.model_copy(update={"criterion": criterion}), cfg.teacher,
                                       b.compare_tokens)
    results["ce"] = bench.train("ce", "ce", ours["pruned"], None, b.compare_tokens)
    results["scratch"] = bench.train("scratch", "ce", ours["pruned"], None, b.scratch_tokens, student_init="random")

    # The paper's claims.
    depth = depth_target(teacher_cfg, width_cfg)
    results["depth"] = {**bench.arm("depth", cfg.teacher, depth, cfg.importance, cfg.teacher, b.compare_tokens),
                        "num_layers": depth.num_layers,
                        "params": teacher_cfg.model_copy(update={"num_layers": depth.num_layers}).num_params()}
    corrected = r.distill("corrected.teacher_correction", "ce", cfg.teacher, None, b.correction_tokens,
                          out / "corrected" / "teacher")["final"]
    results["corrected"] = {"teacher_loss": r.eval("corrected.eval_teacher", corrected)["loss"],
                            "teacher_losses": r.corpus_losses("corrected.eval_teacher"),
                            **bench.arm("corrected", corrected, cfg.target, cfg.importance, corrected,
                                        b.compare_tokens)}
    results["aggregation"] = []
    for seq_agg, batch_agg in cfg.aggregations:
        if (seq_agg, batch_agg) == (cfg.importance.seq_agg, cfg.importance.batch_agg):
            loss = ours["pruned_loss"]
        else:
            key = f"agg.{seq_agg}_{batch_agg}"
            pruned = bench.prune(key, cfg.teacher, cfg.target,
                                 cfg.importance.model_copy(update={"seq_agg": seq_agg, "batch_agg": batch_agg}))
            loss = r.eval(f"{key}.eval_pruned", pruned)["loss"]
        results["aggregation"].append({"seq_agg": seq_agg, "batch_agg": batch_agg, "pruned_loss": loss})
    model = cfg.teacher
    for i, step in enumerate([*cfg.iterative_steps, cfg.target], 1):
        model = bench.prune(f"iterative.step{i}", model, step, cfg.importance)
    results["iterative"] = {"steps": len(cfg.iterative_steps) + 1,
                            "pruned_loss": r.eval("iterative.eval_pruned", model)["loss"],
                            "pruned_losses": r.corpus_losses("iterative.eval_pruned")}

    if cfg.speed:
        results["speed"] = _speed(bench, cfg, ours["pruned"])
    return report.write(out, results, r.log)


def _full_arm(bench: _Bench, cfg: BenchConfig, width: ModelConfig) -> dict:
    """The full method: NAS (lsq-corrected candidates, ranked after pruning and after a short distillation each)
    within the fixed target's parameter count; the winner's pruned model (not its short distillation, which
    would be extra tokens) then gets the same distillation as the other arms (``run_bench`` adds the recovery
    budget's)."""
    r, b, home = bench.r, cfg.active, bench.out / "full"
    found = r.stage("full.nas", "nas", NASStageConfig(
        model=cfg.teacher, teacher=cfg.teacher, data=bench.data, output=str(home / "nas"),
        params=width.num_params(), nas=bench_nas(cfg), calibration=bench.calibration, importance=cfg.importance,
        distill=bench.distill_cfg, prune_dtype=resolved_dtype(cfg.prune_dtype, cfg.teacher), overwrite=True,
        parallel=cfg.parallel, seed=cfg.seed, teacher_cache=bench.cache, prune_correction="lsq",
        prune_correction_damping=cfg.correction_damping), [home / "nas"])
    best = next(row for row in found["candidates"] if row["name"] == found["best"])
    pruned = found["best_pruned"]
    return {"shape": best["target"], "params": best["params"],
            "param_ratio_to_target": best["params"] / width.num_params(),
            "nas_candidates": len(found["candidates"]), "ranking_changed": found["ranking_changed"],
            **bench.evaluated_pruned("full", pruned),
            **bench.train("full", "kd", pruned, cfg.teacher, b.compare_tokens)}


def _modelopt_arm(bench: _Bench, cfg: BenchConfig) -> dict:
    """ModelOpt prunes the teacher to the target on our calibration batches (``SCRIPTS.modelopt_peer``, which
    also times our importance estimation in the same process), then our eval and distillation as for ours
    (``run_bench`` adds the recovery budget's)."""
    peer = bench.out / "modelopt"
    prune_cfg = PruneConfig(model=cfg.teacher, output=str(peer / "ours"), target=cfg.target,
                            calibration=bench.calibration, importance=cfg.importance,
                            dtype=resolved_dtype(cfg.prune_dtype, cfg.teacher),
                            overwrite=True, seed=cfg.seed)

    def work() -> dict:
        peer.mkdir(parents=True, exist_ok=True)
        (peer / "prune.json").write_text(prune_cfg.model_dump_json(indent=2))
        return _script("modelopt_peer", [str(peer / "prune.json"), "--workdir", str(peer), "--overwrite"],
                       peer / "comparison.json", json_flag=False)

    found = bench.r.task("modelopt.prune", prune_cfg.model_dump(mode="json"), work, [peer])
    pruned = found["students"]["modelopt"]
    return {"ours_importance_s": found["seconds"]["ours_importance"],
            "modelopt_importance_s": found["seconds"]["modelopt_prune"], "overlap": found["overlap"],
            "pruned": pruned, "pruned_loss": bench.r.eval("modelopt.eval_pruned", pruned)["loss"],
            "pruned_losses": bench.r.corpus_losses("modelopt.eval_pruned"),
            **bench.train("modelopt", "kd", pruned, cfg.teacher, cfg.active.compare_tokens)}


def _speed(bench: _Bench, cfg: BenchConfig, student: str) -> dict:
    b, r, speed = cfg.active, bench.r, bench.out / "speed"
    # The speed scripts read one prepared dataset: a blend's first corpus (speed does not depend on the text).
    data = bench.data if isinstance(bench.data, str) else bench.data[0].path
    args = {
        "kd_throughput": ["--student", student, "--data", data, "--steps", str(b.speed_steps),
                          "--seq", str(b.speed_seq)],
        "importance_overhead": ["--data", data, "--seq", str(b.speed_seq),
                                "--samples", str(min(b.calibration_samples, 64))],
        "kl_memory": ["--tokens", str(b.kl_tokens), "--vocab", str(b.kl_vocab)],
        "tp_step_time": ["--data", data, "--steps", str(b.speed_steps), "--seq", str(b.speed_seq)],
    }
    # "<name>.py", as recorded before the scripts moved into the package: finished stages stay finished.
    return {key: r.task(f"speed.{key}", {"script": f"{key}.py", "args": args[key]},
                        lambda key=key: _script(key, args[key], speed / f"{key}.json"), [])
            for key in SPEED_SCRIPTS}
