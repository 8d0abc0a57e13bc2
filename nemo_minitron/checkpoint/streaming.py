"""Write safetensors checkpoints one tensor at a time.

``safetensors.torch.save_file`` and ``huggingface_hub.save_torch_state_dict`` take the whole state dict at once.
A safetensors file is a JSON header (name, dtype, shape and byte offsets of every tensor) followed by the
tensors' bytes, so when the shapes are known beforehand (they follow from the model's config) the header can be
written first and each tensor's bytes at its offset as the tensor arrives, in any order. :func:`save_streaming`
writes the same files as ``save_torch_state_dict`` (the same split into ``model-0000i-of-0000n.safetensors``
shards above 5 GB, the same index, byte for byte the same files) while holding one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from huggingface_hub import split_state_dict_into_shards_factory

# safetensors' names of the dtypes a checkpoint holds, in the order its writer sorts them (larger first).
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPE_ORDER = list(_DTYPES)
MAX_SHARD_SIZE = "5GB"  # huggingface_hub.save_torch_state_dict's default


class Spec(NamedTuple):
    """What a tensor of a file will be, before it exists."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsFile:
    """One safetensors file being written: the header at once, then :meth:`write` for each tensor in any order;
    :meth:`close` checks that every tensor was written. The file equals ``save_file`` of the same tensors."""

    def __init__(self, path: Path, specs: dict[str, Spec], metadata: dict[str, str]) -> None:
        order = sorted(specs, key=lambda name: (_DTYPE_ORDER.index(specs[name].dtype), name))
        header: dict = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in order:
            spec = specs[name]
            header[name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            self.offsets[name] = offset
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.specs, self.start, self.size = specs, 8 + len(text), offset
        self.written: set[str] = set()
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if (tuple(tensor.shape), tensor.dtype) != spec:
            raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} is not the announced {spec}")
        self.file.seek(self.start + self.offsets[name])
        # Raw bytes of any dtype (numpy has no bfloat16): a flat byte view of the contiguous tensor.
        self.file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        self.written.add(name)

    def close(self) -> None:
        self.file.close()
        missing = [name for name in self.specs if name not in self.written]
        if missing:
            raise ValueError(f"{missing[0]} was announced but never written")


def save_streaming(specs: dict[str, Spec], tensors: Iterable[tuple[str, torch.Tensor]], directory: Path,
                   max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """Write ``tensors`` (``(name, tensor)`` pairs, each name of ``specs`` once, in any order) into ``directory``
    as ``huggingface_hub.save_torch_state_dict`` does with the same tensors: ``model.safetensors``, or shards of at
    most ``max_shard_size`` (in ``specs``' order) with ``model.safetensors.index.json``."""
    split = split_state_dict_into_shards_factory(
        specs, get_storage_size=lambda spec: spec.nbytes, get_storage_id=lambda spec: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    metadata = {"format": "pt"}
    files = {name: SafetensorsFile(directory / name, {k: specs[k] for k in keys}, metadata)
             for name, keys in split.filename_to_tensors.items()}
    try:
        for name, tensor in tensors:
            files[split.tensor_to_filename[name]].write(name, tensor)
    finally:
        for file in files.values():
            file.file.close()
    for file in files.values():
        file.close()
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(directory / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2)
