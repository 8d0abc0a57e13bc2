"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

Ranks come from torchrun / Slurm environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``) or from :func:`spawn`, which starts local ranks itself. The backend is NCCL with CUDA and
gloo without; on CPU the megatron-core patches of :mod:`nemo_minitron.parallel.cpu` are applied first.
Algorithms ask this module for ranks and groups and do their own explicit reductions.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError, storage_error
from nemo_minitron.fsutil import DirectoryLock
from nemo_minitron.parallel.config import ParallelConfig
from nemo_minitron.parallel.cpu import apply_cpu_patches, cuda_available, install_rng_tracker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Create the default process group (if needed), megatron's TP/PP/DP groups and the RNG streams."""
    from megatron.core import parallel_state, tensor_parallel

    apply_cpu_patches()
    if not dist.is_initialized():
        backend = "nccl" if cuda_available() else "gloo"
        if cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            # A lone process: no launcher variables are written, so later stages still see no launcher.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1)
    world = dist.get_world_size()
    if world % parallel.model_parallel_size:
        raise UserError(
            f"world size {world} is not divisible by TP*PP = {parallel.model_parallel_size}"
        )
    _destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        install_rng_tracker(seed, parallel_state.get_tensor_model_parallel_rank())


def _destroy_model_parallel() -> None:
    """Forget megatron's TP/PP/DP groups and destroy them. megatron's ``destroy_model_parallel`` only drops its
    references: without this, every stage run in one process (a ``run`` or ``bench`` runs dozens) would add
    another set of live groups, each with its own gloo threads and buffers, and slow every later stage."""
    from megatron.core import parallel_state

    groups = [g for g in parallel_state._global_process_group_list or [] if g is not None]
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for group in groups:
        try:
            dist.destroy_process_group(group)
        except ValueError:  # one of the gloo groups that destroy_model_parallel destroys itself
            pass


def destroy() -> None:
    global _waiting_group

    _destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _waiting_group = None


def launched() -> bool:
    """Whether a launcher (torchrun, Slurm, :func:`spawn`) started this process as one rank of several."""
    return "RANK" in os.environ


def global_rank() -> int:
    """This process's rank in the job (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def pp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def pp_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def dp_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def is_first_stage() -> bool:
    return pp_rank() == 0


def is_last_stage() -> bool:
    return pp_rank() == pp_size() - 1


def last_stage_global_rank() -> int:
    """Global rank of the last pipeline stage in this rank's pipeline (same TP/DP coordinates)."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_last_rank()


