"""Held-out loss over token windows: the one computation behind the ``eval`` stage, the trainer's periodic
evaluation, pruning's calibration loss and NAS's candidate ranking.

A window of ``L`` tokens is scored on predicting its tokens 2..L from the ones before them (what
``transformers``' ``model(ids, labels=ids)`` scores); the loss is the mean over all scored tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from nemo_minitron.parallel import state
from nemo_minitron.parallel.schedule import forward_backward
from nemo_minitron.parallel.vocab import token_cross_entropy

# What the model's last stage returns [b, s, ...] -> vocabulary-parallel logits [b, s, V/tp].
ToLogits = Callable[[torch.Tensor], torch.Tensor]


def token_loss_sums(model, vocab_size: int, micro_batches: list[torch.Tensor],
                    to_logits: Optional[ToLogits] = None) -> torch.Tensor:
    """[2] float64: (sum of token losses, token count) over ``micro_batches`` [b, s+1] of this rank's pipeline,
    on its last stage (zeros elsewhere). No reduction: see :func:`reduce_loss_sums`. ``to_logits`` maps the
    last stage's output to logits when the model returns something else (a distillation student returns its
    final hidden states)."""
    # A sequence-parallel model splits its inputs' tokens over the TP ranks, so their number must be a multiple
    # of TP: the windows get extra tokens at their end, whose losses are dropped. Under causal attention no
    # token sees the ones after it, so the scored tokens' losses stay what they are without them.
    multiple = state.tp_size() if model.config.sequence_parallel else 1
    pad = -(micro_batches[0].shape[1] - 1) % multiple
    if pad:
        micro_batches = [torch.nn.functional.pad(tokens, (0, pad)) for tokens in micro_batches]

    def loss_fn(output: torch.Tensor, labels: torch.Tensor):
        logits = output if to_logits is None else to_logits(output)
        losses = token_cross_entropy(logits, labels, vocab_size)[:, : labels.shape[1] - pad]
        return losses.mean(), {"sum": losses.sum().detach().double(), "count": torch.tensor(float(losses.numel()))}

    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for out in forward_backward(model, micro_batches, loss_fn, forward_only=True):
            total += torch.stack([out["sum"].cpu(), out["count"].double()])
    return total


def reduce_loss_sums(total: torch.Tensor) -> tuple[float, int]:
    """(sum, count) of :func:`token_loss_sums` from the last stage, summed over data-parallel ranks."""
    total = state.all_reduce(state.broadcast_from_last_stage(total), state.dp_group())
    return float(total[0]), int(total[1])


def windows_loss_sums(model, vocab_size: int, windows: list[torch.Tensor], mb: int,
                      to_logits: Optional[ToLogits] = None) -> tuple[float, int]:
    """(sum of token losses, number of tokens) of ``model`` over all ``windows`` [s] in micro-batches of
    ``mb``, split over data-parallel ranks; identical on every rank."""
    mine = windows[state.dp_rank() :: state.dp_size()]
    full = len(mine) // mb * mb
    # Pipeline schedules need equal micro-batches: the remainder runs as one smaller micro-batch. DP ranks
    # may differ in their remainder, so the reduction over them comes once, after all local sums.
    groups = [[torch.stack(mine[i : i + mb]) for i in range(0, full, mb)]]
    if full < len(mine):
        groups.append([torch.stack(mine[full:])])
    total = torch.zeros(2, dtype=torch.float64)
    for micro_batches in groups:
        if micro_batches:
            total += token_loss_sums(model, vocab_size, micro_batches, to_logits)
    return reduce_loss_sums(total)
