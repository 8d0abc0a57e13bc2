"""The ``run`` job: one strict config for the whole Minitron pipeline.

    data -> [teacher correction] -> eval teacher -> for each schedule step: prune (a fixed target or NAS) ->
    eval pruned -> distill -> eval -> export HF -> report

Paths (prepared data, checkpoints, reports) are all derived from ``output``, the run directory.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from nemo_minitron.chat.config import GenerateSettings
from nemo_minitron.config import StrictModel
from nemo_minitron.data.config import DataSource
from nemo_minitron.distill.config import (
    OptimConfig,
    TeacherCacheConfig,
    TrainingSections,
    TrainSettings,
    check_cache_loss,
    check_recompute,
)
from nemo_minitron.dtypes import Dtype
from nemo_minitron.parallel.config import ParallelConfig
from nemo_minitron.prune.config import IMPORTANCE_DTYPE, CalibrationConfig, Correction, ImportanceConfig, PruneTarget


class RunCorpus(StrictModel):
    """One corpus of a training blend, with its share of the training samples."""

    weight: float = Field(gt=0, description="relative share of training samples (weights need not sum to 1)")
    input: str = Field(min_length=1, description="file, folder, glob or embedded:...")


class OutOfBlendText(StrictModel):
    """A text in no training blend: prepared like the corpora, and only its held-out split is ever read (by
    the eval stages); no stage trains, calibrates or searches on any of it."""

    input: str = Field(min_length=1, description="file, folder, glob or embedded:...")
    valid_fraction: float = Field(0.5, gt=0, lt=1)


GENERATED = "generated chat answers"  # the name of the ``data.generated`` component in reports


class GeneratedData(GenerateSettings):
    """The run teacher's sampled answers to chat prompts (the ``generate`` stage, run on the teacher as given,
    before any teacher correction), chat-rendered into ``<output>/data/generated`` and blended in with
    ``weight``; its held-out prompts are evaluated as a component of their own."""

    weight: float = Field(gt=0, description="relative share of training samples, against the corpora's weights")


class RunData(StrictModel):
    """The corpus (``input``) or weighted blend of corpora (``blend``), each tokenized with the teacher's
    tokenizer into the run directory, optionally the teacher's generated chat answers blended in
    (``generated``), and the out-of-blend texts evaluated beside them."""

    input: Optional[str] = Field(None, min_length=1, description="one corpus: file, folder, glob or embedded:...")
    blend: list[RunCorpus] = Field([], description="several corpora with weights, instead of input")
    generated: Optional[GeneratedData] = Field(None, description="the teacher's chat answers, blended in")
    out_of_blend: list[OutOfBlendText] = Field([], description="texts scored by every eval stage, never trained on")
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 1234
    jsonl_text_key: str = Field("text", min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> "RunData":
        if (self.input is None) == (not self.blend):
            raise ValueError("give exactly one of input (one corpus) and blend (weighted corpora)")
        inputs = [self.input] if self.input is not None else [c.input for c in self.blend]
        inputs += [t.input for t in self.out_of_blend]
        for i, ref in enumerate(inputs):
            if ref in inputs[:i]:
                raise ValueError(f"{ref} is listed twice (an out-of-blend text must be in no blend)")
        return self

    def corpora(self) -> list[tuple[str, float]]:
        """``(input, weight)`` of each training corpus (one corpus: weight 1)."""
        if self.input is not None:
            return [(self.input, 1.0)]
        return [(c.input, c.weight) for c in self.blend]

    def blended(self) -> bool:
        """Whether training reads a blend (of corpora, or of one corpus and the generated answers)."""
        return self.input is None or self.generated is not None

    def components(self) -> list[tuple[str, float]]:
        """``(name, weight)`` of each component of the training data, in blend order: the corpora by their
        ``input``, then the generated answers (:data:`GENERATED`)."""
        return self.corpora() + ([(GENERATED, self.generated.weight)] if self.generated is not None else [])


class RunCalibration(StrictModel):
    """Calibration batches for importance, drawn from the train split."""

    num_samples: int = Field(1024, gt=0)
    seq_length: int = Field(512, ge=2)
    micro_batch_size: int = Field(4, gt=0)
    seed: int = 1234


class AutoTeacherCache(StrictModel):
    """``teacher_cache: auto``: one teacher logit cache (``cache-logits``) for every distillation that reads the
    same tokens; ``auto`` takes these defaults, a mapping sets them."""

    top_k: int = Field(64, gt=0, description="cached tokens per position")
    tail: Literal["bucket", "renormalize"] = Field("bucket", description="as teacher_cache.tail of distill")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="of the stored log-probabilities")


class RunDistill(TrainingSections):
    """How every distillation of the run trains (its length is the schedule step's ``kd_tokens``; its periodic
    held-out loss uses the run's ``eval`` windows)."""

    train: TrainSettings = TrainSettings()
    teacher_cache: Optional[AutoTeacherCache] = Field(
        None, description="auto: run the teacher once into a logit cache that every distillation (NAS "
                          "candidates, schedule steps) reads instead of running it; none: the teacher runs "
                          "beside each student")

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value != "auto":
                raise ValueError(f"give auto, a mapping (top_k, tail, dtype) or null, not {value!r}")
            return {}
        return value

    @model_validator(mode="after")
    def _recompute(self) -> "RunDistill":
        check_recompute(self.train, self.loss)
        return self

    @model_validator(mode="after")
    def _cache(self) -> "RunDistill":
        if self.teacher_cache is not None:
            check_cache_loss(self.loss)
        return self

    def windows(self, tokens: int) -> int:
        """Windows of a teacher logit cache that a distillation of ``tokens`` tokens reads (steps x global
        batch); 0 for none."""
        return self.train.for_tokens(tokens).steps() * self.train.global_batch_size if tokens else 0

    def cache_reader(self, path: str) -> TeacherCacheConfig:
        """How a distillation reads the cache at ``path`` that ``teacher_cache`` wrote."""
        return TeacherCacheConfig(path=path, tail=self.teacher_cache.tail)


class TeacherCorrection(StrictModel):
    """Fine-tune the teacher with the LM loss on the distillation data before pruning (Minitron §4)."""

    tokens: int = Field(gt=0)
    optim: OptimConfig = OptimConfig()


class SearchSpace(StrictModel):
    """Values to try per dimension; an empty list keeps the current model's value."""

    hidden_size: list[int] = []
    ffn_hidden_size: list[int] = []
    num_attention_heads: list[int] = []
    num_query_groups: list[int] = []
    num_layers: list[int] = []

    @model_validator(mode="after")
    def _positive(self) -> "SearchSpace":
        for name, values in self:
            if any(v <= 0 for v in values):
                raise ValueError(f"{name}: sizes must be positive")
        if not any(values for _, values in self):
            raise ValueError("give at least one dimension to search")
        return self


class NASConfig(StrictModel):
    """Architecture search for schedule steps that give ``params`` instead of a ``target``.

    Every candidate of ``search`` whose parameter count lies in ``[budget * (1 - tolerance), budget]`` is
    pruned from the same importance scores; the ``top_k`` lowest held-out losses right after pruning get
    ``short_kd_tokens`` of distillation each; the lowest held-out loss after it wins.
    """

    search: SearchSpace
    tolerance: float = Field(0.05, ge=0, lt=1)
    top_k: int = Field(3, gt=0)
    short_kd_tokens: int = Field(16384, ge=0)
    max_candidates: int = Field(32, gt=0)
    eval_windows: int = Field(16, gt=0, description="held-out windows (of train.seq_length) that rank candidates")


class PruneCorrectionKeys(StrictModel):
    """Weight correction after every cut of a stage that prunes (the ``prune`` stage's ``correction`` and
    ``correction_damping``, :mod:`nemo_minitron.prune.correction`)."""

    prune_correction: Correction = Field(
        "none", description="lsq: re-fit the linear layers that read pruned units by ridge least squares on the "
                            "calibration activations (the prune stage's correction)")
    prune_correction_damping: float = Field(0.01, gt=0, description="lsq ridge strength (the prune stage's "
                                                                    "correction_damping)")


class NASStageConfig(PruneCorrectionKeys):
    """The ``nas`` stage: search ``nas.search`` around ``model`` for ``params`` parameters."""

    model: str = Field(min_length=1)
    teacher: str = Field(min_length=1, description="distils the short-listed candidates")
    data: DataSource = Field(description="prepared dataset, or a weighted blend of several ([{weight, path}, ...]): "
                                         "calibration (train) and ranking (valid)")
    output: str = Field(min_length=1)
    params: float = Field(gt=0, description="a fraction of the model's parameters, or an absolute count if > 1")
    nas: NASConfig
    calibration: CalibrationConfig
    importance: ImportanceConfig = ImportanceConfig()
    distill: RunDistill = RunDistill()
    prune_dtype: Optional[Dtype] = Field(None, description=IMPORTANCE_DTYPE)
    overwrite: bool = False
    parallel: ParallelConfig = ParallelConfig()
    seed: int = 1234
    teacher_cache: Optional[TeacherCacheConfig] = Field(
        None, description="a logit cache written before (by run) that the short distillations read; with "
                          "distill.teacher_cache auto and none given, nas writes one under output")

    @model_validator(mode="after")
    def _parallel(self) -> "NASStageConfig":
        self.distill.train.check_parallel(self.parallel, "distill.train")
        return self

    @model_validator(mode="after")
    def _cache(self) -> "NASStageConfig":
        if self.teacher_cache is not None:
            check_cache_loss(self.distill.loss)
        return self


class ScheduleStep(StrictModel):
    """One prune -> distill round: a fixed ``target``, or ``params`` (a fraction of the original teacher's
    parameter count, or an absolute count when > 1) searched with ``nas``."""

    target: Optional[PruneTarget] = None
    params: Optional[float] = Field(None, gt=0)
    kd_tokens: int = Field(ge=0)

    @model_validator(mode="after")
    def _one_target(self) -> "ScheduleStep":
        if (self.target is None) == (self.params is None):
            raise ValueError("give exactly one of target and params")
        return self


class RunEval(StrictModel):
    """Held-out evaluation of the teacher, every pruned and every distilled model (the valid split)."""

    seq_length: int = Field(512, ge=2)
    micro_batch_size: int = Field(4, gt=0)
    max_windows: Optional[int] = Field(None, gt=0)
    dtype: Dtype = "float32"


class RunReport(StrictModel):
    """What the report shows besides losses: greedy generation speed in transformers on this machine, and the
    teacher's and the student's greedy answers to a few chat prompts, side by side."""

    generation_prompts: list[str] = ["To be, or not to be, that is the question:"]
    generation_tokens: int = Field(64, ge=0, description="0 skips the generation benchmark")
    chat_prompts: list[str] = Field(["Who wrote Macbeth?", "What is the capital of France?",
                                     "Give me three tips for sleeping better."], min_length=1)
    chat_tokens: int = Field(48, ge=0, description="longest chat answer in tokens; 0 skips the chat answers")


class RunConfig(PruneCorrectionKeys):
    """The whole pipeline. Every stage writes under ``output`` and is skipped when already complete."""

    output: str = Field(min_length=1, description="run directory")
    teacher: str = Field(min_length=1, description="HF or nemo_minitron model directory, or embedded:...")
    data: RunData
    teacher_correction: Optional[TeacherCorrection] = None
    calibration: RunCalibration = RunCalibration()
    importance: ImportanceConfig = ImportanceConfig()
    schedule: list[ScheduleStep] = Field(min_length=1)
    nas: Optional[NASConfig] = None
    distill: RunDistill = RunDistill()
    eval: RunEval = RunEval()
    report: RunReport = RunReport()
    prune_dtype: Optional[Dtype] = Field(None, description=IMPORTANCE_DTYPE)
    rerun_from: Optional[str] = Field(None, description="redo this stage and every later one")
    parallel: ParallelConfig = ParallelConfig()
    seed: int = 1234

    @model_validator(mode="after")
    def _one_evaluation(self) -> "RunConfig":
        # The loss curve of every distillation is drawn against the eval stages' results: one set of windows.
        taken = sorted({"seq_length", "max_windows", "micro_batch_size"} & self.distill.eval.model_fields_set)
        if taken:
            raise ValueError(f"distill.eval.{taken[0]}: the periodic evaluation uses the run's eval section "
                             "(eval.seq_length, eval.max_windows, eval.micro_batch_size)")
        return self

    @model_validator(mode="after")
    def _parallel(self) -> "RunConfig":
        self.distill.train.check_parallel(self.parallel, "distill.train")
        return self

    @model_validator(mode="after")
    def _nas_when_searched(self) -> "RunConfig":
        if any(step.params is not None for step in self.schedule) and self.nas is None:
            raise ValueError("a schedule step gives params: configure nas (its search space)")
        return self
