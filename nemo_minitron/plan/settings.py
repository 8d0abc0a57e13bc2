"""What a plan assumes beyond the job and the cluster: the ``plan.*`` keys of ``plan`` and ``launch slurm``
(plain data: no torch, no launcher)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field

from nemo_minitron.config import StrictModel
from nemo_minitron.models.config import ModelConfig

# Which model of a job's config an architecture key names: distill's teacher and student, prune's and eval's
# model, run's teacher (its students are the teacher pruned).
Role = Literal["teacher", "student", "model"]


class PlanSettings(StrictModel):
    mfu: float = Field(0.4, gt=0, le=1, description="model FLOPs utilisation: tokens/s = mfu x peak x GPUs / "
                                                    "model FLOPs per token")
    workspace_gb: float = Field(4.0, ge=0, description="per GPU, for the CUDA context, NCCL and cuBLAS buffers "
                                                       "and allocator fragmentation (GB; an allowance, not measured)")
    architecture: dict[Role, Union[str, ModelConfig]] = Field(
        default_factory=dict,
        description="the architecture of the job's teacher / student / model: a known name (llama-3.1-8b, ...) or "
                    "a model config; wins over the model's directory, which then need not be on this machine")
    format: Literal["table", "json"] = Field("table", description="what the plan stage prints")
    output: Optional[str] = Field(None, min_length=1, description="also write the plan as JSON to this file")