def all_reduce(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` (the world by default); returns the result on ``tensor``'s device.

    NCCL reduces CUDA tensors only: host tensors (statistics, flags) travel through the GPU there.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    if cuda_available() and not tensor.is_cuda:
        on_device = tensor.cuda()
        dist.all_reduce(on_device, group=group)
        return on_device.to(tensor.device)
    dist.all_reduce(tensor, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in rank order within ``group``."""
    if dist.get_world_size(group) == 1:
        return [tensor]
    source = tensor.contiguous().cuda() if cuda_available() else tensor.contiguous()
    parts = [torch.empty_like(source) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, source, group=group)
    return [part.to(tensor.device) for part in parts]


def broadcast_from_stage(tensor: torch.Tensor, stage: int) -> torch.Tensor:
    """The ``tensor`` of pipeline stage ``stage`` on every stage of this pipeline (the others pass a tensor of the
    same shape and dtype to receive it); returns it on ``tensor``'s device."""
    if pp_size() == 1:
        return tensor
    src = dist.get_global_rank(pp_group(), stage)
    if cuda_available() and not tensor.is_cuda:
        on_device = tensor.cuda()
        dist.broadcast(on_device, src=src, group=pp_group())
        return on_device.to(tensor.device)
    dist.broadcast(tensor, src=src, group=pp_group())
    return tensor


def broadcast_from_last_stage(obj: Any) -> Any:
    """Give every rank of this pipeline the Python object that the last stage holds."""
    if pp_size() == 1:
        return obj
    box = [obj if is_last_stage() else None]
    dist.broadcast_object_list(box, src=last_stage_global_rank(), group=pp_group())
    return box[0]


# What every rank imports, once, in the process that forks the ranks (multiprocessing's forkserver): a rank then
# starts in about a second instead of importing torch, megatron-core and transformers itself.
_RANK_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer", "transformers"]


def _spawned_rank(local_rank: int, fn: Callable, world_size: int, port: int, results, env: dict[str, str],
                  args: tuple) -> None:
    # The forkserver's environment is the one it started with: give the rank its parent's of now.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # One thread per rank: several ranks on few cores thrash otherwise.
    torch.set_num_threads(1)
    out = fn(*args)
    results.put((local_rank, out))


def spawn(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local processes (a fresh ``RANK`` each); return results by rank.

    ``fn`` calls :func:`initialize` itself. An exception on any rank is re-raised here. Return plain Python
    or numpy values: torch tensors travel through file descriptors that close when their rank exits.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_RANK_PRELOAD)
    results = ctx.SimpleQueue()
    procs = mp.start_processes(
        _spawned_rank,
        args=(fn, world_size, _free_port(), results, dict(os.environ), args),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    out: dict[int, Any] = {}
    # Drain while waiting: a rank blocks on put() until large results are read.
    while True:
        while not results.empty():
            rank, value = results.get()
            out[rank] = value
        if procs.join(timeout=0.05):
            break
    while not results.empty():
        rank, value = results.get()
        out[rank] = value
    return [out[r] for r in range(world_size)]


def raise_rank0_error(error: Optional[str]) -> None:
    """Raise global rank 0's one-line ``error`` (None: nothing went wrong) as a UserError on every rank, so
    that no rank goes on to wait in a collective for one that stopped."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)


# Ranks waiting for global rank 0's single-process work (preparing a corpus can take hours at scale) wait in a
# gloo group of their own with this timeout; the default group keeps its own, which catches hung collectives.
# The job's time limit ends a longer wait anyway.
RANK0_WAIT = timedelta(days=7)
_waiting_group: Optional[dist.ProcessGroup] = None


def _broadcast_from_rank0(obj: Any) -> Any:
    global _waiting_group
    if _waiting_group is None:
        _waiting_group = dist.new_group(backend="gloo", timeout=RANK0_WAIT)
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_waiting_group)
    return box[0]


def on_rank0(work: Callable[[], Any]) -> Any:
    """Call ``work`` on global rank 0 only, the other ranks waiting, and return its result on every rank.

    Its one-line failure (a :class:`UserError`, a full disk) is raised as the same UserError on every rank;
    any other exception is re-raised on rank 0 and named in one line on the others, so that no rank is left
    waiting for one that stopped. Without a process group of several ranks, ``work`` simply runs here.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    outcome: tuple[str, Any] = ("ok", None)
    crash: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", work())
        except UserError as exc:
            outcome = ("error", str(exc))
        except OSError as exc:
            error = storage_error(exc)
            if error is None:
                crash, outcome = exc, ("error", f"global rank 0 stopped: {type(exc).__name__}: {exc}")
            else:
                outcome = ("error", str(error))
        except Exception as exc:  # noqa: BLE001 - named to the other ranks, re-raised here
            crash, outcome = exc, ("error", f"global rank 0 stopped: {type(exc).__name__}: {exc}")
    status, value = _broadcast_from_rank0(outcome)
    if crash is not None:
        raise crash
    if status == "error":
        raise UserError(value)
    return value


@contextlib.contextmanager
def rank0_lock(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``directory``'s :class:`~nemo_minitron.fsutil.DirectoryLock` for all the ranks of this job: global
    rank 0 takes it, so that a second job on the directory stops before any work while the ranks of this one
    do not refuse each other. The refusal is raised on every rank."""
    lock = DirectoryLock(directory, what)
    refused = None
    if global_rank() == 0:
        try:
            lock.__enter__()
        except UserError as exc:
            refused = str(exc)
    raise_rank0_error(refused)
    try:
        yield
    finally:
        lock.__exit__()
