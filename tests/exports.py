"""Helpers shared by the export tests (tests/test_export.py, tests/test_llamacpp.py): tiny models with a real
tokenizer, the `export` stage run in this process, held-out text and perplexity from logits."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nemo_minitron import embedded
from nemo_minitron.checkpoint import io
from nemo_minitron.checkpoint.config import ExportConfig
from nemo_minitron.config import build_config
from nemo_minitron.parallel import state
from nemo_minitron.stages import run_stage
from tiny import write_tiny_hf

TEACHER_VOCAB = 49152
# name -> keyword arguments of tiny.write_tiny_hf; all carry the embedded teacher's byte-level BPE tokenizer,
# so their vocabularies are at least its 49152 tokens.
GGUF_MODELS = {
    "untied": dict(tied=False, vocab_size=TEACHER_VOCAB, seed=11),
    # 40 ids past the tokenizer's: the GGUF lists them as unused [PADn] tokens.
    "tied_padded": dict(tied=True, vocab_size=TEACHER_VOCAB + 40, seed=12),
    # Llama-3.1 RoPE scaling (original_max_position_embeddings 64): llama.cpp reads it from rope_freqs.
    "rope": dict(rope_scaling=True, vocab_size=TEACHER_VOCAB, seed=13),
}


def write_gguf_checkpoints(root: Path) -> dict[str, Path]:
    """The GGUF_MODELS as nemo_minitron checkpoints under ``root`` (initializes and tears down megatron)."""
    from conftest import destroy_state

    out = {}
    state.initialize(state.ParallelConfig())
    try:
        for name, kw in GGUF_MODELS.items():
            hf_dir = write_tiny_hf(root / "hf" / name, with_tokenizer=True, **kw)
            out[name] = root / "ckpt" / name
            io.save_checkpoint(io.load_model(str(hf_dir)), out[name])
    finally:
        destroy_state()
    return out


def run_export(source: Path | str, output: Path, fmt: str, dtype: str, **extra: str) -> Path:
    """The `export` stage in this process (the caller tears megatron down, e.g. with `destroy_after`)."""
    overrides = [f"source={source}", f"output={output}", f"format={fmt}", f"dtype={dtype}"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return run_stage("export", build_config(ExportConfig, {}, overrides))


def held_out_ids(num_tokens: int, play: str = "hamlet") -> torch.Tensor:
    """The first ``num_tokens`` tokens (teacher tokenizer) of a Shakespeare play."""
    from transformers import AutoTokenizer

    text = next(embedded.corpus_dir().glob(f"*/*{play}*.md")).read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(embedded.teacher_dir())(text[: num_tokens * 8], add_special_tokens=False)
    assert len(ids["input_ids"]) >= num_tokens
    return torch.tensor(ids["input_ids"][:num_tokens])


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean NLL of tokens 2..L given the logits [L, V] of a window ``ids`` [L]."""
    logits, ids = logits.reshape(-1, logits.shape[-1]).double(), ids.reshape(-1)
    return math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())


@torch.no_grad()
def hf_window_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers logits [L, V] of one window ``ids`` [L]."""
    return model(ids.unsqueeze(0)).logits[0].float()


@torch.no_grad()
def megatron_window_logits(source: Path | str | io.LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Our model's logits [L, V] (true vocabulary) for one window ``ids`` [L] (needs megatron initialized)."""
    loaded = source if isinstance(source, io.LoadedModel) else io.load_model(str(source))
    positions = torch.arange(ids.numel()).unsqueeze(0)
    return loaded.model(ids.unsqueeze(0), positions, None)[0, :, : loaded.cfg.vocab_size].float()
