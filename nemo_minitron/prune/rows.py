"""The rows of the fused weights that kept units keep: ``linear_qkv`` (query groups with their heads, then their k
and v heads) and ``linear_fc1`` (SwiGLU's gate and up rows together). Used by slicing and by weight correction."""

from __future__ import annotations

import torch

from nemo_minitron.models.config import ModelConfig


def qkv_rows(weight: torch.Tensor, cfg: ModelConfig, groups: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The rows of ``linear_qkv``'s ``weight`` [(H + 2G) d, h] that the kept query ``groups`` and ``heads`` keep:
    per kept group, its kept q heads, then its k and v heads (positions hpg, hpg + 1); all input channels."""
    g, hpg, d = cfg.num_query_groups, cfg.heads_per_group, cfg.kv_channels
    kv = torch.tensor([hpg, hpg + 1]).expand(len(groups), 2)
    rows_in_group = torch.cat([heads, kv], dim=1)  # [G', H'/G' + 2]
    kept = weight.view(g, hpg + 2, d, -1)[groups.unsqueeze(1), rows_in_group]  # [G', H'/G' + 2, d, h]
    return kept.reshape(-1, weight.shape[1])


def fc1_rows(weight: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """The gate and up rows of ``linear_fc1``'s ``weight`` [2F, h] of the kept ``neurons``; all input channels."""
    gate, up = weight.chunk(2, 0)
    return torch.cat([gate[neurons], up[neurons]])
