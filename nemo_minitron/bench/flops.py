"""Model FLOPs per token, megatron's convention (kd_throughput's and the GPU check's MFU).

Imports nothing at run time: the GPU check reads it before torch starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemo_minitron.models.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_length: int, passes: int) -> float:
    """Model FLOPs per token of ``passes`` GEMM passes over ``cfg`` (1: forward, 3: forward and backward)."""
    h, d, n, g = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    # Multiply-adds per token: q/k/v and output projections, SwiGLU MLP, causal scores and values.
    layer = h * d * (n + 2 * g) + n * d * h + 3 * h * cfg.ffn_hidden_size + n * d * seq_length
    return 2.0 * passes * (cfg.num_layers * layer + cfg.vocab_size * h)
