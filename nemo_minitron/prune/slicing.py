"""Choose the units to keep from importance scores, and slice a canonical state dict to keep only them.

Attention is pruned in megatron's GQA layout ``[group][q heads…, k, v][head_dim]``: whole query groups
(with their k/v heads) are dropped first, then the same number of query heads inside every kept group.
Kept indices stay in their original order, so the pruned model is the original with rows/columns removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel.sharding import canonical_shapes, split_layer_key
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


def source_key(key: str, sel: Selection) -> str:
    """The canonical tensor of the source model that the pruned model's tensor ``key`` is cut from (layers are
    renumbered 0..L'-1 in the pruned model)."""
    layer = split_layer_key(key)
    return key if layer is None else f"decoder.layers.{sel.layers[layer[0]]}.{layer[1]}"


def slice_tensor(key: str, source: torch.Tensor, cfg: ModelConfig, sel: Selection) -> torch.Tensor:
    """The pruned model's canonical tensor ``key``, cut from ``source``, the source model's tensor
    :func:`source_key` names."""
    ch = sel.channels
    layer = split_layer_key(key)
    if layer is None:  # embeddings, output layer, final norm
        return source[ch] if source.dim() == 1 else source[:, ch]
    old, name = sel.layers[layer[0]], layer[1]
    groups, heads, neurons = sel.groups[old], sel.heads[old], sel.neurons[old]
    if name == "self_attention.linear_qkv.weight":
        return qkv_rows(source, cfg, groups, heads)[:, ch].clone()
    if name == "self_attention.linear_proj.weight":
        g, hpg, d, h = cfg.num_query_groups, cfg.heads_per_group, cfg.kv_channels, cfg.hidden_size
        proj = source.view(h, g, hpg, d)[:, groups.unsqueeze(1), heads]  # [h, G', H'/G', d]
        return proj[ch].reshape(len(ch), -1).clone()
    if name == "mlp.linear_fc1.weight":
        return fc1_rows(source, neurons)[:, ch]
    if name == "mlp.linear_fc2.weight":
        return source[ch][:, neurons].clone()
    return source[ch].clone()  # the layer's norms


def slice_canonical(
    canonical: dict[str, torch.Tensor], cfg: ModelConfig, target: ModelConfig, sel: Selection
) -> dict[str, torch.Tensor]:
    """The canonical state dict of the pruned model ``target`` from a whole canonical state dict (a model on one
    rank; pruning itself cuts tensor by tensor, see :mod:`nemo_minitron.prune.stage`)."""
    return {key: slice_tensor(key, canonical[source_key(key, sel)], cfg, sel) for key in canonical_shapes(target)}
