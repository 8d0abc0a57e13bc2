"""Configs of the ``distill`` stage and of every distillation that ``run``, ``nas`` and ``bench`` start.

Plain data: reading a config imports neither torch nor megatron. The machinery that uses them is
:mod:`nemo_minitron.distill.trainer` (the loop), :mod:`~nemo_minitron.distill.losses` (logit KD) and
:mod:`~nemo_minitron.distill.intermediate` (intermediate-state distillation).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_validator

from nemo_minitron.config import StrictModel
from nemo_minitron.data.config import DataSource
from nemo_minitron.dtypes import Dtype, Fp8
from nemo_minitron.parallel.config import ParallelConfig


class TrainSettings(StrictModel):
    """Batch shape, precision and seed of a distillation; how long it runs is given apart (``TrainConfig``'s
    ``max_steps`` / ``max_tokens``, or a token budget of the ``run`` job)."""

    seq_length: int = Field(512, ge=2)
    micro_batch_size: int = Field(4, gt=0)
    global_batch_size: int = Field(16, gt=0)
    dtype: Dtype = Field("auto", description="student compute dtype (fp32 master weights and gradients); auto: "
                                             "bfloat16 where this machine computes it natively, else float32")
    teacher_dtype: Dtype = "auto"
    seed: int = 1234
    max_skipped_steps: int = Field(10, ge=0, description="non-finite steps skipped in a row before stopping")
    compile: bool = Field(False, description="torch.compile each transformer layer (TP = PP = 1, no "
                                             "intermediate losses): fused element-wise work, compiled in the "
                                             "first steps")
    fp8: Optional[Fp8] = Field(None, description="FP8 GEMMs in the transformer layers of student and teacher "
                                                 "(Transformer Engine, delayed scaling; needs CUDA and TE): "
                                                 "hybrid (E4M3 forward, E5M2 gradients) or e4m3")
    sequence_parallel: bool = Field(False, description="split the sequence over the tensor-parallel ranks "
                                                       "outside the tensor-parallel GEMMs (norms, residual "
                                                       "additions) in student and teacher; needs TP > 1")
    recompute: Optional[Literal["selective", "full"]] = Field(
        None, description="recompute the student's activations in backward instead of keeping them: selective "
                          "(core attention) or full (every transformer layer from its input)")

    @model_validator(mode="after")
    def _batches(self) -> "TrainSettings":
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"micro_batch_size {self.micro_batch_size}"
            )
        return self

    def check_parallel(self, parallel: ParallelConfig, prefix: str = "train") -> None:
        """ValueError unless this training fits the parallel layout (``prefix``: where the section is)."""
        tp = parallel.tensor_model_parallel_size
        if self.sequence_parallel and tp == 1:
            raise ValueError(f"{prefix}.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
        if self.sequence_parallel and self.seq_length % tp:
            raise ValueError(f"{prefix}.sequence_parallel splits {prefix}.seq_length {self.seq_length} over "
                             f"parallel.tensor_model_parallel_size {tp}: it must be divisible by it")

    def for_tokens(self, tokens: int) -> "TrainConfig":
        """The ``train`` section of a distillation of ``tokens`` tokens with these settings."""
        return TrainConfig(**self.model_dump(), max_tokens=tokens)


class TrainConfig(TrainSettings):
    """:class:`TrainSettings` and the length of the run: exactly one of ``max_steps`` and ``max_tokens``."""

    max_steps: Optional[int] = Field(None, gt=0)
    max_tokens: Optional[int] = Field(None, gt=0, description="alternative to max_steps")

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps and max_tokens")
        return self

    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.max_tokens / (self.global_batch_size * self.seq_length))


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0, description="max global gradient norm; 0 turns clipping off")

    @model_validator(mode="after")
    def _lrs(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        return self

    def lr_at(self, step: int, total: int) -> float:
        """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at ``total``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(total - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


class LogitKDConfig(StrictModel):
    """Logit distillation (Minitron: forward KL at temperature 1, logits only)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # Minitron: forward KL, tau=1
    temperature: float = Field(1.0, gt=0)
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    top_k: Optional[int] = Field(None, gt=0)  # keep only the teacher's top-k logits (renormalised)
    # Tokens per chunk, which bounds peak memory: a forward without gradients holds two [chunk, V/tp] fp32
    # buffers; training holds four, over chunks of a quarter of this.
    chunk_tokens: int = Field(1024, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)  # optional LM cross-entropy on the labels, mixed in

    @model_validator(mode="after")
    def _top_k_only_with_forward_kl(self) -> "LogitKDConfig":
        # The truncated teacher has zero probability outside its top-k tokens. Reverse KL and JSD weight log p_t
        # by the student's probabilities over the whole vocabulary, where log p_t = -inf: reverse KL is infinite
        # and JSD would silently become a divergence to a different (student-restricted) distribution.
        if self.top_k is not None and self.divergence != "forward_kl":
            raise ValueError(f"top_k is only defined for divergence 'forward_kl', not '{self.divergence}'")
        return self


class IntermediatePair(StrictModel):
    student_layer: int = Field(ge=0)
    teacher_layer: int = Field(ge=0)


class IntermediateConfig(StrictModel):
    """Intermediate-state distillation: match chosen student layer outputs to teacher layer outputs."""

    pairs: list[IntermediatePair] = []
    loss: Literal["cosine", "mse"] = "cosine"
    weight: float = Field(1.0, ge=0)
    # dynamic: scale L_is to the magnitude of the previous step's L_logits (see distill.intermediate)
    balancing: Literal["fixed", "dynamic"] = "fixed"


class LossConfig(StrictModel):
    logits: LogitKDConfig = LogitKDConfig()
    intermediate: IntermediateConfig = IntermediateConfig()


def check_recompute(train: TrainSettings, loss: LossConfig) -> None:
    """ValueError if ``train.recompute`` would silently drop the intermediate-state losses' gradient."""
    # Full recomputation runs each layer's forward without autograd and again in backward: the layer
    # outputs that the intermediate losses read in the forward pass carry no gradient.
    if train.recompute == "full" and loss.intermediate.pairs:
        raise ValueError("train.recompute full cannot be combined with loss.intermediate pairs (the layer "
                         "outputs they compare carry no gradient then): use recompute selective or none")


def check_cache_loss(loss: LossConfig) -> None:
    """ValueError unless ``loss`` can be computed from a teacher logit cache."""
    logits = loss.logits
    # The cache holds the teacher's distribution at temperature 1, cut to its top-k: a tempered teacher or a
    # divergence over the whole vocabulary cannot be rebuilt from it.
    if logits.divergence != "forward_kl" or logits.temperature != 1:
        raise ValueError("teacher_cache needs loss.logits.divergence forward_kl at temperature 1 (the cache holds "
                         "the teacher's top-k at temperature 1)")
    if logits.top_k is not None:
        raise ValueError("with teacher_cache, set teacher_cache.top_k instead of loss.logits.top_k")
    if loss.intermediate.pairs:
        raise ValueError("loss.intermediate needs the teacher's hidden states: not available from teacher_cache")


class CheckpointConfig(StrictModel):
    every_steps: int = Field(100, gt=0)
    keep_last: int = Field(2, gt=0)
    resume: bool = True
    keep_when_done: bool = Field(
        True, description="false: no checkpoint at the last step, and the periodic ones are deleted once the final "
        "model is saved (a finished run then has nothing to resume: running it again trains again)")


class EvalDuringTraining(StrictModel):
    """Held-out loss of the student during and at the end of training, computed exactly as the ``eval`` stage
    computes it on the same windows (``seq_length`` tokens each, the first ``max_windows`` of the valid split)."""

    every_steps: int = Field(100, ge=0, description="0: only at the end")
    max_windows: Optional[int] = Field(16, gt=0, description="none: every window of the valid split")
    seq_length: Optional[int] = Field(None, ge=2, description="tokens per window; none: train.seq_length")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="none: train.micro_batch_size")


