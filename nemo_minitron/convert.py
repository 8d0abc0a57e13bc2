"""The ``import-hf``, ``export-hf`` and ``export`` stages: Hugging Face directories and GGUF files <->
nemo_minitron checkpoints."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.checkpoint.config import HF_WEIGHT_DTYPES, ConvertConfig, ExportConfig
from nemo_minitron.checkpoint.gguf_export import read_tokenizer
from nemo_minitron.checkpoint.hf import check_exportable
from nemo_minitron.checkpoint.integrity import check_model
from nemo_minitron.checkpoint.io import (
    export_gguf,
    export_hf,
    load_model,
    read_model_config,
    resolve_model_dir,
    save_checkpoint,
)
from nemo_minitron.dtypes import torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import check_can_create
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.sharding import check_divisible


def validate(cfg: ConvertConfig, output_is_directory: bool = True) -> ModelConfig:
    """Checks that need no compute: the source exists, is intact and splits into the requested TP/PP, and the
    output can be created."""
    model_cfg = read_model_config(resolve_model_dir(cfg.source))
    check_divisible(model_cfg, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    check_can_create(cfg.output, "output", directory=output_is_directory)
    check_model(cfg.source)
    return model_cfg


def validate_export(cfg: ConvertConfig) -> None:
    """As :func:`validate`, and the architecture must be one transformers can load."""
    check_exportable(validate(cfg))


def import_hf(cfg: ConvertConfig) -> Path:
    """HF (or any supported) model -> nemo_minitron checkpoint (canonical layout, loads at any TP/PP)."""
    state.initialize(cfg.parallel)
    save_checkpoint(load_model(cfg.source, dtype=torch_dtype(cfg.dtype)), Path(cfg.output), cfg.overwrite)
    return Path(cfg.output)


def export_hf_dir(cfg: ConvertConfig) -> Path:
    """nemo_minitron checkpoint (or HF model) -> Hugging Face directory for transformers / vLLM / TRT-LLM."""
    state.initialize(cfg.parallel)
    loaded = load_model(cfg.source, dtype=torch_dtype(cfg.dtype))
    export_hf(loaded, Path(cfg.output), cfg.overwrite, dtype=torch_dtype(cfg.dtype))
    return Path(cfg.output)


def validate_export_any(cfg: ExportConfig) -> None:
    """Every check of ``export`` that needs no compute: source, parallel split, format x dtype, output
    path, and what the target format needs (a transformers-loadable shape, a llama.cpp tokenizer)."""
    model_cfg = validate(cfg, output_is_directory=cfg.format == "hf")
    out = Path(cfg.output)
    if cfg.format == "hf":
        if cfg.weight_dtype not in HF_WEIGHT_DTYPES:
            choices = ", ".join(HF_WEIGHT_DTYPES)
            raise UserError(f"dtype: {cfg.weight_dtype} is a GGUF type (use format=gguf, or one of {choices})")
        check_exportable(model_cfg)
    else:
        if out.suffix != ".gguf":
            raise UserError(f"output: a GGUF export is one file named *.gguf, got {cfg.output}")
        if out.is_dir():
            raise UserError(f"output: {cfg.output} is a directory")
        read_tokenizer(resolve_model_dir(cfg.source), model_cfg.vocab_size)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output already exists: {cfg.output} (set overwrite=true to replace it)")


def export(cfg: ExportConfig) -> Path:
    """Load ``source`` in fp32 and write it in ``format`` with weights of ``dtype``."""
    state.initialize(cfg.parallel)
    loaded = load_model(cfg.source)
    if cfg.format == "hf":
        export_hf(loaded, Path(cfg.output), cfg.overwrite, dtype=torch_dtype(cfg.weight_dtype))
    else:
        export_gguf(loaded, Path(cfg.output), cfg.overwrite, dtype=cfg.weight_dtype)
    return Path(cfg.output)
