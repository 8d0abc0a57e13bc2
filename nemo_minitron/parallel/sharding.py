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
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.exchange import Exchange, Part

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


def split_layer_key(key: str) -> tuple[int, str] | None:
    """(layer, name within the layer) of a layer tensor's name, e.g. ``(17, "mlp.linear_fc1.weight")``; None
    for the embeddings, the final norm and the output layer."""
    m = _LAYER.match(key)
    return None if m is None else (int(m.group(1)), m.group(2))


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


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of a model of architecture ``cfg`` with its shape, in one global order (that of
    ``GPTModel.state_dict()`` on one rank): the order in which tensors travel between ranks and are written."""
    h, d = cfg.hidden_size, cfg.kv_channels
    layer = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
        "self_attention.linear_qkv.weight": ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * d, h),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
    }
    shapes = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        shapes.update({f"decoder.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (cfg.vocab_size, h)
    return shapes


def canonical_meta(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """:func:`canonical_shapes` as tensors on the meta device: conversions run on them give the names and shapes of
    what they will write, before a single weight exists."""
    return {key: torch.empty(shape, device="meta") for key, shape in canonical_shapes(cfg).items()}


def _is_tp_split(key: str) -> bool:
    return key in _VOCAB_KEYS or key.endswith(
        ("linear_qkv.weight", "linear_fc1.weight", "linear_proj.weight", "linear_fc2.weight"))


def _weight_keys(model) -> Iterator[tuple[str, str]]:
    for key in model.state_dict():
        ckey = canonical_key(model, key)
        if ckey is not None:
            yield key, ckey


def held_keys(model) -> list[str]:
    """The canonical tensors of which this rank's ``model`` holds a part (its own TP slice of them)."""
    return list(dict.fromkeys(ckey for _, ckey in _weight_keys(model)))


@torch.no_grad()
def load_canonical_stream(model, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Fill this rank's ``model`` (every parameter: it may be uninitialised memory) from the canonical
    ``(name, tensor)`` pairs of ``tensors``, taken one at a time; names the model does not hold are skipped."""
    own = model.state_dict(keep_vars=True)
    targets: dict[str, list[str]] = {}
    for key, ckey in _weight_keys(model):
        targets.setdefault(ckey, []).append(key)
    keys = {key for names in targets.values() for key in names}
    unfilled = [name for name, _ in model.named_parameters() if name not in keys]
    if unfilled:
        raise RuntimeError(f"parameters with no canonical name: {', '.join(unfilled)}")
    filled = set()
    for ckey, full in tensors:
        if ckey not in targets:
            continue
        part = shard(ckey, full, cfg, state.tp_rank(), state.tp_size())
        for key in targets[ckey]:
            target = own[key]
            if part.shape != target.shape:
                raise UserError(f"{ckey}: checkpoint shape {tuple(part.shape)} does not fit model "
                                f"{tuple(target.shape)}")
            target.copy_(part)
        filled.add(ckey)
    missing = [ckey for ckey in targets if ckey not in filled]
    if missing:
        raise RuntimeError(f"no tensor given for {missing[0]}")


def load_canonical(model, cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> None:
    """Fill this rank's ``model`` (every parameter: it may be uninitialised memory) from canonical tensors
    returned by ``get(name)``, one at a time."""
    load_canonical_stream(model, cfg, ((ckey, get(ckey)) for ckey in held_keys(model)))


def shard_exchange(model) -> Exchange:
    """An :class:`~nemo_minitron.parallel.exchange.Exchange` of ``model``'s canonical tensors, each held in
    parts, one per TP rank (replicated tensors in one part); a collective."""
    own = model.state_dict()
    held = {}
    for key, ckey in _weight_keys(model):
        split = _is_tp_split(ckey)
        held[ckey] = Part(state.tp_rank() if split else 0, state.tp_size() if split else 1, own[key])
    return Exchange(held)


def fetch_canonical(source: Exchange, cfg: ModelConfig, names: list[str],
                    wanted: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The full canonical tensors ``names`` (in this order on every rank: a collective) of the model that
    ``source`` (:func:`shard_exchange`) holds, one at a time, on the ranks that list them in ``wanted``."""
    for name, parts in source.deliver(names, wanted):
        yield name, unshard(name, parts, cfg)


def stream_canonical(model, cfg: ModelConfig, source: Optional[Exchange] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of every canonical tensor of ``model`` (held by ``source``, default
    :func:`shard_exchange` of it), one at a time, in the order of :func:`canonical_shapes`, on global rank 0
    (nothing on the others, which send their parts; every rank must exhaust the iterator)."""
    names = list(canonical_shapes(cfg))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    yield from fetch_canonical(source or shard_exchange(model), cfg, names, names if rank0 else ())


def gather_canonical(model, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The canonical full state dict (on CPU) on global rank 0, None on the others (a whole model on one rank:
    for tests and small models; checkpoints and exports stream with :func:`stream_canonical`)."""
    full = dict(stream_canonical(model, cfg))
    return full if not dist.is_initialized() or dist.get_rank() == 0 else None
