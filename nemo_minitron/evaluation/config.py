"""Configs of the ``eval`` and ``generation-speed`` stages (plain data: no torch, no megatron)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_serializer

from nemo_minitron.config import StrictModel
from nemo_minitron.data.config import DataSource
from nemo_minitron.dtypes import Dtype
from nemo_minitron.parallel.config import ParallelConfig

LAMBADA_LOCAL = "lambada_local"


class HarnessConfig(StrictModel):
    """The ``harness`` section of an ``eval`` config (``backend: lm-eval``)."""

    tasks: list[str] = Field([LAMBADA_LOCAL], min_length=1,
                             description="lambada_local (built from `data`) and/or lm-eval task or group names")
    num_fewshot: Optional[int] = Field(None, ge=0, description="none: each task's own default (0 for most)")
    limit: Optional[int] = Field(None, ge=1, description="at most this many examples per task (the first ones)")
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    context_words: int = Field(48, ge=1, description="lambada_local: words of context before each target")
    bootstrap_iters: int = Field(1000, ge=0, description="resamples for stderrs like perplexity's (0: no stderr)")


class EvalConfig(StrictModel):
    """What to evaluate (``model``), on what (``data``: a prepared dataset directory or a text file)."""

    model: str = Field(min_length=1, description="HF or nemo_minitron model directory, or embedded:...")
    data: Optional[DataSource] = Field(None, description="prepared dataset directory (see prepare-data), a text "
                                                         "file, or a weighted blend of prepared datasets "
                                                         "([{weight, path}, ...]: each scored on its own)")
    split: Literal["train", "valid"] = "valid"
    seq_length: int = Field(512, ge=2)
    micro_batch_size: int = Field(4, ge=1)
    max_windows: Optional[int] = Field(None, ge=1)
    dtype: Dtype = "float32"
    backend: Literal["megatron", "hf", "lm-eval"] = Field(
        "megatron", description="hf: run transformers (HF models only); lm-eval: the `harness` tasks instead")
    harness: HarnessConfig = HarnessConfig()
    parallel: ParallelConfig = ParallelConfig()
    output: Optional[str] = Field(None, description="write the result as JSON here")
    seed: int = 1234

    @model_serializer(mode="wrap")
    def _harness_only_for_lm_eval(self, handler):
        # Configs of the other backends dump as they did before `harness` existed: the digests of finished
        # `run` stages in pipeline.json stay valid. (validate rejects a harness section they would lose.)
        data = handler(self)
        if self.backend != "lm-eval":
            data.pop("harness", None)
        return data


class GenerationConfig(StrictModel):
    """The ``generation-speed`` stage: greedy decoding speed of two HF models on this machine (transformers,
    fp32, batch 1), measured alternately in one process."""

    teacher: str = Field(min_length=1, description="HF model directory")
    student: str = Field(min_length=1, description="HF model directory")
    prompts: list[str] = Field(min_length=1)
    new_tokens: int = Field(64, gt=0)
    repeats: int = Field(2, gt=0)
