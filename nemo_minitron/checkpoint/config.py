"""Configs of the ``import-hf``, ``export-hf`` and ``export`` stages (plain data: no torch, no megatron)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from nemo_minitron.config import StrictModel
from nemo_minitron.dtypes import Dtype
from nemo_minitron.parallel.config import ParallelConfig

# Weight types of a Hugging Face export (GGUF also takes q8_0).
HF_WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


class ConvertConfig(StrictModel):
    """Load ``source`` at the given TP/PP split and write it to ``output``."""

    source: str = Field(min_length=1, description="model directory or embedded:...")
    output: str = Field(min_length=1)
    dtype: Dtype = "float32"
    overwrite: bool = False
    parallel: ParallelConfig = ParallelConfig()


class ExportConfig(ConvertConfig):
    """Export ``source`` (a checkpoint, or any supported model) for deployment: an HF directory or a GGUF file."""

    format: Literal["hf", "gguf"]
    dtype: Optional[Literal["float32", "float16", "bfloat16", "q8_0"]] = Field(
        None, description="weights' type; default float32 for hf, float16 for gguf (q8_0: gguf only)"
    )

    @property
    def weight_dtype(self) -> str:
        return self.dtype or {"hf": "float32", "gguf": "float16"}[self.format]
