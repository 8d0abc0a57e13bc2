"""GPUs a cluster config names: memory per GPU and dense peak FLOP/s (plain data, no torch).

The table holds vendor datasheet figures: memory as the capacity the datasheet states (GB, 10^9 bytes) and the
dense (no sparsity) BF16 tensor-core peak of the SXM parts. A cluster config may set either number itself,
which then wins over the table.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from nemo_minitron.config import StrictModel

GB = 10**9
GiB = 2**30

# type -> (memory in GB, dense BF16 TFLOP/s)
GPU_TABLE: dict[str, tuple[float, float]] = {
    "A100-40GB": (40.0, 312.0),
    "A100-80GB": (80.0, 312.0),
    "H100-SXM": (80.0, 989.0),
    "H200-SXM": (141.0, 989.0),
}
GpuType = Literal["A100-40GB", "A100-80GB", "H100-SXM", "H200-SXM"]


class GpuSpec(StrictModel):
    """One GPU of a cluster's nodes: its type (from :data:`GPU_TABLE`) and/or its numbers."""

    type: Optional[GpuType] = Field(None, description="a known GPU: fills memory_gb and peak_tflops")
    memory_gb: Optional[float] = Field(None, gt=0, description="memory per GPU, GB (10^9 bytes)")
    peak_tflops: Optional[float] = Field(None, gt=0, description="dense BF16 peak per GPU, TFLOP/s")

    @model_validator(mode="after")
    def _complete(self) -> "GpuSpec":
        if self.type is None and (self.memory_gb is None or self.peak_tflops is None):
            raise ValueError("give type (one of " + ", ".join(GPU_TABLE) + ") or both memory_gb and peak_tflops")
        return self

    def memory_bytes(self) -> int:
        gb = self.memory_gb if self.memory_gb is not None else GPU_TABLE[self.type][0]
        return int(gb * GB)

    def peak_flops(self) -> float:
        tflops = self.peak_tflops if self.peak_tflops is not None else GPU_TABLE[self.type][1]
        return tflops * 1e12
