"""Weight correction after width pruning: ridge least-squares re-fit of the layers that read pruned units.

Every linear layer that reads pruned units is re-fit on its kept inputs: ``linear_fc2`` on the kept MLP neurons,
``linear_proj`` on the kept heads, and the readers of the hidden channels, ``linear_qkv`` (it reads the output of
``input_layernorm``) and ``linear_fc1`` (``pre_mlp_layernorm``), on the kept channels. With X the calibration
inputs of such a layer in the unpruned model (rows: tokens), W its weight (rows: its kept outputs) and K the kept
input units, the corrected weight is

    W' = argmin ||X W^T - X_K W'^T||^2 + lam ||W' - W_K||^2 = W_K + W_R G_RK (G_KK + lam I)^-1

with G = X^T X the input Gram, R the removed units and lam = ``damping`` x mean(diag G). The ridge pulls toward
the plainly sliced weights W_K: a large damping gives back ``correction: none``, and a layer that loses no input
is left exactly as it is. The output layer and the embeddings are not re-fit (they are tied in many models).

When hidden channels are removed, the RMS norms are rescaled too. A pruned norm divides by the RMS over the h'
kept channels instead of all h; with f the share of the normalised input's energy, sum over the calibration tokens
of (x_c / rms(x))^2, that the kept channels carry, the kept channels' mean square is f h / h' times the full one,
so every RMS norm weight (the layers' and the final one) is multiplied by sqrt(f h / h') (:func:`norm_scales`;
the importance pass sums the energies). Removed channels that carried no energy give sqrt(h / h'), which undoes
the change exactly; channels of equal energy give 1. The re-fit readers then see inputs on the scale they were
fitted on.

Removed layers are replaced by a linear map merged into the ``linear_fc2`` before them
(:mod:`~nemo_minitron.prune.layer_map`).

The Grams are accumulated by forward hooks during the importance pass (no pass of their own). ``linear_fc2`` and
``linear_proj`` are row-parallel, so under tensor parallelism each rank sees only its slice X_r of their inputs;
it gathers the full X over TP per micro-batch and keeps its row block X_r^T X ([n/tp, n], float64). The norm
outputs are the same on every TP rank: only the rank that will solve for them accumulates them. After the pass
the blocks are summed over data-parallel ranks and concatenated over TP; each full Gram is kept by one rank
of its pipeline stage (the Grams are dealt over the stage's TP x DP ranks, balancing their sizes), which receives
that layer's full weight, solves its correction and sends the corrected tensor to the ranks whose pruned shard holds
it. Memory per rank: 8 bytes x (layers of its stage) x (ffn^2 + (heads x head_dim)^2 + 2 hidden^2) / TP, plus the
Grams being gathered; :func:`check_memory` refuses a run that cannot fit before the pass.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.cpu import cuda_available
from nemo_minitron.prune.rows import fc1_rows, qkv_rows

# The linear layers that are re-fit, by the kind of their input: MLP neurons, attention heads (both split over
# TP), and the hidden channels after the two norms (the same on every TP rank).
LINEARS = {"fc2": "mlp.linear_fc2", "proj": "self_attention.linear_proj",
           "qkv": "self_attention.linear_qkv", "fc1": "mlp.linear_fc1"}
TP_SPLIT = ("fc2", "proj")
# Every part of lsq correction: the re-fit of each kind of linear layer, and the rescale of the RMS norms when
# hidden channels are removed (``cut(..., refit=...)`` picks a subset).
PARTS = (*LINEARS, "norms")
GIB = 2**30


def gram_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Entries of each kind's Gram."""
    ffn, attn, h = cfg.ffn_hidden_size, cfg.num_attention_heads * cfg.kv_channels, cfg.hidden_size
    return {"fc2": ffn**2, "proj": attn**2, "qkv": h**2, "fc1": h**2}


