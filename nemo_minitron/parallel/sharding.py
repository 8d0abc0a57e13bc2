"""Map between the canonical full state dict and one rank's tensor/pipeline shard of a ``GPTModel``.

The canonical layout uses megatron-core local-spec names with *global* layer numbers and the true
(unpadded) vocabulary, for example ``decoder.layers.17.self_attention.linear_qkv.weight``. It is what
checkpoints store, so a model saved at one TP/PP size loads at any other.

Tensor-parallel splits (megatron's own):
- ``word_embeddings`` / ``output_layer``: vocabulary rows (padded to a multiple of the TP size);
- ``linear_qkv``: rows, by whole query groups (the layout is ``[group][q heads…, k, v][head_dim]``);
- ``linear_fc1``: the gate rows and the up rows are split separately (``[gate; up]`` on every rank);
- ``linear_proj`` / ``linear_fc2``: columns;
- norms: replicated.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def check_divisible(cfg: ModelConfig, tp: int, pp: int) -> None:
    """One-line error when ``cfg`` cannot be split into ``tp`` x ``pp`` shards."""
    for name, value, size, label in (
        ("num_query_groups", cfg.num_query_groups, tp, "tensor_model_parallel_size"),
        ("num_attention_heads", cfg.num_attention_heads, tp, "tensor_model_parallel_size"),
        ("ffn_hidden_size", cfg.ffn_hidden_size, tp, "tensor_model_parallel_size"),
        ("num_layers", cfg.num_layers, pp, "pipeline_model_parallel_size"),
    ):
        if value % size:
            raise UserError(f"{name} {value} is not divisible by {label} {size}")


def canonical_key(model, key: str) -> str | None:
    """Canonical name of a key of ``model.state_dict()`` (None for keys that hold no weights)."""
    if key.endswith("_extra_state"):
        return None
    m = _LAYER.match(key)
    if m is None:
        if key == "output_layer.weight" and model.share_embeddings_and_output_weights:
            return "embedding.word_embeddings.weight"
        return key
    local, rest = int(m.group(1)), m.group(2)
    global_layer = model.decoder.layers[local].layer_number - 1
    return f"decoder.layers.{global_layer}.{_TE_TO_LOCAL.get(rest, rest)}"


def shard(key: str, full: torch.Tensor, cfg: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of the canonical tensor ``full``."""
    if key in _VOCAB_KEYS:
        padded = cfg.padded_vocab_size(size)
        full = torch.cat([full, full.new_zeros(padded - full.shape[0], full.shape[1])])
        return full.chunk(size, 0)[rank]
    if key.endswith("linear_qkv.weight"):
        return full.chunk(size, 0)[rank]
    if key.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, 0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]])
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(size, 1)[rank]
    return full


def unshard(key: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`shard`: the canonical tensor from all TP ranks' slices (in rank order)."""
    if key in _VOCAB_KEYS:
        # A copy, not a view into the padded rows: safetensors refuses tensors sharing larger storage.
        return torch.cat(parts)[: cfg.vocab_size].clone()
    if key.endswith("linear_qkv.weight"):
        return torch.cat(parts)
    if key.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, 0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(parts, 1)
    return parts[0]


def _weight_keys(model) -> Iterator[tuple[str, str]]:
    for key in model.state_dict():
        ckey = canonical_key(model, key)
        if ckey is not None:
            yield key, ckey


@torch.no_grad()
def load_canonical(model, cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> None:
    """Fill this rank's ``model`` (every parameter: it may be uninitialised memory) from canonical tensors
    returned by ``get(name)``."""
    own = model.state_dict(keep_vars=True)
    keys = dict(_weight_keys(model))
    unfilled = [name for name, _ in model.named_parameters() if name not in keys]
    if unfilled:
        raise RuntimeError(f"parameters with no canonical name: {', '.join(unfilled)}")
    for key, ckey in keys.items():
        part = shard(ckey, get(ckey), cfg, state.tp_rank(), state.tp_size())
        target = own[key]
        if part.shape != target.shape:
            raise UserError(f"{ckey}: checkpoint shape {tuple(part.shape)} does not fit model {tuple(target.shape)}")
        target.copy_(part)


@torch.no_grad()
def gather_canonical(model, cfg: ModelConfig, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
    """The canonical full state dict (on CPU) on global rank 0 — on every rank with ``everywhere`` —
    and None on the others."""
    full = _gather_to_rank0(model, cfg)
    if everywhere and dist.is_initialized() and dist.get_world_size() > 1:
        box = [full]
        dist.broadcast_object_list(box, src=0)
        full = box[0]
    return full


def _gather_to_rank0(model, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    local = {ckey: t.detach().cpu() for key, ckey in _weight_keys(model) for t in [model.state_dict()[key]]}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: unshard(k, [v], cfg) for k, v in local.items()}
    # One copy of the model is enough: only data-parallel rank 0 contributes its shards.
    payload = (state.tp_rank(), local) if state.dp_rank() == 0 else None
    gathered: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for item in gathered:
        if item is not None:
            rank, tensors = item
            for k, v in tensors.items():
                parts.setdefault(k, {})[rank] = v
    return {k: unshard(k, [by_rank[r] for r in sorted(by_rank)], cfg) for k, by_rank in parts.items()}