class LogConfig(StrictModel):
    every_steps: int = Field(1, gt=0)
    tensorboard: bool = True
    progress: bool = True


class TrainingSections(StrictModel):
    """What every distillation configures beside its ``train`` section: the ``distill`` stage's config and the
    ``run`` job's ``distill`` section both have these."""

    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalDuringTraining = EvalDuringTraining()
    log: LogConfig = LogConfig()


class TeacherCacheConfig(StrictModel):
    """Distil from a teacher logit cache written by ``cache-logits`` instead of running the teacher."""

    path: str = Field(min_length=1, description="the cache directory (its index.json)")
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket", description="bucket: the teacher's probability mass outside its cached top-k is one more bucket "
                              "(forward KL over k + 1 buckets, the student's bucket is its mass outside those k "
                              "tokens); renormalize: the top-k alone, renormalised")
    top_k: Optional[int] = Field(None, gt=0, description="read only the first top_k of the cached tokens (the "
                                                         "rest joins the tail); none: all of them")


class DistillConfig(TrainingSections):
    """The ``distill`` stage. ``mode: ce`` trains ``student`` alone with the LM loss (no teacher).

    ``teacher_cache``: the teacher's outputs come from a logit cache and no teacher is built; ``teacher``, when
    given beside it, is only checked against the teacher the cache was made from."""

    mode: Literal["kd", "ce"] = "kd"
    student: str = Field(min_length=1)
    student_init: Literal["checkpoint", "random"] = Field(
        "checkpoint", description="random: the student's architecture from freshly initialised weights (a "
                                  "from-scratch baseline)")
    teacher: Optional[str] = None
    teacher_cache: Optional[TeacherCacheConfig] = None
    data: DataSource = Field(description="prepared dataset directory (prepare-data), or a weighted blend of several: "
                                         "[{weight, path}, ...]")
    output: str = Field(min_length=1)
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _teacher(self) -> "DistillConfig":
        if self.mode == "kd" and not (self.teacher or self.teacher_cache):
            raise ValueError("mode kd needs a teacher or a teacher_cache")
        if self.mode == "ce" and (self.teacher or self.teacher_cache):
            raise ValueError("mode ce trains without a teacher: remove teacher and teacher_cache")
        return self

    @model_validator(mode="after")
    def _cache(self) -> "DistillConfig":
        if self.teacher_cache is not None:
            check_cache_loss(self.loss)
        return self

    @model_validator(mode="after")
    def _parallel(self) -> "DistillConfig":
        self.train.check_parallel(self.parallel)
        return self

    @model_validator(mode="after")
    def _recompute(self) -> "DistillConfig":
        check_recompute(self.train, self.loss)
        return self


