"""megatron-core's training engine around the trainable modules of a run: gradients and the optimizer.

- Gradients: each trainable module (the student; the projections of intermediate-state losses) is wrapped in
  megatron's ``DistributedDataParallel``: its gradients accumulate in fp32 in contiguous bucketed buffers
  (``param.main_grad`` are views into them), and a bucket's reduce-scatter over the data-parallel group starts
  in the backward of the last micro-batch as soon as the bucket is complete, overlapping the rest of the
  backward. ``finalize`` then waits for them and runs megatron's ``finalize_model_grads``: tied embeddings
  summed across the first and last pipeline stages, sequence-parallel norm gradients summed over TP.
- Optimizer: ``get_megatron_optimizer`` with the distributed optimizer (ZeRO-1): each data-parallel rank keeps
  the fp32 master weights and both Adam moments of its 1/DP share of the parameters only, steps them, and the
  updated parameters are all-gathered. Norms and biases get no weight decay (megatron's rule). The global
  gradient norm counts every tensor-parallel shard and the tied copy once.

The modules' own forward is never run through the wrapper: the wrappers are only the gradient machinery.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from nemo_minitron.parallel import mcore_fixes


class TrainingEngine:
    """DDP wrappers of ``modules`` (the first is the model) and one megatron optimizer over all of them."""

    def __init__(self, modules: list[torch.nn.Module], lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, bucket_size: Optional[int] = None) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = modules[0].config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True,
            bucket_size=bucket_size)
        mcore_fixes.apply()
        self.chunks = [DistributedDataParallel(config, ddp_config, module) for module in modules]
        dtype = next(modules[0].parameters()).dtype
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
            adam_eps=eps, clip_grad=0.0, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            params_dtype=dtype, use_distributed_optimizer=True), self.chunks)
        _use_fused_adamw(self.optimizer)
        # What megatron's pipeline schedules call: gradient reduction only after the last micro-batch's
        # backward (no_sync around the others), started per bucket as the backward completes it.
        config.no_sync_func = self.no_sync
        config.grad_sync_func = None
        config.finalize_model_grads_func = None  # run by :meth:`finalize`, with the loss's bookkeeping
        self.config = config

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for chunk in self.chunks:
                stack.enter_context(chunk.no_sync())
            yield

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finalize(self) -> None:
        """Wait for the data-parallel reductions; sum tied-embedding and sequence-parallel norm gradients."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

        # The model's tied-embedding copies sit in its first and last chunk: the other modules are finished apart.
        finalize_model_grads(self.chunks[:1])
        for chunk in self.chunks[1:]:
            chunk.finish_grad_sync()
        if self.chunks[1:]:
            _allreduce_non_tensor_model_parallel_grads(self.chunks[1:], self.config)

    def step(self, lr: float, clip_grad: float) -> tuple[float, bool]:
        """Global gradient norm (before clipping) and whether the optimizer stepped: a non-finite norm skips
        the step (the gradients are dropped at the next :meth:`zero_grad`)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self.optimizer.prepare_grads()
        norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(norm):
            return norm, False
        if clip_grad > 0:
            for inner in self.optimizer.chained_optimizers:
                params = inner.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, clip_grad, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step_with_ready_grads()
        return norm, True

    def sharded_state_dict(self, model_sharded: dict, loading: bool) -> dict:
        """The optimizer's sharded state dict, per model parameter (megatron's ``fully_reshardable`` format: it
        loads at any TP / PP / DP layout). ``model_sharded``: the sharded state dicts of every trainable module."""
        if loading:
            # Loading fills existing state tensors: before the first step there are none yet.
            for inner in self.optimizer.chained_optimizers:
                if not inner.optimizer.state:
                    inner._init_optimizer_states_with_dummy_values()
        return self.optimizer.sharded_state_dict(model_sharded, is_loading=loading,
                                                 metadata={"distrib_optim_sharding_type": "fully_reshardable"})

    def load_state_dict(self, loaded: dict) -> None:
        self.optimizer.load_state_dict(loaded)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: fp32 master copies and Adam moments."""
        total = 0
        for inner in self.optimizer.chained_optimizers:
            for per_param in inner.optimizer.state.values():
                total += sum(t.numel() * t.element_size() for t in per_param.values()
                             if torch.is_tensor(t) and t.dim() > 0)
            for group in getattr(inner, "shard_fp32_from_float16_groups", []):
                total += sum(p.numel() * p.element_size() for p in group)
        return total

    def release(self) -> None:
        """Detach from the modules: their gradients go to ``.grad`` again (the backward hooks stay registered
        but find no bucket) and the schedules' hooks are cleared."""
        for chunk in self.chunks:
            chunk.param_to_bucket_group.clear()
            for param in chunk.module.parameters():
                if hasattr(param, "main_grad"):
                    del param.main_grad
        self.config.no_sync_func = None


def _use_fused_adamw(optimizer) -> None:
    """Without Transformer Engine or NVIDIA apex megatron steps torch's ``AdamW``, which on CPU defaults to a
    loop over the tensors: its fused kernel (CPU and CUDA) updates them all in one pass, several times faster."""
    for inner in optimizer.chained_optimizers:
        torch_optimizer = getattr(inner, "optimizer", None)
        if isinstance(torch_optimizer, torch.optim.AdamW):
            for group in torch_optimizer.param_groups:
                group["fused"], group["foreach"] = True, False
