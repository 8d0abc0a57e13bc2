"""RMSNorm for the local (non-Transformer-Engine) layer spec under sequence parallelism.

megatron-core's local spec builds its norms through ``WrappedTorchNorm``, which refuses
``sequence_parallel``: under it each tensor-parallel rank normalises only its own slice of the sequence, so
the norm weight's gradient on a rank covers only that slice, and megatron finds the weights to sum over TP by a
``sequence_parallel`` attribute that its own norms do not set. This norm is ``torch.nn.RMSNorm`` itself
(same ``weight``, same state dict, same forward) with that attribute set, as megatron sets it on
Transformer Engine's norms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm(hidden_size, eps)`` built as megatron builds a norm from a layer spec."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
