"""The ``distill`` stage: a frozen teacher teaches a student (usually a pruned copy of it).

One training step consumes ``global_batch_size`` sequences: ``global_batch_size / (micro_batch_size * DP)``
micro-batches per data-parallel rank run through megatron's pipeline schedule (teacher and student on the
same stages, see :mod:`nemo_minitron.distill.pair`), gradients are averaged over DP, clipped by their global
norm, and AdamW steps with linear warmup and cosine decay to ``min_lr``. ``mode: ce`` trains one model with
the LM loss alone (teacher correction, or the no-teacher baseline).

Everything the next step depends on — weights, optimizer, step, data position, RNG states — is in the
checkpoint, so a resumed run reproduces the uninterrupted loss curve exactly on CPU.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nemo_minitron.checkpoint.integrity import check_model
from nemo_minitron.checkpoint.io import (
    LoadedModel,
    load_model,
    new_model,
    read_model_config,
    resolve_model_dir,
    save_checkpoint,
)
from nemo_minitron.data import BlendComponent, heldout_sets, prepared_components, train_sampler
from nemo_minitron.distill import checkpointing
from nemo_minitron.distill.cache import CachedTeacher, check_teacher_cache
from nemo_minitron.distill.config import (
    CheckpointConfig,
    DistillConfig,
    EvalDuringTraining,
    LogConfig,
    LossConfig,
    OptimConfig,
    TeacherCacheConfig,
    TrainConfig,
    check_recompute,
)
from nemo_minitron.distill.intermediate import IntermediateLosses
from nemo_minitron.distill.logging import RunLogger
from nemo_minitron.distill.losses import FusedLogitKD
from nemo_minitron.distill.pair import AttachAuxLoss, DistillationPair, output_weight, pipeline_shapes
from nemo_minitron.dtypes import Fp8, resolve, torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.loss import windows_loss_sums
from nemo_minitron.fsutil import atomic_write_text, check_can_create, remove_leftovers
from nemo_minitron.models.builder import FP8_MULTIPLE, check_fp8_shapes, compile_layers, te_available
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.engine import TrainingEngine
from nemo_minitron.parallel.schedule import forward_backward
from nemo_minitron.parallel.sharding import check_divisible


@dataclass
class DistillResult:
    steps: int
    tokens: int
    final_loss: float
    eval_loss: Optional[float]
    eval_perplexity: Optional[float]
    skipped_steps: int
    seconds: float
    tokens_per_second: float
    output: str
    stopped_early: bool
    dtype: str  # the student's compute dtype ("auto" resolved on this machine)


def run_meta(student: ModelConfig, train: TrainConfig) -> dict:
    """What a checkpoint shares with the run that resumes it: architecture and batch shape (the parallel layout
    may differ: checkpoints reshard)."""
    return {
        "student": student.model_dump(),
        "global_batch_size": train.global_batch_size,
        "seq_length": train.seq_length,
    }


def check_fp8_train(fp8: Fp8, seq_length: int, compiled: bool) -> None:
    """What ``train.fp8`` needs besides the models' shapes: CUDA, Transformer Engine, and token counts per
    micro-batch that FP8 GEMMs accept."""
    if not te_available():
        raise UserError(f"train.fp8 {fp8} needs CUDA and Transformer Engine (pip install -e .[gpu]); "
                        "leave it unset to train in bf16")
    if seq_length % FP8_MULTIPLE:
        raise UserError(f"train.fp8 needs train.seq_length to be a multiple of {FP8_MULTIPLE}, not {seq_length}")
    if compiled:
        raise UserError("train.compile and train.fp8 cannot be combined")


def validate(cfg: DistillConfig) -> None:
    """Every check that needs no compute."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    for path in (cfg.output, Path(cfg.output) / "checkpoints", Path(cfg.output) / "final"):
        check_can_create(path, "output", directory=True)
    student = read_model_config(resolve_model_dir(cfg.student))
    check_divisible(student, tp, pp)
    online = cfg.mode == "kd" and cfg.teacher_cache is None  # a teacher model runs beside the student
    if online:
        teacher = read_model_config(resolve_model_dir(cfg.teacher))
        try:
            check_divisible(teacher, tp, pp)
        except UserError as exc:
            raise UserError(f"teacher: {exc}") from None
        if teacher.vocab_size != student.vocab_size:
            raise UserError(f"teacher vocab_size {teacher.vocab_size} differs from the student's {student.vocab_size}")
        for pair in cfg.loss.intermediate.pairs:
            if pair.student_layer >= student.num_layers:
                raise UserError(f"loss.intermediate: student_layer {pair.student_layer} does not exist "
                                f"(the student has {student.num_layers})")
            if pair.teacher_layer >= teacher.num_layers:
                raise UserError(f"loss.intermediate: teacher_layer {pair.teacher_layer} does not exist "
                                f"(the teacher has {teacher.num_layers})")
            s_stage = pair.student_layer // (student.num_layers // pp)
            t_stage = pair.teacher_layer // (teacher.num_layers // pp)
            if s_stage != t_stage:
                raise UserError(f"loss.intermediate: student layer {pair.student_layer} (stage {s_stage}) and teacher "
                                f"layer {pair.teacher_layer} (stage {t_stage}) are on different pipeline stages")
    elif cfg.loss.intermediate.pairs:
        raise UserError("loss.intermediate needs a teacher (mode kd)")
    if cfg.train.compile and (tp > 1 or pp > 1 or cfg.loss.intermediate.pairs):
        raise UserError("train.compile needs tensor and pipeline parallel sizes 1 and no loss.intermediate pairs")
    if cfg.train.fp8:
        check_fp8_train(cfg.train.fp8, cfg.train.seq_length, cfg.train.compile)
        check_fp8_shapes(student, tp)
        if online:
            check_fp8_shapes(teacher, tp, model="teacher")
    for component in prepared_components(cfg.data, "data"):
        data, meta = component.path, component.meta
        if meta.get("vocab_size", 0) > student.vocab_size:
            raise UserError(f"data: {data} was tokenized with {meta['vocab_size']} token ids, more than the "
                            f"student's vocab_size {student.vocab_size} (prepare it with the student's tokenizer)")
        for split in ("train", "valid"):
            tokens = meta.get(f"num_{split}_tokens")
            if tokens is not None and tokens < cfg.train.seq_length + 1:
                raise UserError(f"data: the {split} split of {data} has {tokens} tokens, fewer than one sequence "
                                f"of train.seq_length + 1 = {cfg.train.seq_length + 1}")
    checkpointing.check_resumable(Path(cfg.output) / "checkpoints", run_meta(student, cfg.train),
                                  cfg.checkpoint.resume)
    if cfg.teacher_cache is not None:
        check_teacher_cache(cfg.teacher_cache, cfg.data, cfg.train, resolve_model_dir(cfg.student), student.vocab_size,
                            cfg.teacher)
    # Last, as the slowest: every weight file is complete and has the shapes of its config.
    check_model(cfg.student)
    if online:
        try:
            check_model(cfg.teacher)
        except UserError as exc:
            raise UserError(f"teacher: {exc}") from None


