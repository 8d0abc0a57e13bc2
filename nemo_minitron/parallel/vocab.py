"""Losses over vocabulary-parallel logits: each TP rank holds a slice [.., v/tp] of the padded vocabulary."""

from __future__ import annotations

import torch

from nemo_minitron.parallel import state


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Push the logits of padding rows (ids >= vocab_size) on this rank to the dtype's minimum.

    logits: [..., v/tp] for this TP rank. Padding exists because megatron rounds the vocabulary up to a
    multiple of ``make_vocab_size_divisible_by * tp``; those rows must not take probability mass.
    """
    part = logits.shape[-1]
    valid = vocab_size - state.tp_rank() * part
    if valid >= part:
        return logits
    return logits.index_fill(-1, torch.arange(max(valid, 0), part, device=logits.device), torch.finfo(logits.dtype).min)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy [b, s] from vocab-parallel logits [b, s, v/tp] and labels [b, s], in fp32.

    The full vocabulary is never gathered: megatron's vocab-parallel CE reduces max and sum-exp over TP.
    ``logits`` is left untouched (megatron's CE works in place on its input, so it gets a copy).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    work = mask_padded_vocab(logits.float(), vocab_size)
    if work.data_ptr() == logits.data_ptr():
        work = work.clone()
    return vocab_parallel_cross_entropy(work, labels)
