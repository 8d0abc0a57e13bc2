"""Minitron structured pruning: importance estimation, then width (heads, query groups, MLP neurons,
embedding channels) and depth (layers) pruning."""

from nemo_minitron.prune.stage import CalibrationConfig, ImportanceConfig, PruneConfig, PruneTarget, prune, run_prune

__all__ = ["CalibrationConfig", "ImportanceConfig", "PruneConfig", "PruneTarget", "prune", "run_prune"]
