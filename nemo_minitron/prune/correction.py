"""Weight correction after width pruning: ridge least-squares re-fit of the layers that read pruned units.

``linear_fc2`` reads the MLP neurons and ``linear_proj`` the attention heads. With X the calibration inputs of
such a layer in the unpruned model (rows: tokens), W its weight (rows: kept hidden channels) and K the kept
input units, the corrected weight is

    W' = argmin ||X W^T - X_K W'^T||^2 + lam ||W' - W_K||^2 = W_K + W_R G_RK (G_KK + lam I)^-1

with G = X^T X the input Gram, R the removed units and lam = ``damping`` x mean(diag G). The ridge pulls toward
the plainly sliced weights W_K: a large damping gives back ``correction: none``, and a layer that loses no unit
is left exactly as it is.

The Grams are accumulated by forward pre-hooks during the importance pass (no pass of their own). Both
layers are row-parallel, so under tensor parallelism each rank sees only its slice X_r of the inputs; it
gathers the full X over TP per micro-batch and keeps its row block X_r^T X ([n/tp, n], float64). After the pass
the blocks are summed over data-parallel ranks and concatenated over TP; each full Gram is kept by one rank
of its pipeline stage (layers are dealt round-robin over the stage's TP x DP ranks), which solves that
layer's correction; the corrected tensors are then shared with every rank. Memory per rank: 8 bytes x
(layers of its stage) x (ffn^2 + (heads x head_dim)^2) / TP while accumulating, plus the full Grams it solves
for; :func:`check_memory` refuses a run that cannot fit before the pass.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.cpu import cuda_available

# The layers that read pruned units, by the name of the units' kind.
LINEARS = {"fc2": "mlp.linear_fc2", "proj": "self_attention.linear_proj"}
GIB = 2**30


def gram_bytes(cfg: ModelConfig, tp: int, pp: int, dp: int) -> int:
    """Peak bytes per rank of the float64 Grams: the row blocks of the stage's layers while accumulating, and
    the full Grams of the layers the rank solves for (conservatively, both at once, plus one being gathered)."""
    layers = math.ceil(cfg.num_layers / pp)
    ffn, attn = cfg.ffn_hidden_size, cfg.num_attention_heads * cfg.kv_channels
    blocks = layers * (ffn**2 + attn**2) / tp
    owned = math.ceil(2 * layers / (tp * dp)) * max(ffn, attn) ** 2
    return int(8 * (blocks + owned + 2 * max(ffn, attn) ** 2))


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
            f"(ffn^2 + (heads*head_dim)^2 per layer, split over TP), more than a rank has free "
            f"(here {free / GIB:.1f} GiB): use more TP/PP ranks or correction none"
        )


class GramAccumulator:
    """Row blocks X_r^T X of the input Grams of ``linear_fc2`` and ``linear_proj`` of this rank's layers,
    summed over the micro-batches that pass through the hooked model."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str], torch.Tensor] = {}  # (global layer, kind) -> [n/tp, n] float64

    def attach(self, model) -> list:
        """Forward pre-hooks on every layer of ``model``; the caller removes the returned handles."""
        handles = []
        for layer in model.decoder.layers:
            idx = layer.layer_number - 1
            handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(self._hook((idx, "fc2"))))
            handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(self._hook((idx, "proj"))))
        return handles

    def _hook(self, key: tuple[int, str]) -> Callable:
        def hook(_module, args):
            x = args[0].detach().float().flatten(0, -2)  # [tokens, n/tp]
            full = torch.cat(state.all_gather(x, state.tp_group()), 1)  # [tokens, n]
            block = (x.T @ full).double()
            acc = self.rows.get(key)
            self.rows[key] = block if acc is None else acc.add_(block)

        return hook

    def finish(self) -> dict[tuple[int, str], torch.Tensor]:
        """The full Grams [n, n] of the layers this rank solves for (a collective over the stage's ranks)."""
        solvers = state.tp_size() * state.dp_size()
        me = state.tp_rank() + state.tp_size() * state.dp_rank()
        owned = {}
        for j, key in enumerate(sorted(self.rows)):
            rows = state.all_reduce(self.rows.pop(key), state.dp_group())
            full = torch.cat(state.all_gather(rows, state.tp_group()), 0)
            del rows
            if j % solvers == me:
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
    a = gram[keep_d][:, keep_d] + lam * torch.eye(len(keep), dtype=torch.float64, device=device)
    rhs = gram[keep_d][:, drop_d] @ w[:, drop_d].T  # G_KR W_R^T [k, o]
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0:
        raise UserError(f"correction lsq: the damped Gram is not positive definite; raise correction_damping "
                        f"(now {damping})")
    corrected = w[:, keep_d] + torch.cholesky_solve(rhs, chol).T
    return corrected.to(device=weight.device, dtype=weight.dtype)


def kept_inputs(kind: str, cfg: ModelConfig, groups: torch.Tensor, heads: torch.Tensor,
                neurons: torch.Tensor) -> torch.Tensor:
    """Input columns of ``linear_fc2`` (``kind`` fc2: the kept neurons) or ``linear_proj`` (proj: the kept heads'
    head_dim columns), in the order :func:`~nemo_minitron.prune.slicing.slice_canonical` keeps them."""
    if kind == "fc2":
        return neurons
    d = cfg.kv_channels
    head = (groups.unsqueeze(1) * cfg.heads_per_group + heads).flatten()  # global head index
    return (head.unsqueeze(1) * d + torch.arange(d)).flatten()


def correct(tensors: dict[str, torch.Tensor], canonical: dict[str, torch.Tensor], cfg: ModelConfig, selection,
            grams: dict[tuple[int, str], torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
    """``tensors`` (the sliced canonical state dict of the pruned model) with ``linear_fc2`` and ``linear_proj``
    of every kept layer re-fit; each rank solves the layers whose Grams it holds (``grams``, from
    :meth:`GramAccumulator.finish`) and every rank returns them all."""
    local: dict[str, torch.Tensor] = {}
    for new, old in enumerate(selection.layers):
        for kind, linear in LINEARS.items():
            gram = grams.get((old, kind))
            if gram is None:
                continue
            keep = kept_inputs(kind, cfg, selection.groups[old], selection.heads[old], selection.neurons[old])
            weight = canonical[f"decoder.layers.{old}.{linear}.weight"][selection.channels]
            local[f"decoder.layers.{new}.{linear}.weight"] = refit(weight, gram, keep, damping).cpu()
    merged = dict(local)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Optional[dict]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        merged = {k: v for part in everyone for k, v in part.items()}
    missing = [f"decoder.layers.{new}.{linear}.weight" for new in range(len(selection.layers))
               for linear in LINEARS.values() if f"decoder.layers.{new}.{linear}.weight" not in merged]
    if missing:
        raise RuntimeError(f"no rank re-fit {missing[0]}")
    return {**tensors, **merged}
