"""Llama-family model architecture (config) and its megatron-core builder."""

from nemo_minitron.models.config import ModelConfig, RopeScaling

__all__ = ["ModelConfig", "RopeScaling"]
