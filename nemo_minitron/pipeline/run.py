"""The ``run`` stage: the whole Minitron pipeline in one run directory, resumable stage by stage.

Each step is an ordinary stage (``prepare-data``, ``distill``, ``eval``, ``prune``, ``nas``, ``export-hf``) with
a config derived from the run config, started through the same path as on the command line (so it spawns
its TP x PP ranks when it needs them). ``pipeline.json`` (:class:`~nemo_minitron.pipeline.ledger.Ledger`)
records the finished ones; an interrupted distillation resumes from its own checkpoints.

Under torchrun or Slurm (``RANK`` set) every rank runs the driver: each stage with parallel sizes in its config
runs on all the job's ranks (data parallelism takes those beyond TP x PP), every other stage (data preparation,
the chat answers, the generation benchmark) and all the bookkeeping (the ledger, the report, the run
directory's lock) on global rank 0 alone while the others wait for it.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from nemo_minitron.chat import generate as chat_generate
from nemo_minitron.chat.answers import teacher_and_student_answers
from nemo_minitron.chat.config import GenerateConfig
from nemo_minitron.checkpoint.config import ConvertConfig
from nemo_minitron.checkpoint.hf import check_exportable, is_hf_dir
from nemo_minitron.checkpoint.io import read_model_config, resolve_model_dir
from nemo_minitron.config import StrictModel
from nemo_minitron.data.config import BlendComponent, DataSource, PrepareDataConfig
from nemo_minitron.data.prepare import list_input_files
from nemo_minitron.distill.config import DistillConfig, LossConfig, TeacherCacheConfig
from nemo_minitron.distill.trainer import check_fp8_train
from nemo_minitron.errors import StoppedEarly, UserError
from nemo_minitron.evaluation.config import EvalConfig, GenerationConfig
from nemo_minitron.models.builder import check_fp8_shapes
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.pipeline import report
from nemo_minitron.pipeline.config import RunConfig, RunData, ScheduleStep
from nemo_minitron.pipeline.ledger import Ledger
from nemo_minitron.pipeline.nas import NASStageConfig, budget, cache_config, candidates, check_cache_top_k
from nemo_minitron.prune.config import CalibrationConfig, Correction, ImportanceConfig, PruneConfig, PruneTarget
from nemo_minitron.prune.stage import resolved_dtype, target_config
from nemo_minitron.stages import run_stage


def _slug(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", ref.removeprefix("embedded:")).strip("-")[-48:] or "corpus"


def corpus_dirs(output: str | Path, data: RunData) -> list[tuple[str, str, Path, float]]:
    """``(ledger key, input, prepared directory, weight)`` of each training corpus: one corpus is prepared into
    ``<output>/data``, the corpora of a blend (or one corpus blended with generated answers) into
    ``<output>/data/<n>-<name>``."""
    out = Path(output)
    if data.input is not None and data.generated is None:
        return [("data", data.input, out / "data", 1.0)]
    return [(f"data.{i}", ref, out / "data" / f"{i}-{_slug(ref)}", weight)
            for i, (ref, weight) in enumerate(data.corpora(), 1)]


def out_of_blend_dirs(output: str | Path, data: RunData) -> list[tuple[str, str, Path]]:
    """``(ledger key, input, prepared directory)`` of each out-of-blend text (``<output>/out_of_blend/...``)."""
    return [(f"data.out_of_blend.{i}", t.input, Path(output) / "out_of_blend" / f"{i}-{_slug(t.input)}")
            for i, t in enumerate(data.out_of_blend, 1)]


def generated_config(output: str | Path, teacher: str, data: RunData) -> Optional[GenerateConfig]:
    """The ``generate`` stage's config for ``data.generated`` (the teacher's answers, into
    ``<output>/data/generated``); None without it."""
    g = data.generated
    if g is None:
        return None
    settings = g.model_dump(exclude={"weight"})
    return GenerateConfig(model=teacher, output_dir=str(Path(output) / "data" / "generated"),
                          split_seed=data.split_seed, **settings)


def check_generated(output: str | Path, teacher: str, data: RunData) -> None:
    """``data.generated``'s checks that need no model: the teacher has a chat template, the prompts are readable.
    (Its output is the run directory's own: one made with other settings is redone through ``rerun_from``.)"""
    if data.generated is None:
        return
    try:
        chat_generate.model_dir(teacher)
        chat_generate.load_prompts(generated_config(output, teacher, data))
    except UserError as exc:
        raise UserError(f"data.generated: {exc}") from None


def data_keys(output: str | Path, data: RunData) -> list[str]:
    """The keys of the stages that prepare the corpora and the out-of-blend texts, and generate the chat
    answers."""
    return ([k for k, *_ in corpus_dirs(output, data)] + [k for k, *_ in out_of_blend_dirs(output, data)]
            + (["generate"] if data.generated else []))


def eval_keys(data: RunData, key: str) -> list[str]:
    """An eval stage's key and, when there are out-of-blend texts, the key of their evaluation."""
    return [key] + ([f"{key}.out_of_blend"] if data.out_of_blend else [])


def cache_windows(cfg: RunConfig) -> int:
    """Windows of the run's teacher logit cache (``distill.teacher_cache``): as many as the longest
    distillation that reads it (a schedule step's, or a NAS candidate's short one); 0 for no cache."""
    if cfg.distill.teacher_cache is None:
        return 0
    tokens = [step.kd_tokens for step in cfg.schedule]
    if cfg.nas is not None and any(step.params is not None for step in cfg.schedule):
        tokens.append(cfg.nas.short_kd_tokens)
    return max(cfg.distill.windows(t) for t in tokens)


def stage_keys(cfg: RunConfig) -> list[str]:
    """Every stage of ``cfg`` in the order it runs (the names ``rerun_from`` takes)."""
    keys = data_keys(cfg.output, cfg.data)
    keys += ["teacher_correction"] if cfg.teacher_correction else []
    keys += (["teacher_cache"] if cache_windows(cfg) else []) + eval_keys(cfg.data, "eval.teacher")
    for i, step in enumerate(cfg.schedule, 1):
        keys += [f"step{i}.prune" if step.target is not None else f"step{i}.nas"]
        keys += eval_keys(cfg.data, f"step{i}.eval_pruned")
        if step.kd_tokens:
            keys += [f"step{i}.distill", *eval_keys(cfg.data, f"step{i}.eval_distilled")]
    return keys + ["export", "export.teacher", "generation"] + (["chat"] if cfg.report.chat_tokens else [])


def validate(cfg: RunConfig) -> None:
    """Every check that needs no compute: the teacher, the corpus, each step's target against the shape the
    step before leaves (a NAS step must have candidates), and that the final shape can be exported."""
    teacher = read_model_config(resolve_model_dir(cfg.teacher))
    for ref, _ in cfg.data.corpora():
        list_input_files(ref)
    for text in cfg.data.out_of_blend:
        list_input_files(text.input)
    check_generated(cfg.output, cfg.teacher, cfg.data)
    if cfg.rerun_from is not None and cfg.rerun_from not in stage_keys(cfg):
        raise UserError(f"rerun_from: no stage {cfg.rerun_from!r}; stages: {', '.join(stage_keys(cfg))}")
    shape = teacher
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    train = cfg.distill.train
    check_cache_top_k(cfg.distill, teacher.vocab_size)
    if train.fp8:
        check_fp8_train(train.fp8, train.seq_length, train.compile)
        check_fp8_shapes(teacher, tp, model="teacher")
    for i, step in enumerate(cfg.schedule, 1):
        try:
            shape = _step_shape(cfg, step, shape, teacher, tp, pp)
        except UserError as exc:
            raise UserError(f"schedule[{i - 1}]: {exc}") from None
    check_exportable(shape)


def _step_shape(cfg: RunConfig, step: ScheduleStep, shape: ModelConfig, teacher: ModelConfig, tp: int,
                pp: int) -> ModelConfig:
    from nemo_minitron.parallel.sharding import check_divisible

    if step.target is not None:
        new = target_config(shape, step.target)
        check_divisible(new, tp, pp)
        if cfg.distill.train.fp8:
            check_fp8_shapes(new, tp)
        return new
    found = candidates(shape, cfg.nas, budget(step.params, teacher), tp, pp, fp8=bool(cfg.distill.train.fp8))
    if not found:
        raise UserError(f"nas: no candidate of nas.search within {budget(step.params, teacher):,} parameters "
                        f"(-{cfg.nas.tolerance:.0%})")
    # The winner is known only after the search: later steps are checked against the largest candidate.
    return target_config(shape, found[0])


def _jsonable(result: Any) -> Any:
    if is_dataclass(result):
        return asdict(result)
    if isinstance(result, Path):
        return str(result)
    return result


class Runner:
    """Runs the stages of one run directory in order, recording each finished one in its ledger
    (``pipeline.json``): a stage already recorded with the same config is skipped and its result reused.

    Launched on several ranks, every rank runs the same sequence; global rank 0 alone reads and writes the
    ledger (the others have none) and decides what is skipped."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.rank0 = state.global_rank() == 0
        self.ledger: Optional[Ledger] = None
        self.log: list[dict] = []
        corpora = corpus_dirs(cfg.output, cfg.data)
        # What every stage reads: the prepared directory of one corpus, or the blend of the prepared corpora.
        self.generated = generated_config(cfg.output, cfg.teacher, cfg.data)
        blend = [BlendComponent(weight=w, path=str(d)) for _, _, d, w in corpora]
        if self.generated is not None:
            blend.append(BlendComponent(weight=cfg.data.generated.weight, path=self.generated.output_dir))
        self.data: DataSource = blend if cfg.data.blended() else str(corpora[0][2])
        self.out_of_blend = [BlendComponent(weight=1.0, path=str(d)) for _, _, d in out_of_blend_dirs(cfg.output,
                                                                                                       cfg.data)]
        c = cfg.calibration
        self.calibration = CalibrationConfig(data=self.data, num_samples=c.num_samples, seq_length=c.seq_length,
                                             micro_batch_size=c.micro_batch_size, seed=c.seed)
        state.on_rank0(self._open_ledger)

    def _open_ledger(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.out)
        if self.cfg.rerun_from is not None:
            dropped = self.ledger.forget_from(self.cfg.rerun_from)
            if dropped:
                print(f"[run] redoing: {', '.join(dropped)}", flush=True)

    def say(self, line: str) -> None:
        if self.rank0:
            print(line, flush=True)

    def stage(self, key: str, cli_name: str, config: StrictModel, outputs: list[Path]) -> Any:
        """Run ``config`` as CLI stage ``cli_name`` unless ``key`` already finished with it: on every rank of a
        launched job when the config has parallel sizes, else on global rank 0."""
        return self.task(key, config.model_dump(mode="json"), lambda: run_stage(cli_name, config), outputs,
                         every_rank=hasattr(config, "parallel"))

    def task(self, key: str, config: dict, work: Callable[[], Any], outputs: list[Path],
             every_rank: bool = False) -> Any:
        """Call ``work`` unless ``key`` already finished with ``config`` (on every rank, or on global rank 0
        while the others wait); its JSON-able result, on every rank."""
        done = state.on_rank0(lambda: self.ledger.finished(key, config))
        if done is not None:
            self.say(f"[run] {key}: finished before, skipped")
            self.log.append({"stage": key, "seconds": done["seconds"], "skipped": True})
            return done["result"]
        self.say(f"[run] {key} ...")
        start = time.perf_counter()
        result = _jsonable(work()) if every_rank else state.on_rank0(lambda: _jsonable(work()))
        seconds = time.perf_counter() - start
        if isinstance(result, dict) and result.get("stopped_early"):
            # A distillation stopped by SIGTERM (pre-emption) kept its checkpoint but did not finish.
            raise StoppedEarly(f"stage {key} was stopped by SIGTERM after step {result['steps']} (its checkpoint is "
                               "kept): run the same command again to resume")
        state.on_rank0(lambda: self.ledger.record(key, config, result, seconds, [str(p) for p in outputs]))
        self.log.append({"stage": key, "seconds": seconds, "skipped": False})
        self.say(f"[run] {key}: {seconds:.0f} s")
        return result

    def prepare_data(self) -> None:
        """Prepare the corpora and the out-of-blend texts, then generate the chat answers: the teacher as given,
        before any correction, so that teacher correction reads the same blend as the stages after it."""
        d = self.cfg.data
        prepared = [(key, ref, path, d.valid_fraction) for key, ref, path, _ in corpus_dirs(self.out, d)]
        prepared += [(key, ref, path, text.valid_fraction)
                     for (key, ref, path), text in zip(out_of_blend_dirs(self.out, d), d.out_of_blend)]
        for key, ref, path, valid_fraction in prepared:
            self.stage(key, "prepare-data", PrepareDataConfig(
                input=ref, tokenizer=self.cfg.teacher, output_dir=str(path), valid_fraction=valid_fraction,
                split_seed=d.split_seed, jsonl_text_key=d.jsonl_text_key), [path])
        if self.generated is not None:
            self.stage("generate", "generate", self.generated, [Path(self.generated.output_dir)])

    def prune(self, key: str, model: str, output: Path, target: PruneTarget, importance: ImportanceConfig,
              correction: Optional[Correction] = None) -> str:
        """Prune ``model`` to ``target`` into ``output`` on the run's calibration set; the pruned directory.
        The pruned model's loss is measured on the held-out split by the stage after, not on the calibration set.
        ``correction`` (default: the run's ``prune_correction``) with the run's damping."""
        cfg = self.cfg
        self.stage(key, "prune", PruneConfig(
            model=model, output=str(output), target=target, calibration=self.calibration, importance=importance,
            dtype=resolved_dtype(cfg.prune_dtype, model), overwrite=True, pruned_loss=False,
            correction=correction or cfg.prune_correction, correction_damping=cfg.prune_correction_damping,
            parallel=cfg.parallel, seed=cfg.seed), [output])
        return str(output)

    def eval(self, key: str, model: str) -> dict:
        """Held-out loss on the training data's valid split (each blend component on its own), then on the
        valid split of each out-of-blend text (a second stage, ``<key>.out_of_blend``)."""
        e = self.cfg.eval
        result = None
        for stage_key, data in zip(eval_keys(self.cfg.data, key), [self.data, self.out_of_blend]):
            path = self.out / "eval" / f"{stage_key.replace('.', '_')}.json"
            config = EvalConfig(model=model, data=data, seq_length=e.seq_length,
                                micro_batch_size=e.micro_batch_size, max_windows=e.max_windows, dtype=e.dtype,
                                parallel=self.cfg.parallel, output=str(path), seed=self.cfg.seed)
            found = self.stage(stage_key, "eval", config, [path])
            result = found if result is None else result
        return result

    def corpus_losses(self, key: str) -> dict[str, float]:
        """:func:`~nemo_minitron.pipeline.report.corpus_losses` of the finished eval stage ``key``."""
        return report.corpus_losses(self.ledger, self.cfg.data, key)

    def distill(self, key: str, mode: str, student: str, teacher: Optional[str], tokens: int, output: Path,
                optim=None, student_init: str = "checkpoint",
                teacher_cache: Optional[TeacherCacheConfig] = None, eval_every_steps: Optional[int] = None) -> dict:
        """The distillation's periodic held-out loss is measured on the windows of the run's ``eval`` section,
        as the ``eval`` stages are: every point of the report's loss curve is one evaluation, every
        ``eval_every_steps`` (None: ``distill.eval.every_steps``). With ``teacher_cache`` the teacher's outputs
        are read from it (``teacher`` is only checked against it)."""
        d, e = self.cfg.distill, self.cfg.eval
        every = d.eval.every_steps if eval_every_steps is None else eval_every_steps
        periodic = d.eval.model_copy(update={"seq_length": e.seq_length, "max_windows": e.max_windows,
                                             "micro_batch_size": e.micro_batch_size, "every_steps": every})
        config = DistillConfig(mode=mode, student=student, student_init=student_init, teacher=teacher,
                               data=self.data, output=str(output), train=d.train.for_tokens(tokens),
                               optim=optim or d.optim, loss=d.loss if mode == "kd" else LossConfig(),
                               checkpoint=d.checkpoint, eval=periodic, log=d.log, parallel=self.cfg.parallel,
                               teacher_cache=teacher_cache)
        return self.stage(key, "distill", config, [output])


def run_pipeline(cfg: RunConfig) -> Optional[dict]:
    """data -> [teacher correction] -> eval teacher -> (prune | NAS -> eval -> distill -> eval) per schedule
    step -> export HF -> generation speed -> chat answers -> report. Returns the report's summary (on global
    rank 0; None on the other ranks of a launched job). The run directory is locked meanwhile, once for the
    whole job: a second run on it stops before any work."""
    if state.launched():
        # The job's process group, and its world size checked against TP x PP once, before any stage.
        state.initialize(cfg.parallel, cfg.seed)
    with state.rank0_lock(cfg.output, "run directory"):
        summary = _run_pipeline(cfg)
    return summary if state.global_rank() == 0 else None


def _run_pipeline(cfg: RunConfig) -> dict:
    r = Runner(cfg)
    out, data, calibration = r.out, r.data, r.calibration
    r.prepare_data()
    teacher = cfg.teacher
    if cfg.teacher_correction is not None:
        tc = cfg.teacher_correction
        r.distill("teacher_correction", "ce", cfg.teacher, None, tc.tokens, out / "teacher_correction", tc.optim)
        teacher = str(out / "teacher_correction" / "final")
    cache = None
    if cache_windows(cfg):
        # After teacher correction, which changes the teacher: one cache for every distillation of the run.
        path = out / "teacher_cache"
        r.stage("teacher_cache", "cache-logits",
                cache_config(teacher, data, str(path), cfg.distill, cache_windows(cfg), cfg.parallel), [path])
        cache = cfg.distill.cache_reader(str(path))
    r.eval("eval.teacher", teacher)

    student = teacher
    for i, step in enumerate(cfg.schedule, 1):
        home = out / f"step{i}"
        if step.target is not None:
            pruned = r.prune(f"step{i}.prune", student, home / "pruned", step.target, cfg.importance)
            start = pruned
        else:
            reference = read_model_config(resolve_model_dir(cfg.teacher))
            found = r.stage(f"step{i}.nas", "nas", NASStageConfig(
                model=student, teacher=teacher, data=data, output=str(home / "nas"),
                params=budget(step.params, reference), nas=cfg.nas, calibration=calibration,
                importance=cfg.importance, distill=cfg.distill,
                prune_dtype=resolved_dtype(cfg.prune_dtype, student), overwrite=True,
                prune_correction=cfg.prune_correction, prune_correction_damping=cfg.prune_correction_damping,
                parallel=cfg.parallel, seed=cfg.seed, teacher_cache=cache), [home / "nas"])
            pruned, start = found["best_pruned"], found["best_student"]
        r.eval(f"step{i}.eval_pruned", pruned)
        student = start
        if step.kd_tokens:
            r.distill(f"step{i}.distill", "kd", start, teacher, step.kd_tokens, home / "distill",
                      teacher_cache=cache)
            student = str(home / "distill" / "final")
            r.eval(f"step{i}.eval_distilled", student)

    student_hf = out / "export" / "hf"
    r.stage("export", "export-hf", ConvertConfig(source=student, output=str(student_hf), overwrite=True),
            [student_hf])
    teacher_hf = resolve_model_dir(teacher)
    if not is_hf_dir(teacher_hf):
        teacher_hf = out / "export" / "teacher_hf"
        r.stage("export.teacher", "export-hf", ConvertConfig(source=teacher, output=str(teacher_hf), overwrite=True),
                [teacher_hf])
    generation = None
    if cfg.report.generation_tokens:
        generation = r.stage("generation", "generation-speed", GenerationConfig(
            teacher=str(teacher_hf), student=str(student_hf), prompts=cfg.report.generation_prompts,
            new_tokens=cfg.report.generation_tokens), [])
    chat = None
    if cfg.report.chat_tokens:
        rep = cfg.report
        chat = r.task("chat", {"teacher": str(teacher_hf), "student": str(student_hf), "prompts": rep.chat_prompts,
                               "max_new_tokens": rep.chat_tokens},
                      lambda: teacher_and_student_answers(teacher_hf, student_hf, rep.chat_prompts, rep.chat_tokens),
                      [])
    return state.on_rank0(lambda: report.write(cfg, r.ledger, r.log, generation, student_hf, chat))
