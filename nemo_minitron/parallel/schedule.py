"""Run a model over micro-batches with megatron-core's pipeline schedules (1F1B when PP > 1).

Every stage reads the same micro-batches: the first stage embeds the inputs, the last stage computes the
loss from its output and the labels; stages in between only pass activations.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from nemo_minitron.parallel import state

# (output of the last stage [b, s, v/tp], labels [b, s]) -> (scalar loss, dict of detached tensors to report)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def split_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [b, s+1] -> (input_ids [b, s], position_ids [b, s], labels [b, s])."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
    return inputs, positions, labels


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[torch.Tensor],
    loss_fn: LossFn,
    forward_only: bool,
    adjust_tensor_shapes_fn: Optional[Callable] = None,
) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward unless ``forward_only``) over ``micro_batches`` of tokens [b, s+1].

    Returns the loss dicts of every micro-batch on the last pipeline stage, an empty list elsewhere.
    Gradients are accumulated in the parameters' ``.grad`` (or megatron DDP buffers).
    ``adjust_tensor_shapes_fn`` changes the shapes sent between stages (see distill.pair).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device

    def step(data_iterator, stage_model):
        inputs, positions, labels = split_tokens(next(data_iterator).to(device))
        output = stage_model(inputs, positions, None)
        return output, lambda out: loss_fn(out, labels)

    micro_batch_size, seq_length = micro_batches[0].shape[0], micro_batches[0].shape[1] - 1
    results = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust_tensor_shapes_fn if state.pp_size() > 1 else None,
    )
    return list(results) if state.is_last_stage() else []
