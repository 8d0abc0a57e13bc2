"""Load any supported model into this rank's megatron-core shard, and save / export it.

Sources: a Hugging Face Llama/Mistral directory, the project's own checkpoint directory
(``model_config.json`` + canonical safetensors + tokenizer files), or ``embedded:<name>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError

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
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory, atomic_file
from nemo_minitron.models.builder import Fp8, Recompute, build_model
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.sharding import check_divisible, gather_canonical, load_canonical

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
    fill: Callable[[Path], None],
    atomic: Callable[[Path, bool], ContextManager[Path]] = atomic_directory,
    what: str = "output directory",
) -> None:
    """Rank 0 writes ``out`` (a directory, or a file with ``atomic=atomic_file``) atomically; every rank
    waits for it and sees the same outcome."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            with atomic(out, overwrite) as tmp:
                fill(tmp)
        except FileExistsError:
            error = f"{what} already exists: {out} (set overwrite=true to replace it)"
        except OSError as exc:
            error = f"cannot write {out}: {exc.strerror or exc}"
        except SafetensorError as exc:  # safetensors reports a failed write (a full disk) as its own type
            error = f"cannot write {out}: {exc}"
    state.raise_rank0_error(error)


def save_checkpoint(
    loaded: LoadedModel, out_dir: Path, overwrite: bool = False, extra_files: Optional[dict[str, bytes]] = None
) -> None:
    """Save the model as a nemo_minitron checkpoint (canonical layout, loads at any TP/PP).

    ``extra_files`` (name -> content, taken from rank 0) land in the same directory, in the same atomic step.
    """
    canonical = gather_canonical(loaded.model, loaded.cfg)

    def fill(tmp: Path) -> None:
        save_torch_state_dict({k: v.contiguous() for k, v in canonical.items()}, tmp)
        (tmp / NATIVE_CONFIG).write_text(loaded.cfg.model_dump_json(indent=2) + "\n")
        copy_tokenizer_files(loaded.tokenizer_dir, tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)

    _write(Path(out_dir), overwrite, fill)


def export_hf(loaded: LoadedModel, out_dir: Path, overwrite: bool = False, dtype: torch.dtype = torch.float32) -> None:
    """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads."""
    check_exportable(loaded.cfg)
    canonical = gather_canonical(loaded.model, loaded.cfg)

    def fill(tmp: Path) -> None:
        tensors = {k: v.to(dtype).contiguous() for k, v in hf_state_dict(canonical, loaded.cfg)}
        save_torch_state_dict(tensors, tmp)
        hf_cfg = hf_config_from_model_config(loaded.cfg)
        hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        copy_tokenizer_files(loaded.tokenizer_dir, tmp)

    _write(Path(out_dir), overwrite, fill)


def export_gguf(loaded: LoadedModel, out_file: Path, overwrite: bool = False, dtype: str = "float16") -> None:
    """Write one GGUF file for llama.cpp (``dtype``: a key of ``gguf_export.GGUF_DTYPES``)."""
    tokenizer = read_tokenizer(loaded.tokenizer_dir, loaded.cfg.vocab_size)
    canonical = gather_canonical(loaded.model, loaded.cfg)
    out_file = Path(out_file)

    def fill(tmp: Path) -> None:
        write_gguf(canonical, loaded.cfg, tokenizer, tmp, dtype, name=out_file.name.removesuffix(".gguf"))

    _write(out_file, overwrite, fill, atomic=atomic_file, what="output file")
