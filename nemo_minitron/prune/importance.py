"""Importance of every prunable unit: attention heads, query groups, MLP neurons, embedding channels, layers.

Activation importance (Minitron) is measured with forward hooks during calibration forward passes:

- head i of a layer: L2 norm over ``head_dim`` of its slice of the ``linear_proj`` input (the attention output);
- query group: the sum of its heads' scores;
- MLP neuron i: |input of ``linear_fc2``| (= |act(gate) * up|);
- embedding channel c: |output of ``input_layernorm`` and ``pre_mlp_layernorm``|, summed over all layers;
- layer (block importance, ShortGPT): 1 - cos(layer input, layer output), averaged over tokens.

The same pass sums, for every RMS norm, each channel's energy in the normalised input x / rms(x) over the
calibration tokens (``norm_energy``: weight correction rescales the norms of a model cut to fewer channels by it).

Each pass over the calibration set can show a progress bar with an ETA (``progress``: global rank 0, stderr).

Per-token values are reduced over the sequence (``seq_agg``), then over the calibration samples
(``batch_agg``); Minitron's best is mean over the sequence, L2 over samples. Hooks keep running sums per
sample (sum, sum of squares, count), which are summed over data-parallel ranks, gathered over tensor-parallel
ranks (heads and neurons are split there) and over pipeline stages (each owns its layers), so the final
scores — and the pruning they choose — do not depend on the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_minitron.evaluation.loss import reduce_loss_sums, token_loss_sums
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.prune.config import Agg

if TYPE_CHECKING:
    from nemo_minitron.prune.correction import GramAccumulator


def reduce_sequence(values: torch.Tensor, how: Agg) -> torch.Tensor:
    """[s, b, n] per-token values -> [b, n] per-sample values (float64 from here on: they are summed
    over many samples)."""
    if how == "mean":
        return values.mean(0).double()
    if how == "l2":
        return values.norm(dim=0).double()
    return values.var(0, unbiased=False).double()


class _Moments:
    """Running sum, sum of squares and count of per-sample vectors [n], for any batch aggregation."""

    def __init__(self) -> None:
        self.sum: Optional[torch.Tensor] = None
        self.sumsq: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, per_sample: torch.Tensor) -> None:
        s, q = per_sample.sum(0), (per_sample**2).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += per_sample.shape[0]

    def packed(self) -> torch.Tensor:
        """[3, n]: sum, sum of squares, count (broadcast) — the form that is reduced across ranks."""
        return torch.stack([self.sum, self.sumsq, torch.full_like(self.sum, self.count)])


def finalize(packed: torch.Tensor, how: Agg) -> torch.Tensor:
    """[3, n] moments over samples -> [n] scores aggregated over samples."""
    total, sumsq, count = packed[0], packed[1], packed[2]
    if how == "mean":
        return total / count
    if how == "l2":
        return sumsq.sqrt()
    return (sumsq / count - (total / count) ** 2).clamp_min(0)


@dataclass
class Importance:
    """Scores (higher = more important), indexed by global layer, head, group, neuron and channel."""

    heads: torch.Tensor  # [L, H]
    neurons: torch.Tensor  # [L, F]
    channels: torch.Tensor  # [h]
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # criterion -> [L]
    calibration_loss: Optional[float] = None
    criterion: str = "activation"
    # Canonical name of each RMS norm weight -> [h]: sum over the calibration tokens of (x_c / rms(x))^2 of its input.
    norm_energy: dict[str, torch.Tensor] = field(default_factory=dict)

    def groups(self, num_query_groups: int) -> torch.Tensor:
        """[L, G]: a query group's score is the sum of its heads' scores."""
        layers, heads = self.heads.shape
        return self.heads.view(layers, num_query_groups, heads // num_query_groups).sum(-1)

    def to_json(self, num_query_groups: int) -> dict:
        return {
            "criterion": self.criterion,
            "calibration_loss": self.calibration_loss,
            "heads": self.heads.tolist(),
            "query_groups": self.groups(num_query_groups).tolist(),
            "neurons": self.neurons.tolist(),
            "channels": self.channels.tolist(),
            "layers": {k: v.tolist() for k, v in self.layers.items()},
        }


def progress_bar(enabled: bool, desc: str, unit: str, **kwargs) -> tqdm:
    """A progress bar with an ETA on stderr, drawn by global rank 0 only and only when ``enabled`` (a
    disabled bar counts nothing and prints nothing); ``kwargs`` go to tqdm (``total``, ``iterable``)."""
    shown = enabled and (not dist.is_initialized() or dist.get_rank() == 0)
    return tqdm(desc=desc, unit=unit, dynamic_ncols=True, disable=not shown, **kwargs)


def _layers(model) -> list:
    return list(model.decoder.layers)


def _global_index(layer) -> int:
    return layer.layer_number - 1


def _gather_tp(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate each TP rank's slice along ``dim`` (TP rank order = global unit order)."""
    if state.tp_size() == 1:
        return tensor
    return torch.cat(state.all_gather(tensor, state.tp_group()), dim)