class CacheLogitsConfig(StrictModel):
    """The ``cache-logits`` stage: the teacher's top-k log-probabilities on the windows a distillation reads.

    The windows are the first ``windows`` of the distillation sampler's global order for ``seq_length`` and
    ``seed`` (``train.seq_length`` and ``train.seed`` of the distillation that reads the cache): a distillation
    of S steps of global batch G reads S x G of them, whatever its micro-batch size and parallel layout."""

    teacher: str = Field(min_length=1)
    data: DataSource = Field(description="prepared dataset directory (prepare-data), or a weighted blend of several "
                                         "(the distillation's data)")
    output: str = Field(min_length=1)
    seq_length: int = Field(512, ge=2)
    seed: int = Field(1234, description="the distillation's train.seed: it orders the windows")
    windows: Optional[int] = Field(None, gt=0, description="how many windows of the global order to cache")
    max_tokens: Optional[int] = Field(None, gt=0, description="alternative to windows: ceil(max_tokens / "
                                                              "seq_length) windows")
    top_k: int = Field(64, gt=0)
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="of the stored log-probabilities")
    teacher_dtype: Dtype = "auto"
    micro_batch_size: int = Field(4, gt=0)
    windows_per_shard: int = Field(64, gt=0, description="windows per shard file (a multiple of "
                                                         "micro_batch_size)")
    chunk_tokens: int = Field(1024, gt=0, description="tokens per chunk of the output projection")
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _shape(self) -> "CacheLogitsConfig":
        if (self.windows is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of windows and max_tokens")
        if self.windows_per_shard % self.micro_batch_size:
            raise ValueError(f"windows_per_shard {self.windows_per_shard} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self

    def num_windows(self) -> int:
        if self.windows is not None:
            return self.windows
        return math.ceil(self.max_tokens / self.seq_length)
