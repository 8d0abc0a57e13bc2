"""Check a model directory's weight files against its config without loading a single tensor.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the
data. Reading the header alone finds what would otherwise surface mid-load, after ranks have started: a
file cut short by a crash or an interrupted copy, a shard the index names but the folder lacks, or weights
whose shapes are not the architecture in ``config.json`` / ``model_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nemo_minitron.checkpoint.hf import hf_state_dict
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel.sharding import canonical_meta, canonical_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# A header larger than this is not a safetensors header (the format itself caps it at 100 MB).
MAX_HEADER = 100 * 1024 * 1024


def read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the safetensors ``file``; UserError if it is not one or is truncated."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER):
            raise UserError(f"{file}: not a safetensors file or truncated ({size} bytes)")
        try:
            header = json.loads(f.read(length))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in entries.values()), default=0)
            shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
        except (ValueError, KeyError, TypeError, IndexError):
            raise UserError(f"{file}: not a safetensors file (unreadable header)") from None
    if 8 + length + end > size:
        raise UserError(f"{file}: truncated: {size} bytes, its header describes {8 + length + end}")
    return shapes


def expected_shapes(cfg: ModelConfig, native: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes a checkpoint of ``cfg`` holds: canonical names (``native``) or Hugging Face names."""
    if native:
        return canonical_shapes(cfg)
    # The HF names come from the exporter's own mapping, run on shape-only tensors.
    return {name: tuple(t.shape) for name, t in hf_state_dict(canonical_meta(cfg), cfg)}


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape over all safetensors files of the model directory ``path`` (single file or sharded)."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path / INDEX}: not a valid safetensors index") from None
    elif (path / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise UserError(f"{path}: no {SINGLE} or {INDEX}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise UserError(f"{path}: shard '{name}' is missing")
        shapes.update(read_header(file))
    return shapes


def check_weights(path: Path, cfg: ModelConfig, native: bool) -> None:
    """UserError unless the weight files at ``path`` are complete and hold every tensor of ``cfg``."""
    stored = stored_shapes(path)
    for name, shape in expected_shapes(cfg, native).items():
        if name not in stored:
            raise UserError(f"{path}: tensor '{name}' is missing")
        if stored[name] != shape:
            raise UserError(f"{path}: tensor '{name}' has shape {list(stored[name])}, the config's architecture "
                            f"needs {list(shape)} (weights and config disagree)")


def check_model(ref: str) -> ModelConfig:
    """The architecture of the model at ``ref``, after checking its weight files against it."""
    from nemo_minitron.checkpoint.io import NATIVE_CONFIG, read_model_config, resolve_model_dir

    path = resolve_model_dir(ref)
    cfg = read_model_config(path)
    check_weights(path, cfg, native=(path / NATIVE_CONFIG).is_file())
    return cfg
