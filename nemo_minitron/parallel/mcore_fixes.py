"""Fixes to megatron-core 0.16.1 and torch's distributed checkpoint on the paths this project uses, on every
device. Applied once, by :func:`apply`, before an engine or a training checkpoint is used.

1. The distributed optimizer's ``fully_reshardable`` checkpoint format (the one that reshards over TP, PP and DP)
   gathers each bucket's optimizer state into one flat tensor, bucket after bucket without the padding that ends
   every bucket, and then cuts each parameter's state out of it at the parameter's offset in the *padded* buffer:
   with more than one bucket, every parameter after the first bucket gets its neighbour's state (megatron logs
   "param range exceeds unpadded buffer ... data corruption"). The fix lays the gathered tensors out as the
   padded buffer is, so that the offsets are right.
2. Without Transformer Engine or apex megatron steps torch's ``AdamW``, whose state holds a per-parameter
   ``step``; loading that format copies every state tensor of a parameter from the checkpoint, which has no
   ``step`` (megatron restores it from the parameter groups), and fails with ``KeyError: 'step'``. The fix copies
   the tensors the checkpoint has. That loading also gives every parameter's state one shared ``step`` tensor,
   which torch's AdamW increments in place once per parameter: each parameter gets its own copy.
3. megatron writes a checkpoint's files from processes it forks for the purpose, one per file. A process forked
   from one that runs threads (gloo's, OpenMP's) can deadlock on a lock another thread held, and a writer
   outlives a training process killed mid-save, holding its output open, as does the process megatron spawns to
   serve the queue of their results. The files are written by the training process itself instead, one after the
   other (each rank writes its own share of the checkpoint either way), and the results pass through a queue of
   this process.
4. Untrusted checkpoints run no code. torch's checkpoint reader unpickles the ``.metadata`` file with plain
   ``pickle.load`` and reads byte items (megatron's ``ShardedObject``, e.g. a layer's ``_extra_state``) with
   ``torch.load(weights_only=False)``: the metadata is read with an unpickler that builds only the checkpoint
   metadata classes, and byte items with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
import queue

import torch

_APPLIED = False

# The classes a torch.distributed.checkpoint ``.metadata`` file is made of, by module.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class CheckpointMetadataUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's ``.metadata``: its dataclasses, torch sizes, dtypes and layouts, nothing else."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused: the checkpoint metadata names {module}.{name}")


def read_checkpoint_metadata(stream):
    return CheckpointMetadataUnpickler(stream).load()


class _WriteRecorder:
    """A file opened for writing that remembers the OSError of a failed write (the last one, class-wide)."""

    error: OSError | None = None

    def __init__(self, file) -> None:
        self.file = file

    @classmethod
    def open(cls, path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return cls(file) if "w" in mode else file

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            _WriteRecorder.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()


def take_write_error() -> OSError | None:
    """The OSError of the last failed checkpoint write since the previous call (megatron reports it as a
    RuntimeError with the error's text only)."""
    error, _WriteRecorder.error = _WriteRecorder.error, None
    return error


def _padded_world_tensors(optimizer, state: dict) -> dict:
    """Fix 1: each buffer's gathered state, laid out as the padded buffer (zeros in the padding)."""
    for gbuf_idx, per_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue
        buffer = optimizer.buffers[gbuf_idx]
        for dtype, world in per_dtype.items():
            if not world:  # None, or {} on ranks that got nothing
                continue
            padded = {}
            for key, flat in world.items():
                if not torch.is_tensor(flat):
                    padded[key] = flat
                    continue
                out = torch.zeros(buffer.numel, dtype=flat.dtype, device=flat.device)
                start = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    out[bucket.offset : bucket.offset + n] = flat[start : start + n]
                    start += n
                padded[key] = out
            per_dtype[dtype] = padded
    return state


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from torch.distributed.checkpoint import default_planner, filesystem

    gather = DistributedOptimizer.get_parameter_state_dp_zero

    def get_parameter_state_dp_zero(self, *args, **kwargs):
        state = gather(self, *args, **kwargs)
        return None if state is None else _padded_world_tensors(self, state)

    DistributedOptimizer.get_parameter_state_dp_zero = get_parameter_state_dp_zero

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            destinations[key].copy_(value)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states

    load_state_dict = DistributedOptimizer.load_state_dict

    def load_state_dict_unshared_steps(self, state_dict):
        load_state_dict(self, state_dict)
        for per_param in self.optimizer.state.values():
            if torch.is_tensor(per_param.get("step")):
                per_param["step"] = per_param["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict_unshared_steps

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    def write_in_this_process(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
        results: queue.Queue = queue.Queue()
        counts: queue.Queue = queue.Queue()
        written: dict | Exception = {}
        for index, bucket in enumerate(write_buckets):
            counts.put(index)
            _WriteRecorder.error = None
            FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, results, counts,
                                                       use_fsync=True, use_msc=use_msc)
            index, result = results.get()
            if isinstance(result, Exception):
                # torch's serializer reports a failed write (a full disk) only as "unexpected pos": the
                # operating system's error, as the file saw it, says what happened.
                written = _WriteRecorder.error or result
                break
            written[index] = result
        global_results_queue.put(written)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_in_this_process)
    filesystem_async.open = _WriteRecorder.open
    # The writers' results then need no queue between processes: megatron's is served by a process it spawns,
    # which would outlive a killed training process too.
    writes_queue: queue.Queue = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: writes_queue

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_checkpoint_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    filesystem.FileSystemReader.read_metadata = read_metadata

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        loaded = torch.load(value, weights_only=True, map_location="cpu")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    default_planner.DefaultLoadPlanner.load_bytes = load_bytes
    _APPLIED = True