def deal(layers: list[int], cfg: ModelConfig, solvers: int) -> dict[tuple[int, str], int]:
    """Which of a stage's ``solvers`` ranks solves each (layer, kind): largest Grams first, each to the rank with
    the fewest entries so far (ties: the lower rank), so that every rank holds about the same memory."""
    size = gram_sizes(cfg)
    load = [0] * solvers
    owner = {}
    for key in sorted(((i, kind) for i in layers for kind in LINEARS), key=lambda k: (-size[k[1]], k)):
        rank = min(range(solvers), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += size[key[1]]
    return owner


def gram_bytes(cfg: ModelConfig, tp: int, pp: int, dp: int) -> int:
    """Peak bytes per rank of the float64 Grams (an upper bound): the row blocks of the stage's TP-split inputs,
    the full Grams that the busiest rank of the stage solves for (as :func:`deal` deals them), and two of the
    largest Gram in flight while gathering."""
    layers = math.ceil(cfg.num_layers / pp)
    size = gram_sizes(cfg)
    owned = [0] * (tp * dp)
    for (_, kind), rank in deal(list(range(layers)), cfg, tp * dp).items():
        owned[rank] += size[kind]
    blocks = layers * (size["fc2"] + size["proj"]) / tp
    return int(8 * (blocks + max(owned) + 2 * max(size.values())))


def free_bytes() -> int:
    """Memory this rank may use: the free memory of its GPU, or on CPU the host's available memory shared by
    the local ranks."""
    if cuda_available():
        return torch.cuda.mem_get_info()[0]
    meminfo = Path("/proc/meminfo")
    available = None
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_memory(cfg: ModelConfig) -> None:
    """One-line error on every rank when some rank has too little memory for the Grams of ``correction: lsq``."""
    need, free = gram_bytes(cfg, state.tp_size(), state.pp_size(), state.dp_size()), free_bytes()
    short = state.all_reduce(torch.tensor([float(need > free)], dtype=torch.float64))
    if short.item() > 0:
        raise UserError(
            f"correction lsq needs about {need / GIB:.1f} GiB per rank for its float64 input Grams "
            f"(ffn^2 + (heads*head_dim)^2 + 2 hidden^2 per layer, split over TP), more than a rank has free "
            f"(here {free / GIB:.1f} GiB): use more TP/PP ranks or correction none"
        )


class GramAccumulator:
    """The input Grams of the re-fit layers of this rank's layers, summed over the micro-batches that pass
    through the hooked model: row blocks X_r^T X of the TP-split inputs on every TP rank, and the full Grams of
    the norm outputs on the TP rank that solves for them."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.rows: dict[tuple[int, str], torch.Tensor] = {}  # (global layer, kind) -> [n/tp or n, n] float64
        self.owner: dict[tuple[int, str], int] = {}  # -> index among the stage's TP x DP ranks

    def attach(self, model) -> list:
        """Hooks on every layer of ``model``; the caller removes the returned handles."""
        layers = {layer.layer_number - 1: layer for layer in model.decoder.layers}
        self.owner = deal(sorted(layers), self.cfg, state.tp_size() * state.dp_size())
        handles = []
        for idx, kind in sorted(self.owner):
            layer = layers[idx]
            if kind in TP_SPLIT:
                linear = layer.mlp.linear_fc2 if kind == "fc2" else layer.self_attention.linear_proj
                handles.append(linear.register_forward_pre_hook(self._split_hook((idx, kind))))
            elif self.owner[(idx, kind)] % state.tp_size() == state.tp_rank():
                norm = layer.input_layernorm if kind == "qkv" else layer.pre_mlp_layernorm
                handles.append(norm.register_forward_hook(self._norm_hook((idx, kind))))
        return handles

    def _add(self, key: tuple[int, str], block: torch.Tensor) -> None:
        acc = self.rows.get(key)
        self.rows[key] = block if acc is None else acc.add_(block)

    def _split_hook(self, key: tuple[int, str]) -> Callable:
        def hook(_module, args):
            x = args[0].detach().float().flatten(0, -2)  # [tokens, n/tp]
            full = torch.cat(state.all_gather(x, state.tp_group()), 1)  # [tokens, n]
            self._add(key, (x.T @ full).double())

        return hook

    def _norm_hook(self, key: tuple[int, str]) -> Callable:
        def hook(_module, _args, output):
            x = output.detach().float().flatten(0, -2)  # [tokens, h]
            self._add(key, (x.T @ x).double())

        return hook

    def finish(self) -> dict[tuple[int, str], torch.Tensor]:
        """The full Grams [n, n] that this rank solves for (a collective over the stage's ranks)."""
        me = state.tp_rank() + state.tp_size() * state.dp_rank()
        owned = {}
        for key in sorted(self.owner):
            if key[1] in TP_SPLIT:
                rows = state.all_reduce(self.rows.pop(key), state.dp_group())
                full = torch.cat(state.all_gather(rows, state.tp_group()), 0)
                del rows
            elif key in self.rows:  # this TP rank accumulated it, in every DP replica
                full = state.all_reduce(self.rows.pop(key), state.dp_group())
            else:
                continue
            if self.owner[key] == me:
                owned[key] = full
            del full
        return owned


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """``weight`` [o, n] re-fit on the input units ``keep`` (ascending): W_K + W_R G_RK (G_KK + lam I)^-1 with
    lam = ``damping`` x mean(diag ``gram``), in float64; returns [o, len(keep)] in ``weight``'s dtype."""
    n = gram.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    drop = mask.nonzero().flatten()
    lam = damping * gram.diagonal().mean()
    if len(drop) == 0 or lam == 0:  # nothing removed, or inputs that were always zero: nothing to re-fit
        return weight[:, keep].clone()
    device = gram.device
    keep_d, drop_d = keep.to(device), drop.to(device)
    w = weight.to(device=device, dtype=torch.float64)
    rhs = gram[keep_d][:, drop_d] @ w[:, drop_d].T  # G_KR W_R^T [k, o]
    corrected = w[:, keep_d] + ridge_solve(gram[keep_d][:, keep_d], rhs, lam, damping).T
    return corrected.to(device=weight.device, dtype=weight.dtype)


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, lam: torch.Tensor, damping: float, of: str = "") -> torch.Tensor:
    """(``gram`` + ``lam`` I)^-1 ``rhs`` by Cholesky. A damped Gram that is not positive definite (or no damping
    at all) is a one-line error naming ``damping`` and what the Gram is ``of``."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + lam * eye)
    if info.item() != 0 or lam == 0:
        raise UserError(f"correction lsq: the damped Gram{of} is not positive definite; raise correction_damping "
                        f"(now {damping})")
    return torch.cholesky_solve(rhs, chol)


def kept_inputs(kind: str, cfg: ModelConfig, groups: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Input columns of ``linear_proj`` that the kept heads keep (their head_dim columns each), in the order
    :func:`~nemo_minitron.prune.slicing.slice_canonical` keeps them."""
    d = cfg.kv_channels
    head = (groups.unsqueeze(1) * cfg.heads_per_group + heads).flatten()  # global head index
    return (head.unsqueeze(1) * d + torch.arange(d)).flatten()


def refit_plan(layers: list[int], kinds: tuple[str, ...] = tuple(LINEARS)) -> dict[str, tuple[int, str]]:
    """The pruned model's tensors that are re-fit, by name, with the (original layer, kind) each comes from:
    the linear ``kinds`` (default: all of :data:`LINEARS`; other parts are ignored) of every kept layer
    (``layers``: original indices, in the pruned model's order)."""
    return {f"decoder.layers.{new}.{LINEARS[kind]}.weight": (old, kind)
            for new, old in enumerate(layers) for kind in kinds if kind in LINEARS}


def norm_scales(energy: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
    """The factor on each RMS norm weight (by name) of a model cut to the hidden channels ``keep``:
    sqrt(f h / h'), f the kept channels' share of the norm's input ``energy`` [h] (sum over the calibration tokens of
    (x_c / rms(x))^2; :class:`~nemo_minitron.prune.importance.Importance`'s ``norm_energy``)."""
    return {name: math.sqrt(float(e[keep].sum() / e.sum()) * len(e) / len(keep)) for name, e in energy.items()}


def _problem(kind: str, weight: torch.Tensor, cfg: ModelConfig, selection,
             old: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight with its kept output rows and all its inputs, the kept inputs) of layer ``old``'s ``kind``,
    from its full source ``weight``."""
    if kind == "fc2":
        return weight[selection.channels], selection.neurons[old]
    if kind == "proj":
        return weight[selection.channels], kept_inputs(kind, cfg, selection.groups[old], selection.heads[old])
    if kind == "qkv":
        return qkv_rows(weight, cfg, selection.groups[old], selection.heads[old]), selection.channels
    return fc1_rows(weight, selection.neurons[old]), selection.channels


def correct(weight: torch.Tensor, cfg: ModelConfig, selection, old: int, kind: str, gram: torch.Tensor,
            damping: float, layer_map: torch.Tensor | None = None) -> torch.Tensor:
    """Layer ``old``'s ``kind`` of linear layer, cut to the kept units of ``selection`` and re-fit (on the CPU)
    from its full source ``weight`` and its input ``gram`` (from :meth:`GramAccumulator.finish`, on the rank that
    solves it). A ``linear_fc2`` before removed layers first takes in their ``layer_map`` T [hidden, hidden]
    (:mod:`~nemo_minitron.prune.layer_map`): its output rows become T^T W."""
    dtype = weight.dtype
    if layer_map is not None:
        weight = layer_map.to(weight.device).T @ weight.double()
    weight, keep = _problem(kind, weight, cfg, selection, old)
    return refit(weight, gram, keep, damping).to(dtype).cpu()
