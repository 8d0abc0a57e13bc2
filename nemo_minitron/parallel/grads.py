"""Gradient reductions for training megatron-core models with explicit collectives.

- data parallel: every DP rank's gradients are averaged over the DP group;
- tied embeddings with PP > 1: the first stage's embedding and the last stage's output layer hold copies of
  one weight; their gradients are summed over megatron's embedding group so both copies stay equal;
- sequence parallelism: a replicated parameter that works on this TP rank's slice of the sequence only (the
  norms; marked ``sequence_parallel`` as megatron marks them) has a partial gradient, summed over TP;
- gradient norm: each tensor-parallel shard counted once, replicated parameters (norms; whole again after
  the sequence-parallel sum) once per TP group, the tied copy once, then summed over the model-parallel ranks.

Gradients are read from ``param.main_grad`` (fp32, see ``distill.optim``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_minitron.parallel import state


def _sharded(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def sync_tied_embedding_grads(model) -> None:
    """Sum the gradients of the two copies of a tied embedding across the first and last stage."""
    from megatron.core import parallel_state

    if state.pp_size() == 1 or not model.share_embeddings_and_output_weights:
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    weight = model.shared_embedding_or_output_weight()
    dist.all_reduce(weight.main_grad, group=parallel_state.get_embedding_group())


def allreduce_sequence_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of the ``params`` marked ``sequence_parallel`` over the TP group: the sequence-parallel
    part of megatron's ``_allreduce_non_tensor_model_parallel_grads`` (``finalize_model_grads``)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.main_grad for p in params if getattr(p, "sequence_parallel", False)]
    if state.tp_size() == 1 or not grads:
        return
    # One collective for all of them: they are small (a norm weight is [h]) and many (two per layer).
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=state.tp_group())
    for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(summed)


def average_data_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    if state.dp_size() == 1:
        return
    for p in params:
        dist.all_reduce(p.main_grad, group=state.dp_group())
        p.main_grad.div_(state.dp_size())


def grad_norm(model, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` over all model-parallel ranks (float64 scalar)."""
    from megatron.core import parallel_state

    skip = None
    if (state.pp_size() > 1 and model.share_embeddings_and_output_weights and state.is_last_stage()
            and not state.is_first_stage()):
        skip = model.shared_embedding_or_output_weight()  # the first stage counts the tied weight
    # On the gradients' device: a CUDA scalar cannot be added into a CPU one, and NCCL reduces CUDA tensors only.
    mine = [p.main_grad for p in params if p is not skip and (_sharded(p) or state.tp_rank() == 0)]
    total = torch.zeros((), dtype=torch.float64, device=params[0].main_grad.device if params else None)
    if mine:
        # One fused pass over all gradients, accumulated in float64 (an fp32 norm of a large tensor is off by
        # ~1e-4 on CPU), without a float64 copy of each gradient.
        total += torch.stack(torch._foreach_norm(mine, dtype=torch.float64)).pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt()
