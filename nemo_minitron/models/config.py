"""The small, typed architecture description of a Llama-family decoder.

This is what the project saves next to weights (a pruned model is this config plus its tensors); megatron's
``TransformerConfig`` is derived from it in :mod:`nemo_minitron.models.builder` and nowhere else.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from nemo_minitron.config import StrictModel

if TYPE_CHECKING:
    import torch


class RopeScaling(StrictModel):
    """Llama-3.1 ("llama3") RoPE frequency scaling."""

    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be larger than low_freq_factor")
        return self


class ModelConfig(StrictModel):
    """A Llama / Mistral decoder: RMSNorm, SwiGLU MLP, GQA attention with RoPE, no biases."""

    model_type: Literal["llama", "mistral"] = "llama"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_query_groups: int = Field(gt=0)
    head_dim: int = Field(0, ge=0, description="0: hidden_size // num_attention_heads")
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = Field(1e-5, gt=0)
    activation: Literal["swiglu"] = "swiglu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = Field(4096, gt=0)
    sliding_window: Optional[int] = Field(None, gt=0)
    make_vocab_size_divisible_by: int = Field(128, gt=0)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads} (set head_dim explicitly)"
            )
        return self

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocabulary rows in megatron's embedding: a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_params(self) -> int:
        """Parameter count with the true (unpadded) vocabulary, as Hugging Face counts it."""
        h, d = self.hidden_size, self.kv_channels
        attn = h * d * (self.num_attention_heads + 2 * self.num_query_groups) + self.num_attention_heads * d * h
        mlp = 3 * h * self.ffn_hidden_size
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * layer + h

    def rope_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [kv_channels / 2], with Llama-3.1 scaling when configured."""
        import torch  # here: configs that hold a model config (plan.architecture) import no torch

        dim = self.kv_channels
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        s = self.rope_scaling
        if s is None:
            return inv_freq
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
