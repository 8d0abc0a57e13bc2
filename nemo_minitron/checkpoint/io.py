"""Load any supported model into this rank's megatron-core shard, and save / export it.

Sources: a Hugging Face Llama/Mistral directory, the project's own checkpoint directory
(``model_config.json`` + canonical safetensors + tokenizer files), or ``embedded:<name>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist

from nemo_minitron import embedded
from nemo_minitron.checkpoint.gguf_export import read_tokenizer, write_gguf
from nemo_minitron.checkpoint.hf import (
    HFTensors,
    canonical_getter,
    check_exportable,
    copy_tokenizer_files,
    hf_config_from_model_config,
    hf_state_dict,
    is_hf_dir,
    read_hf_config,
)
from nemo_minitron.checkpoint.streaming import Spec, save_streaming
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory, atomic_file
from nemo_minitron.models.builder import Fp8, Recompute, build_model
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.sharding import (
    canonical_meta,
    canonical_shapes,
    check_divisible,
    load_canonical,
    shard_exchange,
    stream_canonical,
)

NATIVE_CONFIG = "model_config.json"


@dataclass
class LoadedModel:
    """This rank's model shard with its architecture and where its tokenizer files are."""

    cfg: ModelConfig
    model: torch.nn.Module
    tokenizer_dir: Path


def resolve_model_dir(ref: str) -> Path:
    path = embedded.resolve_path(ref)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    if not ((path / NATIVE_CONFIG).is_file() or is_hf_dir(path)):
        raise UserError(f"{path}: neither a Hugging Face model (config.json) "
                        f"nor a nemo_minitron checkpoint ({NATIVE_CONFIG})")
    return path


def read_model_config(path: Path) -> ModelConfig:
    """Architecture of a model directory, without touching its weights."""
    if (path / NATIVE_CONFIG).is_file():
        try:
            return ModelConfig.model_validate_json((path / NATIVE_CONFIG).read_text())
        except ValueError as exc:
            raise UserError(f"{path / NATIVE_CONFIG}: invalid ({str(exc).splitlines()[0]})") from None
    return read_hf_config(path)


def _tensor_getter(path: Path, cfg: ModelConfig) -> Callable[[str], torch.Tensor]:
    tensors = HFTensors(path)
    if (path / NATIVE_CONFIG).is_file():
        return tensors.get
    return canonical_getter(tensors, cfg)


def new_model(ref: str, dtype: torch.dtype = torch.float32, use_te: Optional[bool] = None,
              fp8: Optional[Fp8] = None, init: bool = True, sequence_parallel: bool = False,
              recompute: Optional[Recompute] = None) -> LoadedModel:
    """The architecture of the model at ``ref`` with freshly initialised weights (megatron's initialisation,
    seeded by :func:`state.initialize`; with ``init`` False, unset weights to be loaded next); its weights are
    never read. The build options as in :func:`build_model`."""
    path = resolve_model_dir(ref)
    cfg = read_model_config(path)
    check_divisible(cfg, state.tp_size(), state.pp_size())
    model = build_model(cfg, dtype=dtype, use_te=use_te, fp8=fp8, init=init, sequence_parallel=sequence_parallel,
                        recompute=recompute)
    return LoadedModel(cfg=cfg, model=model, tokenizer_dir=path)


def load_model(ref: str, dtype: torch.dtype = torch.float32, use_te: Optional[bool] = None,
               fp8: Optional[Fp8] = None, sequence_parallel: bool = False,
               recompute: Optional[Recompute] = None) -> LoadedModel:
    """Build this rank's shard of the model at ``ref`` and fill it (needs :func:`state.initialize`).
    ``use_te``, ``fp8``, ``sequence_parallel`` and ``recompute`` as in :func:`build_model`."""
    loaded = new_model(ref, dtype=dtype, use_te=use_te, fp8=fp8, init=False, sequence_parallel=sequence_parallel,
                       recompute=recompute)
    error = None
    try:
        load_canonical(loaded.model, loaded.cfg, _tensor_getter(loaded.tokenizer_dir, loaded.cfg))
    except UserError as exc:
        error = str(exc)
    # A pipeline stage reads only its own layers: a rank that failed alone would leave the others waiting
    # for it in their first collective, so every rank raises the first error any of them met.
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)
    loaded.model.eval()
    return loaded


