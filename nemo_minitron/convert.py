"""The ``import-hf`` and ``export-hf`` stages: Hugging Face directories <-> nemo_minitron checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from nemo_minitron.checkpoint.hf import check_exportable
from nemo_minitron.checkpoint.integrity import check_model
from nemo_minitron.checkpoint.io import export_hf, load_model, read_model_config, resolve_model_dir, save_checkpoint
from nemo_minitron.config import StrictModel
from nemo_minitron.eval import DTYPES
from nemo_minitron.fsutil import check_can_create
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.sharding import check_divisible


class ConvertConfig(StrictModel):
    """Load ``source`` at the given TP/PP split and write it to ``output``."""

    source: str = Field(min_length=1, description="model directory or embedded:...")
    output: str = Field(min_length=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    overwrite: bool = False
    parallel: state.ParallelConfig = state.ParallelConfig()


def validate(cfg: ConvertConfig) -> ModelConfig:
    """Checks that need no compute: the source exists and splits into the requested TP/PP."""
    model_cfg = read_model_config(resolve_model_dir(cfg.source))
    check_divisible(model_cfg, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    check_can_create(cfg.output, "output", directory=True)
    check_model(cfg.source)
    return model_cfg


def validate_export(cfg: ConvertConfig) -> None:
    """As :func:`validate`, and the architecture must be one transformers can load."""
    check_exportable(validate(cfg))


def import_hf(cfg: ConvertConfig) -> Path:
    """HF (or any supported) model -> nemo_minitron checkpoint (canonical layout, loads at any TP/PP)."""
    state.initialize(cfg.parallel)
    save_checkpoint(load_model(cfg.source, dtype=DTYPES[cfg.dtype]), Path(cfg.output), cfg.overwrite)
    return Path(cfg.output)


def export_hf_dir(cfg: ConvertConfig) -> Path:
    """nemo_minitron checkpoint (or HF model) -> Hugging Face directory for transformers / vLLM / TRT-LLM."""
    state.initialize(cfg.parallel)
    loaded = load_model(cfg.source, dtype=DTYPES[cfg.dtype])
    export_hf(loaded, Path(cfg.output), cfg.overwrite, dtype=DTYPES[cfg.dtype])
    return Path(cfg.output)
