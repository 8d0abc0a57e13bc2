"""Architectures of public models by name, for planning a job whose weights are not on this machine.

Each entry is the model's published Hugging Face ``config.json`` in :class:`ModelConfig` terms. Names are matched
without regard to case, against a whole name only (``Llama-3.1-8B``), never a prefix: a directory named
``Llama-3.1-8B-pruned`` holds another architecture.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Optional

from nemo_minitron.models.config import ModelConfig, RopeScaling

_LLAMA31_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, ffn_hidden_size=14336, num_layers=32, num_attention_heads=32,
    num_query_groups=8, head_dim=128, rope_theta=500000.0, rope_scaling=RopeScaling(), norm_eps=1e-5,
    max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
)

KNOWN: dict[str, ModelConfig] = {
    # The embedded teacher (``embedded:smollm2-135m-instruct``), known without preparing it.
    "smollm2-135m-instruct": ModelConfig(
        vocab_size=49152, hidden_size=576, ffn_hidden_size=1536, num_layers=30, num_attention_heads=9,
        num_query_groups=3, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3.1-8b": _LLAMA31_8B,
    # NVIDIA's published Minitron students of Llama-3.1-8B (P2): width keeps 32 heads of 128 channels.
    "llama-3.1-minitron-4b-width": _LLAMA31_8B.model_copy(update={"hidden_size": 3072, "ffn_hidden_size": 9216}),
    "llama-3.1-minitron-4b-depth": _LLAMA31_8B.model_copy(update={"num_layers": 16}),
}


def known_config(name: str) -> Optional[ModelConfig]:
    """The architecture named ``name`` (a known name, a path that ends in one, or ``embedded:<name>``), None if
    it is not known."""
    return KNOWN.get(PurePath(name.removeprefix("embedded:")).name.lower())