def _write(
    out: Path,
    overwrite: bool,
    fill: Callable[[Path, Iterator[tuple[str, torch.Tensor]]], None],
    tensors: Iterator[tuple[str, torch.Tensor]],
    atomic: Callable[[Path, bool], ContextManager[Path]] = atomic_directory,
    what: str = "output directory",
) -> None:
    """Rank 0 writes ``out`` (a directory, or a file with ``atomic=atomic_file``) atomically with ``fill``, which
    consumes ``tensors`` (the model's canonical tensors, streamed to rank 0 by the ranks that hold them); every
    rank waits for it and sees the same outcome."""
    error = None
    try:
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                with atomic(out, overwrite) as tmp:
                    fill(tmp, tensors)
            except FileExistsError:
                error = f"{what} already exists: {out} (set overwrite=true to replace it)"
            except OSError as exc:
                error = f"cannot write {out}: {exc.strerror or exc}"
    finally:
        # The other ranks send their parts until the last tensor, whether or not rank 0 could write them.
        for _ in tensors:
            pass
    state.raise_rank0_error(error)


def save_checkpoint(
    loaded: LoadedModel, out_dir: Path, overwrite: bool = False, extra_files: Optional[dict[str, bytes]] = None
) -> None:
    """Save the model as a nemo_minitron checkpoint (canonical layout, loads at any TP/PP), streamed to rank 0
    one tensor at a time.

    ``extra_files`` (name -> content, taken from rank 0) land in the same directory, in the same atomic step.
    """
    # Each tensor keeps its own dtype (megatron's local spec keeps the norm weights of a 16-bit model in fp32).
    source = shard_exchange(loaded.model)
    specs = {k: Spec(shape, source.dtype(k)) for k, shape in canonical_shapes(loaded.cfg).items()}

    def fill(tmp: Path, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        save_streaming(specs, tensors, tmp)
        (tmp / NATIVE_CONFIG).write_text(loaded.cfg.model_dump_json(indent=2) + "\n")
        copy_tokenizer_files(loaded.tokenizer_dir, tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)

    _write(Path(out_dir), overwrite, fill, stream_canonical(loaded.model, loaded.cfg, source))


def export_hf(loaded: LoadedModel, out_dir: Path, overwrite: bool = False, dtype: torch.dtype = torch.float32) -> None:
    """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads, streamed to rank 0 one
    tensor at a time."""
    cfg = loaded.cfg
    check_exportable(cfg)
    specs = {name: Spec(tuple(t.shape), dtype) for name, t in hf_state_dict(canonical_meta(cfg), cfg)}

    def fill(tmp: Path, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        converted = ((name, t.to(dtype)) for key, value in tensors for name, t in hf_state_dict({key: value}, cfg))
        save_streaming(specs, converted, tmp)
        hf_cfg = hf_config_from_model_config(cfg)
        hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        copy_tokenizer_files(loaded.tokenizer_dir, tmp)

    _write(Path(out_dir), overwrite, fill, stream_canonical(loaded.model, cfg))


def export_gguf(loaded: LoadedModel, out_file: Path, overwrite: bool = False, dtype: str = "float16") -> None:
    """Write one GGUF file for llama.cpp (``dtype``: a key of ``gguf_export.GGUF_DTYPES``), streamed to rank 0
    one tensor at a time."""
    tokenizer = read_tokenizer(loaded.tokenizer_dir, loaded.cfg.vocab_size)
    out_file = Path(out_file)

    def fill(tmp: Path, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        write_gguf(tensors, loaded.cfg, tokenizer, tmp, dtype, name=out_file.name.removesuffix(".gguf"))

    _write(out_file, overwrite, fill, stream_canonical(loaded.model, loaded.cfg), atomic=atomic_file,
           what="output file")
