"""Run megatron-core 0.16 on CPU (gloo), applied only when CUDA is absent.

megatron-core hard-codes CUDA in a few places on the paths this project uses:
``torch.cuda.current_device()`` for buffers (rotary embedding, p2p receive buffers, TP gathers, the global
memory buffer, DDP's gradient buffers), ``torch.cuda.synchronize()`` in p2p communication, ``Tensor.cuda()``
(tied embeddings across pipeline stages, optimizer state), ``device="cuda"`` literals in the pipeline
schedules, the default causal mask, the optimizers, gradient clipping and the L2-norm fallback, the tensor type
names ``"torch.cuda.FloatTensor"`` by which the mixed-precision and distributed optimizers sort parameters, a
CUDA-only RNG tracker, and the CUDA generator's state that activation recomputation saves before a
checkpointed forward and restores to recompute it. On a machine without CUDA these calls can only fail, so
redirecting them to the CPU changes nothing for GPU runs. One more is about precision: without Transformer Engine
or apex, megatron's gradient norm is torch's fp32 norm of each tensor, off by ~1e-4 for a large tensor on CPU;
it is accumulated in float64 instead.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _cpu_device(*_args, **_kwargs) -> torch.device:
    return torch.device("cpu")


def _noop(*_args, **_kwargs) -> None:
    return None


def _stay(self: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    return self


_tensor_type = torch.Tensor.type


def _cuda_type_name(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    """``Tensor.type()``: the CUDA name of a CPU tensor's type (``torch.cuda.BFloat16Tensor``), which is what
    megatron's optimizers test for; with a ``dtype`` it converts as before."""
    if dtype is None and not kwargs:
        return _tensor_type(self).replace("torch.", "torch.cuda.", 1)
    return _tensor_type(self, dtype, non_blocking, **kwargs)


class _TorchWithCpuDefaults(types.ModuleType):
    """Stands in for ``torch`` inside a megatron module: tensor factories asked for ``"cuda"`` get the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "arange", "tensor")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


class CpuRNGStatesTracker:
    """Named RNG streams (model-parallel, data-parallel, expert) on the CPU generator.

    megatron forks the ``model-parallel-rng`` stream around dropout in tensor-parallel regions so every TP
    rank draws different masks; this does the same with ``torch.get_rng_state``/``set_rng_state``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG stream {name} or seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG stream {name} was not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_rng_tracker(seed: int, tp_rank: int) -> None:
    """CPU counterpart of ``model_parallel_cuda_manual_seed`` (same stream names and seed offsets)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _l2_norm_float64(_chunk_size, _noop_flag, tensor_lists, _per_tensor, *_args):
    """megatron's fallback ``multi_tensor_l2norm`` (the L2 norm of all tensors of ``tensor_lists[0]``), summed in
    float64 without a float64 copy of each tensor."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1), None
    total = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).pow(2).sum().sqrt()
    return total.float().reshape(1), None


def apply_cpu_patches() -> None:
    """Redirect megatron-core's CUDA-only call sites to the CPU. Idempotent; does nothing with CUDA."""
    global _APPLIED
    if _APPLIED or cuda_available():
        return
    from megatron.core import utils as core_utils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as transformer_utils

    torch.cuda.current_device = _cpu_device
    torch.cuda.synchronize = _noop
    # Recomputation also restores the CPU generator and the RNG tracker (CpuRNGStatesTracker), which hold
    # every random state there is without CUDA.
    mrandom._get_cuda_rng_state = _noop
    mrandom._set_cuda_rng_state = _noop
    torch.Tensor.cuda = _stay
    torch.Tensor.type = _cuda_type_name
    cpu_torch = _TorchWithCpuDefaults()
    # `fusions.fused_softmax` imports get_default_causal_mask from transformer.utils; the function looks up
    # `torch` in transformer.utils' globals, so one replacement covers both modules.
    for module in (transformer_utils, schedules, core_utils, param_and_grad_buffer, optimizer, distrib_optimizer,
                   clip_grads):
        module.torch = cpu_torch
    clip_grads.l2_norm_impl = _l2_norm_float64
    _APPLIED = True
