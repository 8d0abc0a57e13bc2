"""Configs of the ``prune`` stage and of every pruning that ``run``, ``nas`` and ``bench`` start (plain data: no
torch, no megatron)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from nemo_minitron.config import StrictModel
from nemo_minitron.data.config import DataSource
from nemo_minitron.dtypes import Dtype
from nemo_minitron.parallel.config import ParallelConfig

# How activations are aggregated over the sequence and over the batch (Minitron: mean, then L2).
Agg = Literal["mean", "l2", "var"]
# Weight correction after the cut (nemo_minitron.prune.correction).
Correction = Literal["none", "lsq"]
WIDTH_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
# Models above this many parameters run their importance passes in bfloat16 unless a dtype is given: the hooks
# take their statistics in float32 / float64 either way, and at billions of parameters fp32 weights only double the
# memory (32 GB instead of 16 for Llama-3.1-8B) and the time of the passes.
BF16_ABOVE_PARAMS = 1_000_000_000
IMPORTANCE_DTYPE = ("precision of the importance passes; default: float32 up to 1B parameters, bfloat16 above "
                    "(an explicit value wins)")


def importance_dtype(dtype: Optional[Dtype], num_params: int) -> Dtype:
    """The precision of the importance passes over a model of ``num_params`` parameters: ``dtype`` when given,
    else float32 up to :data:`BF16_ABOVE_PARAMS` and bfloat16 above."""
    if dtype is not None:
        return dtype
    return "bfloat16" if num_params > BF16_ABOVE_PARAMS else "float32"


class PruneTarget(StrictModel):
    """Target sizes; anything left out keeps the source's value."""

    hidden_size: Optional[int] = Field(None, gt=0)
    ffn_hidden_size: Optional[int] = Field(None, gt=0)
    num_attention_heads: Optional[int] = Field(None, gt=0)
    num_query_groups: Optional[int] = Field(None, gt=0)
    num_layers: Optional[int] = Field(None, gt=0)
    drop_layers: Optional[list[int]] = Field(None, description="explicit global layer indices to remove")

    @field_validator("drop_layers")
    @classmethod
    def _drop_layers(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one layer (or leave it out)")
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("must be distinct non-negative layer indices")
        return sorted(value)

    @model_validator(mode="after")
    def _something(self) -> "PruneTarget":
        if all(getattr(self, k) is None for k in (*WIDTH_KEYS, "num_layers", "drop_layers")):
            raise ValueError("give at least one target size or drop_layers")
        return self


class CalibrationConfig(StrictModel):
    """Forward-only calibration samples from the train split of a prepared dataset."""

    data: DataSource = Field(description="prepared dataset directory (prepare-data), or a weighted blend of several: "
                                         "[{weight, path}, ...]")
    num_samples: int = Field(1024, gt=0)
    seq_length: int = Field(512, ge=2)
    micro_batch_size: int = Field(4, gt=0)
    seed: int = 1234
    # Left out of dumps: how a run looks on the terminal is no part of what it computes, and a run's
    # pipeline.json digests of its finished prune stages stay valid.
    progress: bool = Field(True, exclude=True,
                           description="progress bars with an ETA over the passes on the calibration set "
                                       "(rank 0, stderr)")


class ImportanceConfig(StrictModel):
    criterion: Literal["activation", "magnitude", "random"] = "activation"
    seq_agg: Agg = "mean"
    batch_agg: Agg = "l2"
    depth: Literal["block_importance", "drop_one", "contiguous"] = "block_importance"
    seed: int = 1234


class PruneConfig(StrictModel):
    model: str = Field(min_length=1, description="model directory or embedded:...")
    output: str = Field(min_length=1)
    target: PruneTarget
    calibration: CalibrationConfig
    importance: ImportanceConfig = ImportanceConfig()
    dtype: Optional[Dtype] = Field(None, description=IMPORTANCE_DTYPE)
    overwrite: bool = False
    pruned_loss: bool = Field(True, description="report the pruned model's calibration loss "
                                                "(one more forward pass over the calibration set)")
    correction: Correction = Field(
        "none", description="lsq: after the cut, re-fit linear_fc2 over the kept MLP neurons, linear_proj over the "
                            "kept heads and linear_qkv / linear_fc1 over the kept hidden channels by ridge least "
                            "squares on the calibration activations, and rescale the RMS norms by "
                            "sqrt(f hidden / kept hidden), f the kept channels' share of each norm's input energy")
    correction_damping: float = Field(
        0.01, gt=0, description="lsq ridge strength, as a fraction of the mean diagonal of the input Gram matrix; "
                                "the ridge pulls toward the plainly sliced weights")
    parallel: ParallelConfig = ParallelConfig()
    seed: int = 1234
