"""The parallel layout a stage config asks for (no process groups here: see :mod:`nemo_minitron.parallel.state`)."""

from __future__ import annotations

from pydantic import Field

from nemo_minitron.config import StrictModel


class ParallelConfig(StrictModel):
    """Model-parallel sizes; data parallelism takes the remaining ranks (world / (TP * PP))."""

    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size