class Trainer:
    """State of one distillation run on this rank (built by :func:`distill`). With ``teacher_cache`` instead of
    a teacher, the teacher's outputs are read from a logit cache (:mod:`~nemo_minitron.distill.cache`)."""

    def __init__(self, student: LoadedModel, teacher: Optional[LoadedModel], data: str | list[BlendComponent],
                 output: Path,
                 train: TrainConfig, optim: OptimConfig, loss: LossConfig, checkpoint: CheckpointConfig,
                 evaluation: EvalDuringTraining, log: LogConfig,
                 teacher_cache: Optional[TeacherCacheConfig] = None) -> None:
        if teacher is not None and teacher_cache is not None:
            raise UserError("give a teacher or a teacher_cache, not both")
        self.cached_teacher = (None if teacher_cache is None else
                               CachedTeacher(teacher_cache, data, train, loss, student.tokenizer_dir, student.cfg))
        self.student, self.teacher = student, teacher
        self.output, self.train_cfg, self.optim_cfg = output, train, optim
        self.loss_cfg, self.ckpt_cfg, self.eval_cfg, self.log_cfg = loss, checkpoint, evaluation, log
        # The models are built as training asks: both with its FP8 recipe, and the teacher with sequence
        # parallelism too, since both hidden states travel between pipeline stages as one tensor, split alike
        # along the sequence.
        built_as = [("student", student, "fp8", "fp8"),
                    ("teacher", teacher, "fp8", "fp8"),
                    ("student", student, "sequence_parallel", "sequence_parallel"),
                    ("teacher", teacher, "sequence_parallel", "sequence_parallel"),
                    ("student", student, "recompute", "recompute_granularity")]
        for name, model, option, attribute in built_as:
            built = None if model is None else getattr(model.model.config, attribute)
            if model is not None and built != getattr(train, option):
                raise UserError(f"train.{option} is {getattr(train, option)} but the {name} was built with "
                                f"{option}={built} (load it with load_model(..., {option}=train.{option}))")
        try:
            check_recompute(train, loss)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.pair = DistillationPair(student.model, teacher.model if teacher else None)
        if train.compile:
            for model in (student, teacher):
                if model is not None:
                    compile_layers(model.model)
        dp = state.dp_size()
        if train.global_batch_size % (train.micro_batch_size * dp):
            raise UserError(f"train.global_batch_size {train.global_batch_size} is not divisible by "
                            f"micro_batch_size x data-parallel size = {train.micro_batch_size * dp}")
        self.num_micro = train.global_batch_size // (train.micro_batch_size * dp)
        logit_cfg = loss.logits
        if teacher is None and teacher_cache is None:
            logit_cfg = logit_cfg.model_copy(update={"kd_weight": 0.0, "ce_weight": 1.0})
        self.logit_loss = FusedLogitKD(logit_cfg, student.cfg.vocab_size)
        self.intermediate = (
            IntermediateLosses(self.pair, loss.intermediate, train.seed)
            if teacher is not None and loss.intermediate.pairs
            else None
        )
        # (intermediate loss share, its term in the loss) of each micro-batch on a stage before the last.
        self.mid_stage_losses: list[tuple[float, float]] = []
        trainable = [student.model]
        if self.intermediate is not None and any(True for _ in self.intermediate.module.parameters()):
            trainable.append(self.intermediate.module)
        self.engine = TrainingEngine(trainable, lr=optim.lr, weight_decay=optim.weight_decay,
                                     betas=(optim.beta1, optim.beta2), eps=optim.eps)
        self.sampler = train_sampler(data, train.seq_length, train.micro_batch_size, seed=train.seed,
                                     dp_rank=state.dp_rank(), dp_size=dp)
        # Fixed held-out windows of each component of the data, read now: a split too short for one fails
        # before any training.
        self.heldout = heldout_sets(data, evaluation.seq_length or train.seq_length, evaluation.max_windows)
        self.eval_micro_batch_size = evaluation.micro_batch_size or train.micro_batch_size
        self.total_steps = train.steps()
        self.step = 0
        self.skipped_in_a_row = 0
        self.skipped = 0
        self.last_logit_loss: Optional[float] = None  # of the previous step (dynamic intermediate-loss balancing)
        self.last_loss = float("nan")  # of the last step: the result of a finished run that is run again
        self.stop_requested = False
        self.stage_module = self._stage_module()

    # ------------------------------------------------------------------ one step

    def _loss_fn(self, hidden: torch.Tensor, labels: torch.Tensor):
        """Last stage: hidden [b, s, h_s] (+ teacher's) -> (loss, report dict)."""
        flat_labels = labels.reshape(-1)
        teacher_hidden = self.pair.teacher_hidden
        if self.cached_teacher is not None:
            out = self.cached_teacher.loss(hidden.reshape(-1, hidden.shape[-1]), output_weight(self.pair.student),
                                           flat_labels)
        else:
            out = self.logit_loss(
                hidden.reshape(-1, hidden.shape[-1]),
                output_weight(self.pair.student),
                None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
                None if teacher_hidden is None else output_weight(self.pair.teacher),
                flat_labels,
                None,
            )
        total = out["loss"]
        report = {"kd": out["kd"].detach().clone(), "logit_loss": total.detach().clone()}
        if "ce" in out:
            report["ce"] = out["ce"].detach().clone()
        if self.intermediate is not None:
            terms = self.intermediate.loss(self.last_logit_loss)
            if terms is not None:
                share = self.intermediate.fraction
                is_loss, balanced = terms
                total = total + share * balanced
                report["intermediate"] = share * is_loss.detach().clone()
        report["loss"] = total.detach().clone()
        return total, report

    def _stage_module(self):
        """The pair, with mid-stage intermediate losses attached to what the stage sends on."""
        trainer = self

        class StageModule(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = trainer.pair
                # What megatron's schedules read from the model they run.
                self.config = trainer.pair.config
                self.model_type = trainer.pair.student.model_type

            def set_input_tensor(self, tensor) -> None:
                self.inner.set_input_tensor(tensor)

            def forward(self, input_ids, position_ids, attention_mask=None):
                out = self.inner(input_ids, position_ids, attention_mask)
                if trainer.intermediate is not None and not state.is_last_stage():
                    terms = trainer.intermediate.loss(trainer.last_logit_loss)
                    if terms is not None:
                        share = trainer.intermediate.fraction
                        is_loss, balanced = terms
                        trainer.mid_stage_losses.append(
                            (share * float(is_loss.detach()), share * float(balanced.detach())))
                        out = AttachAuxLoss.apply(out, balanced, share / trainer.num_micro)
                return out

        return StageModule()

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        if self.cached_teacher is not None:
            self.cached_teacher.read_step(self.step, micro_batches)
        self.engine.zero_grad()
        self.mid_stage_losses.clear()
        self.pair.student.train()
        reports = forward_backward(
            self.stage_module, micro_batches, self._loss_fn, forward_only=False,
            adjust_tensor_shapes_fn=pipeline_shapes(self.pair),
        )
        self.engine.finalize()
        metrics = self._mean_metrics(reports)
        lr = self.optim_cfg.lr_at(self.step, self.total_steps)
        norm, stepped = (self.engine.step(lr, self.optim_cfg.clip_grad) if math.isfinite(metrics["loss"])
                         else (float("nan"), False))
        metrics["grad_norm"] = norm
        if not stepped:
            self.skipped += 1
            self.skipped_in_a_row += 1
            metrics["skipped"] = 1.0
            if self.skipped_in_a_row > self.train_cfg.max_skipped_steps:
                raise UserError(f"step {self.step + 1}: loss or gradients not finite for {self.skipped_in_a_row} "
                                "steps in a row; stopping (the last checkpoint is intact)")
            return metrics
        self.skipped_in_a_row = 0
        metrics["lr"] = lr
        self.last_logit_loss = metrics.get("logit_loss", metrics["loss"])
        return metrics

    def _mean_metrics(self, reports: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        keys = sorted(reports[0]) if reports else []
        keys = state.broadcast_from_last_stage(keys)
        values = torch.zeros(len(keys), dtype=torch.float64)
        for r in reports:
            values += torch.stack([r[k].double() for k in keys]).cpu()
        values /= max(len(reports), 1)
        values = state.broadcast_from_last_stage(values)
        if self.intermediate is not None and state.pp_size() > 1:
            # Intermediate losses of earlier stages joined the gradient, not the last stage's report: add them.
            mid = torch.zeros(2, dtype=torch.float64)
            for share, term in self.mid_stage_losses:
                mid += torch.tensor([share, term], dtype=torch.float64)
            mid /= self.num_micro
            self.mid_stage_losses.clear()
            mid = state.all_reduce(mid, state.pp_group())
            if "intermediate" not in keys:
                keys = keys + ["intermediate"]
                values = torch.cat([values, torch.zeros(1, dtype=torch.float64)])
            values[keys.index("intermediate")] += mid[0]
            values[keys.index("loss")] += mid[1]
        if state.dp_size() > 1:
            values = state.all_reduce(values, state.dp_group()) / state.dp_size()
        return dict(zip(keys, values.tolist()))

    # ------------------------------------------------------------------ held-out evaluation

    def evaluate(self) -> tuple[float, float]:
        """Student's held-out loss and perplexity on the valid split: the ``eval`` stage's computation on the
        same windows every time (for a blend: each component's loss on its own windows, weighted as the blend)."""
        student = self.pair.student
        student.eval()
        loss = 0.0
        for heldout in self.heldout:
            total, count = windows_loss_sums(
                student, self.student.cfg.vocab_size, heldout.windows, self.eval_micro_batch_size,
                # The student's last stage returns hidden states (the KD loss projects them itself).
                to_logits=lambda hidden: torch.nn.functional.linear(hidden, output_weight(student)),
            )
            loss += heldout.weight * (total / count)
        return loss, math.exp(loss)

    # ------------------------------------------------------------------ checkpoints

    def _meta(self) -> dict:
        return run_meta(self.student.cfg, self.train_cfg)

    def _sharded_state(self, loading: bool = False) -> dict:
        """The run's state as megatron's sharded state dict: model and projection weights, optimizer state (per
        model parameter, so that it reshards), and the counters (plain values, the same on every rank)."""
        weights = {"model": self.pair.student.sharded_state_dict()}
        if self.intermediate is not None:
            weights["intermediate"] = self.intermediate.sharded_state_dict()
        return {
            **weights,
            "optimizer": self.engine.sharded_state_dict(weights, loading),
            "train": {
                "step": self.step,
                "skipped": self.skipped,
                "skipped_in_a_row": self.skipped_in_a_row,
                "last_logit_loss": self.last_logit_loss,
                "last_loss": self.last_loss,
            },
        }

    def _rng(self) -> dict:
        from megatron.core.tensor_parallel import random as mrandom

        tracker = mrandom.get_cuda_rng_tracker()
        return {"cpu": torch.get_rng_state(),
                "tracker": dict(tracker.get_states()) if hasattr(tracker, "get_states") else {}}

    def save(self) -> None:
        checkpointing.save(self.output / "checkpoints", self.step, self._sharded_state(), self._rng(), self._meta(),
                           self.ckpt_cfg.keep_last)

    def resume(self) -> bool:
        from megatron.core.tensor_parallel import random as mrandom

        found = checkpointing.load_latest(self.output / "checkpoints", self._meta(),
                                          lambda: self._sharded_state(loading=True))
        if found is None:
            return False
        loaded = found.state
        self.pair.student.load_state_dict(loaded["model"])
        if self.intermediate is not None:
            self.intermediate.load_sharded(loaded["intermediate"])
        self.engine.load_state_dict(loaded["optimizer"])
        counters = loaded["train"]
        self.step = int(counters["step"])
        self.skipped, self.skipped_in_a_row = int(counters["skipped"]), int(counters["skipped_in_a_row"])
        previous = counters["last_logit_loss"]
        self.last_logit_loss = None if previous is None else float(previous)
        self.last_loss = float(counters["last_loss"])
        if found.rng is not None:  # the same layout: every rank continues its own random streams
            torch.set_rng_state(found.rng["cpu"])
            if found.rng["tracker"]:
                mrandom.get_cuda_rng_tracker().set_states(found.rng["tracker"])
        return True

    # ------------------------------------------------------------------ the loop

    def run(self) -> DistillResult:
        if not dist.is_initialized() or dist.get_rank() == 0:
            checkpointing.remove_partial(self.output / "checkpoints")  # left by a run killed while saving
        checkpointing.check_resumable(self.output / "checkpoints", self._meta(), self.ckpt_cfg.resume)
        if self.ckpt_cfg.resume:
            self.resume()
        logger = RunLogger(self.output, self.log_cfg, self.total_steps, start_step=self.step)
        tokens_per_step = self.train_cfg.global_batch_size * self.train_cfg.seq_length
        batches = self.sampler.batches(start_sample=self.step * self.train_cfg.global_batch_size)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        start, start_step = time.perf_counter(), self.step
        eval_loss = eval_ppl = None
        try:
            while self.step < self.total_steps and not self._stop_everywhere():
                metrics = self.train_step([next(batches) for _ in range(self.num_micro)])
                self.step += 1
                self.last_loss = metrics["loss"]
                metrics["tokens"] = float(self.step * tokens_per_step)
                if (self.eval_cfg.every_steps and self.step % self.eval_cfg.every_steps == 0
                        and self.step < self.total_steps):
                    metrics["eval_loss"], metrics["eval_ppl"] = self.evaluate()
                logger.log(self.step, metrics)
                # Not amid non-finite steps: the newest checkpoints stay the last good ones. The last step
                # always, unless keep_when_done is off: running a finished run again then resumes there and
                # trains nothing.
                if self.step == self.total_steps:
                    if self.ckpt_cfg.keep_when_done:
                        self.save()
                elif self.step % self.ckpt_cfg.every_steps == 0 and self.skipped_in_a_row == 0:
                    self.save()
            stopped_early = self.step < self.total_steps
            if stopped_early:
                if self.step % self.ckpt_cfg.every_steps:  # (else saved just now, or step 0: nothing to keep)
                    self.save()
            else:
                eval_loss, eval_ppl = self.evaluate()
                logger.log(self.step, {"eval_loss": eval_loss, "eval_ppl": eval_ppl,
                                       "tokens": float(self.step * tokens_per_step)})
        finally:
            signal.signal(signal.SIGTERM, previous)
            logger.close()
        seconds = time.perf_counter() - start
        done_tokens = (self.step - start_step) * tokens_per_step
        return DistillResult(
            steps=self.step, tokens=self.step * tokens_per_step, final_loss=self.last_loss,
            eval_loss=eval_loss, eval_perplexity=eval_ppl, skipped_steps=self.skipped, seconds=seconds,
            tokens_per_second=done_tokens / seconds if seconds > 0 else 0.0, output=str(self.output),
            stopped_early=stopped_early, dtype=resolve(self.train_cfg.dtype),
        )

    def release(self) -> None:
        """Give the models back as they came: no forward or gradient hooks of training, outputs as logits."""
        if self.intermediate is not None:
            self.intermediate.remove()
        self.engine.release()
        self.pair.restore()

    def _on_sigterm(self, _signum, _frame) -> None:
        self.stop_requested = True

    def _stop_everywhere(self) -> bool:
        """A SIGTERM on any rank stops every rank after the same step."""
        return bool(state.all_reduce(torch.tensor([1 if self.stop_requested else 0])))


def distill(
    student: LoadedModel,
    teacher: Optional[LoadedModel],
    data: str | Path | list[BlendComponent],
    output: str | Path,
    train: TrainConfig,
    optim: OptimConfig = OptimConfig(),
    loss: LossConfig = LossConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    evaluation: EvalDuringTraining = EvalDuringTraining(),
    log: LogConfig = LogConfig(),
    teacher_cache: Optional[TeacherCacheConfig] = None,
) -> DistillResult:
    """Train ``student`` from ``teacher`` (or with CE alone when None) on the prepared dataset ``data`` (or a
    weighted blend of several).

    Checkpoints, ``metrics.jsonl`` and TensorBoard events go under ``output``; an existing checkpoint there is
    resumed when ``checkpoint.resume``. The trained weights stay in ``student.model``, which is returned to the
    caller without the hooks training puts on it. With ``teacher_cache`` (``teacher`` None) the teacher's
    outputs come from a logit cache written by ``cache-logits``.
    """
    trainer = Trainer(student, teacher, data if isinstance(data, list) else str(data), Path(output), train, optim,
                      loss, checkpoint, evaluation, log, teacher_cache)
    try:
        return trainer.run()
    finally:
        trainer.release()


def run_distill(cfg: DistillConfig) -> dict:
    """CLI stage: load teacher and student, train, save the student as ``<output>/final``. Global rank 0 holds
    the output directory's lock meanwhile: a second distillation into it stops before any work."""
    state.initialize(cfg.parallel, cfg.train.seed)
    with state.rank0_lock(Path(cfg.output), "output"):
        return _run_distill(cfg)


def _run_distill(cfg: DistillConfig) -> dict:
    fp8, sp = cfg.train.fp8, cfg.train.sequence_parallel
    make_student = load_model if cfg.student_init == "checkpoint" else new_model
    student = make_student(cfg.student, dtype=torch_dtype(cfg.train.dtype), fp8=fp8, sequence_parallel=sp,
                           recompute=cfg.train.recompute)
    student.model.train()
    teacher = (load_model(cfg.teacher, dtype=torch_dtype(cfg.train.teacher_dtype), fp8=fp8, sequence_parallel=sp)
               if cfg.mode == "kd" and cfg.teacher_cache is None else None)
    result = distill(student, teacher, cfg.data, cfg.output, cfg.train, cfg.optim, cfg.loss, cfg.checkpoint,
                     cfg.eval, cfg.log, cfg.teacher_cache)
    final = Path(cfg.output) / "final"
    if not result.stopped_early:
        if not dist.is_initialized() or dist.get_rank() == 0:
            remove_leftovers(final)  # of an earlier run killed while saving it
        save_checkpoint(student, final, overwrite=True)
    summary = {**result.__dict__, "final": str(final)}
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(Path(cfg.output) / "result.json",
                          json.dumps({**summary, "config": cfg.model_dump()}, indent=2))
    if not result.stopped_early and not cfg.checkpoint.keep_when_done:
        checkpointing.remove_all(Path(cfg.output) / "checkpoints")
    return summary