def gather_layers(local: dict) -> dict:
    """Every pipeline stage's {global layer (or a tensor's name): value} on every rank."""
    if state.pp_size() == 1:
        return local
    everyone: list = [None] * state.pp_size()
    dist.all_gather_object(everyone, local, group=state.pp_group())
    return {k: v for part in everyone for k, v in part.items()}


def _lm_loss_sums(model, cfg: ModelConfig, batches: list[torch.Tensor]) -> tuple[float, int]:
    """(sum of token losses, token count) over ``batches`` [b, s+1], summed over DP, on every rank."""
    return reduce_loss_sums(token_loss_sums(model, cfg.vocab_size, batches))


def lm_loss(model, cfg: ModelConfig, batches: list[torch.Tensor]) -> float:
    """Mean LM loss of ``model`` over this rank's ``batches`` and those of the other DP ranks."""
    total, count = _lm_loss_sums(model, cfg, batches)
    return total / count


def activation_importance(
    model,
    cfg: ModelConfig,
    batches: list[torch.Tensor],
    seq_agg: Agg = "mean",
    batch_agg: Agg = "l2",
    progress: bool = False,
    grams: Optional["GramAccumulator"] = None,
) -> Importance:
    """Minitron activation importance from forward passes over this DP rank's calibration ``batches``
    (with ``progress``, a bar over them); ``grams``, when given, accumulates the input Grams of weight correction
    in the same pass."""
    d = cfg.kv_channels
    heads_m: dict[int, _Moments] = {}
    neurons_m: dict[int, _Moments] = {}
    channels_m: dict[tuple[int, str], _Moments] = {}
    energy: dict[str, torch.Tensor] = {}  # norm weight's name -> [h]
    block: dict[int, torch.Tensor] = {}  # layer -> [sum of (1 - cos), tokens]
    handles = []

    def on_proj_input(idx: int) -> Callable:
        def hook(_module, args):
            x = args[0]  # [s, b, heads_local * d]
            per_head = x.float().view(x.shape[0], x.shape[1], -1, d).norm(dim=-1)
            heads_m.setdefault(idx, _Moments()).add(reduce_sequence(per_head, seq_agg))

        return hook

    def on_fc2_input(idx: int) -> Callable:
        def hook(_module, args):
            neurons_m.setdefault(idx, _Moments()).add(reduce_sequence(args[0].float().abs(), seq_agg))

        return hook

    def on_norm_input(name: str) -> Callable:
        def hook(_module, args):
            x = args[0].double()
            normalised = x.pow(2) / (x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
            energy[name] = energy.get(name, 0) + normalised.flatten(0, -2).sum(0)

        return hook

    def on_norm_output(key: tuple[int, str]) -> Callable:
        def hook(_module, _args, output):
            channels_m.setdefault(key, _Moments()).add(reduce_sequence(output.float().abs(), seq_agg))

        return hook

    def on_layer(idx: int) -> Callable:
        def hook(_module, _args, kwargs, output):
            x_in, x_out = kwargs["hidden_states"].float(), output[0].float()
            one_minus_cos = (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).double()
            acc = block.setdefault(idx, torch.zeros(2, dtype=torch.float64))
            acc += torch.stack([one_minus_cos.sum().cpu(), torch.tensor(float(one_minus_cos.numel()))])

        return hook

    for layer in _layers(model):
        idx = _global_index(layer)
        handles += [
            layer.self_attention.linear_proj.register_forward_pre_hook(on_proj_input(idx)),
            layer.mlp.linear_fc2.register_forward_pre_hook(on_fc2_input(idx)),
            layer.input_layernorm.register_forward_hook(on_norm_output((idx, "input"))),
            layer.pre_mlp_layernorm.register_forward_hook(on_norm_output((idx, "pre_mlp"))),
            layer.register_forward_hook(on_layer(idx), with_kwargs=True),
            layer.input_layernorm.register_forward_pre_hook(on_norm_input(f"decoder.layers.{idx}.input_layernorm.weight")),
            layer.pre_mlp_layernorm.register_forward_pre_hook(
                on_norm_input(f"decoder.layers.{idx}.pre_mlp_layernorm.weight")),
        ]
    final_norm = getattr(model.decoder, "final_layernorm", None)  # on the last pipeline stage
    if final_norm is not None:
        handles.append(final_norm.register_forward_pre_hook(on_norm_input("decoder.final_layernorm.weight")))
    if grams is not None:
        handles += grams.attach(model)
    bar = progress_bar(progress, "importance", "batch", total=len(batches))

    def count_batch(*_) -> None:
        # megatron's schedule runs all micro-batches in one call: they are counted as they enter the model (on
        # rank 0, the first pipeline stage). No return value: a forward hook's would replace the model's output.
        bar.update()

    handles.append(model.register_forward_hook(count_batch))
    try:
        total, count = _lm_loss_sums(model, cfg, batches)
    finally:
        for h in handles:
            h.remove()
        bar.close()

    def reduce(moments: dict, tp_split: bool) -> dict:
        out = {}
        for idx in sorted(moments):
            packed = state.all_reduce(moments[idx].packed(), state.dp_group())
            if tp_split:
                packed = _gather_tp(packed, dim=1)
            out[idx] = packed
        return out

    heads = gather_layers(reduce(heads_m, tp_split=True))
    neurons = gather_layers(reduce(neurons_m, tp_split=True))
    channels = gather_layers(reduce(channels_m, tp_split=False))
    blocks = gather_layers({k: state.all_reduce(v, state.dp_group()) for k, v in block.items()})
    norm_energy = gather_layers({k: state.all_reduce(v, state.dp_group()).cpu() for k, v in sorted(energy.items())})
    order = range(cfg.num_layers)
    # A channel's score is the sum, over all layers and both norms, of its aggregated activation.
    channel_scores = torch.stack([finalize(channels[key], batch_agg) for key in sorted(channels)]).sum(0)
    return Importance(
        heads=torch.stack([finalize(heads[i], batch_agg) for i in order]).float(),
        neurons=torch.stack([finalize(neurons[i], batch_agg) for i in order]).float(),
        channels=channel_scores.float(),
        layers={"block_importance": torch.tensor([float(blocks[i][0] / blocks[i][1]) for i in order])},
        calibration_loss=total / count,
        norm_energy=norm_energy,
    )


@torch.no_grad()
def magnitude_importance(model, cfg: ModelConfig) -> Importance:
    """Weight-norm baseline: a unit's score is the L2 norm of all weights that belong only to it. Each rank scores
    the heads and neurons of its own shard (whole on it: TP splits by query group and by neuron) and the norms are
    gathered like activation scores; a channel's norm over the vocabulary combines the TP slices' norms."""
    hpg, d, h = cfg.heads_per_group, cfg.kv_channels, cfg.hidden_size
    groups = cfg.num_query_groups // state.tp_size()
    heads, neurons, channels = {}, {}, {}
    for layer in _layers(model):
        idx = _global_index(layer)
        q = layer.self_attention.linear_qkv.weight.view(groups, hpg + 2, d, h)[:, :hpg]
        proj = layer.self_attention.linear_proj.weight.view(h, groups, hpg, d)
        per_head = (q.pow(2).sum((-1, -2)) + proj.pow(2).sum((0, -1))).sqrt().flatten()
        heads[idx] = _gather_tp(per_head.float(), dim=0)
        gate, up = layer.mlp.linear_fc1.weight.chunk(2, 0)
        down = layer.mlp.linear_fc2.weight
        neurons[idx] = _gather_tp((gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt().float(), dim=0)
    if state.is_first_stage():
        # This rank's rows of the true vocabulary (megatron pads it to a multiple of TP with rows of zeros).
        rows = model.embedding.word_embeddings.weight
        real = min(len(rows), max(0, cfg.vocab_size - state.tp_rank() * len(rows)))
        norm = rows[:real].float().norm(dim=0)
        if state.tp_size() > 1:
            norm = state.all_reduce(norm.pow(2), state.tp_group()).sqrt()
        channels[0] = norm
    heads, neurons = gather_layers(heads), gather_layers(neurons)
    order = range(cfg.num_layers)
    return Importance(
        heads=torch.stack([heads[i] for i in order]),
        neurons=torch.stack([neurons[i] for i in order]),
        channels=gather_layers(channels)[0],
        criterion="magnitude",
    )


def random_importance(cfg: ModelConfig, seed: int) -> Importance:
    """Uniform random scores: the baseline every real criterion must beat."""
    gen = torch.Generator().manual_seed(seed)
    return Importance(
        heads=torch.rand(cfg.num_layers, cfg.num_attention_heads, generator=gen),
        neurons=torch.rand(cfg.num_layers, cfg.ffn_hidden_size, generator=gen),
        channels=torch.rand(cfg.hidden_size, generator=gen),
        criterion="random",
    )


class _SkipLayers:
    """Context manager: the given global layers pass their input through unchanged."""

    def __init__(self, model, drop: Iterable[int]) -> None:
        self.targets = [layer for layer in _layers(model) if _global_index(layer) in set(drop)]

    def __enter__(self) -> None:
        for layer in self.targets:
            layer.forward = lambda *args, hidden_states=None, **kwargs: (hidden_states, None)

    def __exit__(self, *exc) -> None:
        for layer in self.targets:
            del layer.forward


def loss_without(model, cfg: ModelConfig, batches: list[torch.Tensor], drop: Iterable[int]) -> float:
    """LM loss with the layers ``drop`` skipped (identity), as if they had been removed."""
    with _SkipLayers(model, list(drop)):
        return lm_loss(model, cfg, batches)


def drop_one_importance(model, cfg: ModelConfig, batches: list[torch.Tensor], base_loss: float,
                        progress: bool = False) -> torch.Tensor:
    """[L]: LM-loss increase when each layer alone is removed (one pass over ``batches`` per layer; with
    ``progress``, a bar over the layers)."""
    layers = progress_bar(progress, "drop-one", "layer", iterable=range(cfg.num_layers))
    return torch.tensor([loss_without(model, cfg, batches, [i]) - base_loss for i in layers])


def contiguous_block_losses(model, cfg: ModelConfig, batches: list[torch.Tensor], k: int,
                            progress: bool = False) -> torch.Tensor:
    """[L - k + 1]: LM loss with layers start .. start+k-1 removed, for every start (one pass over ``batches``
    per start; with ``progress``, a bar over them)."""
    starts = progress_bar(progress, "contiguous", "block", iterable=range(cfg.num_layers - k + 1))
    return torch.tensor([loss_without(model, cfg, batches, range(s, s + k)) for s in starts])
