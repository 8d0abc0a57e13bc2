"""Choose the units to keep from importance scores, and slice a canonical state dict to keep only them.

Attention is pruned in megatron's GQA layout ``[group][q heads…, k, v][head_dim]``: whole query groups
(with their k/v heads) are dropped first, then the same number of query heads inside every kept group.
Kept indices stay in their original order, so the pruned model is the original with rows/columns removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_minitron.models.config import ModelConfig
from nemo_minitron.prune.importance import Importance
from nemo_minitron.prune.rows import fc1_rows, qkv_rows


@dataclass
class Selection:
    """What survives, by original index. Per-layer entries are keyed by the original global layer."""

    layers: list[int]
    channels: torch.Tensor  # [h'] hidden channels
    groups: dict[int, torch.Tensor]  # layer -> [G'] query groups
    heads: dict[int, torch.Tensor]  # layer -> [G', H'/G'] query heads, index within their group
    neurons: dict[int, torch.Tensor]  # layer -> [F'] MLP neurons

    def to_json(self) -> dict:
        return {
            "layers": self.layers,
            "channels": self.channels.tolist(),
            "query_groups": {str(k): v.tolist() for k, v in self.groups.items()},
            "heads": {str(k): v.tolist() for k, v in self.heads.items()},
            "neurons": {str(k): v.tolist() for k, v in self.neurons.items()},
        }


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (ties: the lower index wins)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def bottom_k(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` indices that :func:`top_k` leaves out when it keeps the others, ascending: the lowest scores,
    and on a tie the higher index (units are removed and kept by one rule)."""
    kept = set(top_k(scores, len(scores) - k).tolist())
    return [i for i in range(len(scores)) if i not in kept]


def select(imp: Importance, cfg: ModelConfig, target: ModelConfig, keep_layers: list[int]) -> Selection:
    """Pick, for ``target``'s sizes, the most important channels, groups, heads and neurons."""
    group_scores = imp.groups(cfg.num_query_groups)
    heads_per_group = target.num_attention_heads // target.num_query_groups
    groups, heads, neurons = {}, {}, {}
    for layer in keep_layers:
        groups[layer] = top_k(group_scores[layer], target.num_query_groups)
        in_group = imp.heads[layer].view(cfg.num_query_groups, cfg.heads_per_group)[groups[layer]]
        heads[layer] = torch.stack([top_k(row, heads_per_group) for row in in_group])
        neurons[layer] = top_k(imp.neurons[layer], target.ffn_hidden_size)
    return Selection(
        layers=list(keep_layers),
        channels=top_k(imp.channels, target.hidden_size),
        groups=groups,
        heads=heads,
        neurons=neurons,
    )


def slice_canonical(
    canonical: dict[str, torch.Tensor], cfg: ModelConfig, target: ModelConfig, sel: Selection
) -> dict[str, torch.Tensor]:
    """The canonical state dict of the pruned model ``target`` (layers renumbered 0..L'-1)."""
    g, hpg, d, h = cfg.num_query_groups, cfg.heads_per_group, cfg.kv_channels, cfg.hidden_size
    ch = sel.channels
    out: dict[str, torch.Tensor] = {}
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in canonical:
            out[key] = canonical[key][:, ch]
    out["decoder.final_layernorm.weight"] = canonical["decoder.final_layernorm.weight"][ch]
    for new, old in enumerate(sel.layers):
        src, dst = f"decoder.layers.{old}.", f"decoder.layers.{new}."
        groups, heads = sel.groups[old], sel.heads[old]
        qkv = qkv_rows(canonical[src + "self_attention.linear_qkv.weight"], cfg, groups, heads)
        out[dst + "self_attention.linear_qkv.weight"] = qkv[:, ch].clone()
        proj = canonical[src + "self_attention.linear_proj.weight"].view(h, g, hpg, d)
        proj = proj[:, groups.unsqueeze(1), heads]  # [h, G', H'/G', d]
        out[dst + "self_attention.linear_proj.weight"] = proj[ch].reshape(len(ch), -1).clone()
        n = sel.neurons[old]
        out[dst + "mlp.linear_fc1.weight"] = fc1_rows(canonical[src + "mlp.linear_fc1.weight"], n)[:, ch]
        out[dst + "mlp.linear_fc2.weight"] = canonical[src + "mlp.linear_fc2.weight"][ch][:, n].clone()
        for norm in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
            out[dst + norm] = canonical[src + norm][ch].clone()
    return out
