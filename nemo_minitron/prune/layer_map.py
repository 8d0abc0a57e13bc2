"""Weight correction for removed layers: each run of consecutive removed layers is replaced by one linear map,
merged into the ``linear_fc2`` of the layer before the run (ReplaceMe: Shopkhoev et al., NeurIPS 2025,
arXiv 2505.02819).

With M the output of that layer's MLP, Y its output (the residual stream after it) and Y' the residual stream
after the run's last layer, all on the calibration set in the unpruned model, the MLP takes over what the run
added to the residual stream, M T ~ M + (Y' - Y). As in the width re-fit, the fit is ridge-damped toward the
plain cut (T = I):

    T = argmin ||M T - (M + Y' - Y)||^2 + lam ||T - I||^2 = I + (M^T M + lam I)^-1 M^T (Y' - Y),
    lam = damping x mean(diag M^T M),        linear_fc2 <- T^T linear_fc2

It assumes that what the run adds is close to a linear function of the MLP output before it (ReplaceMe
evaluates it on Llama-family models at moderate depth-pruning ratios). A run that starts at layer 0 has no
layer before it and is cut plainly. Y' is known only once the layers to drop are chosen: one more forward pass
over the calibration set, made only when layers are dropped (the width re-fit needs none).

Parallel: pruning runs without sequence parallelism, so M and the residual stream are the same on every TP rank,
and each TP rank accumulates the same sums; they are summed over data-parallel ranks. When the layer before a
run and the run's last layer are on different pipeline stages, the first keeps [M, Y] of every micro-batch
(tokens x 2 hidden floats) and sends them to the second one micro-batch at a time after the pass; the stage that
solves T sends it to every stage, so every rank ends with the same maps.
"""

from __future__ import annotations

from typing import Callable

import torch

from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.prune import importance as imp_lib
from nemo_minitron.prune.correction import ridge_solve


def removed_runs(drop: list[int]) -> list[tuple[int, int]]:
    """The maximal runs ``(first, last)`` of consecutive layers in ``drop``, in order."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(drop):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _stages(model) -> dict[int, int]:
    """{global layer: the pipeline stage that holds it}."""
    return imp_lib.gather_layers(dict.fromkeys((layer.layer_number - 1 for layer in model.decoder.layers),
                                                state.pp_rank()))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().flatten(0, -2).double()  # [tokens, hidden]


class _RunStats:
    """M^T M and M^T (Y' - Y) of one run, from the micro-batches that pass through the hooked model."""

    def __init__(self, hidden: int) -> None:
        self.gram = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.cross = torch.zeros(hidden, hidden, dtype=torch.float64)

    def add(self, m: torch.Tensor, y: torch.Tensor, after: torch.Tensor) -> None:
        self.gram += (m.T @ m).cpu()
        self.cross += (m.T @ (after - y)).cpu()

    def solve(self, damping: float) -> torch.Tensor:
        lam = damping * self.gram.diagonal().mean()
        shift = ridge_solve(self.gram, self.cross, lam, damping, of=" of a removed run's MLP output")
        return torch.eye(self.gram.shape[0], dtype=torch.float64) + shift


def layer_maps(model, cfg: ModelConfig, calibration: list[torch.Tensor], drop: list[int],
               damping: float) -> dict[int, torch.Tensor]:
    """{layer before a run of ``drop`` (original index): its map T [hidden, hidden], float64}, the same on every
    rank, from one forward pass of the unpruned ``model`` over this rank's ``calibration`` micro-batches."""
    runs = [(first - 1, last) for first, last in removed_runs(drop) if first > 0]
    if not runs:
        return {}
    stage = _stages(model)
    me = state.pp_rank()
    layers = {layer.layer_number - 1: layer for layer in model.decoder.layers}
    stats = {before: _RunStats(cfg.hidden_size) for before, last in runs if stage[last] == me}
    current: dict[int, list] = {}  # before -> [M, Y] of the micro-batch in flight
    sent: dict[int, list] = {}  # before -> [M | Y] of every micro-batch, to go to the stage of the run's end
    ends: dict[int, list] = {}  # before -> Y' of every micro-batch, from the stage of the run's end

    def on_mlp(before: int) -> Callable:
        def hook(_module, _args, output):
            current[before] = [_flat(output[0])]
        return hook

    def on_before(before: int, local_end: bool) -> Callable:
        def hook(_module, _args, output):
            current[before].append(_flat(output[0]))
            if not local_end:
                sent.setdefault(before, []).append(torch.cat(current.pop(before), 1).float())
        return hook

    def on_end(before: int, local_start: bool) -> Callable:
        def hook(_module, _args, output):
            if local_start:
                stats[before].add(*current.pop(before), _flat(output[0]))
            else:
                ends.setdefault(before, []).append(_flat(output[0]))
        return hook

    handles = []
    for before, last in runs:
        if before in layers:
            handles += [layers[before].mlp.register_forward_hook(on_mlp(before)),
                        layers[before].register_forward_hook(on_before(before, stage[last] == me))]
        if last in layers:
            handles.append(layers[last].register_forward_hook(on_end(before, stage[before] == me)))
    try:
        with torch.no_grad():
            imp_lib.lm_loss(model, cfg, calibration)
    finally:
        for handle in handles:
            handle.remove()

    maps = {}
    for before, last in runs:
        if stage[before] != stage[last]:
            for i, batch in enumerate(calibration):
                tokens = batch.shape[0] * (batch.shape[1] - 1)
                mine = sent[before][i] if stage[before] == me else torch.empty(tokens, 2 * cfg.hidden_size)
                both = state.broadcast_from_stage(mine, stage[before]).double()
                if stage[last] == me:
                    stats[before].add(both[:, : cfg.hidden_size], both[:, cfg.hidden_size:], ends[before][i])
            sent.pop(before, None)
        t = torch.empty(cfg.hidden_size, cfg.hidden_size, dtype=torch.float64)
        if stage[last] == me:
            run = stats.pop(before)
            state.all_reduce(run.gram, state.dp_group())
            state.all_reduce(run.cross, state.dp_group())
            t = run.solve(damping)
        maps[before] = state.broadcast_from_stage(t, stage[last])
    return maps
