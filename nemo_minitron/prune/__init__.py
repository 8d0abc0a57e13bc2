"""Minitron structured pruning: importance estimation, then width (heads, query groups, MLP neurons,
embedding channels) and depth (layers) pruning."""

from typing import Any

from nemo_minitron.prune.config import CalibrationConfig, ImportanceConfig, PruneConfig, PruneTarget

__all__ = ["CalibrationConfig", "ImportanceConfig", "PruneConfig", "PruneTarget", "prune", "run_prune"]


def __getattr__(name: str) -> Any:
    # The functions bring torch and megatron: imported on first use, so that reading a config does not.
    if name in ("prune", "run_prune"):
        from nemo_minitron.prune import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
