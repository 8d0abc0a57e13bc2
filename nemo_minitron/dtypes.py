"""The precisions a config may name, in one place.

Configs import the names only; :func:`torch_dtype` turns one into a torch dtype where a model is built, so
reading a config never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

# Compute precision of a model's weights and activations.
Dtype = Literal["float32", "bfloat16"]
# Transformer Engine's FP8 recipes: hybrid = E4M3 forward and E5M2 gradients; e4m3 = E4M3 both ways.
Fp8 = Literal["hybrid", "e4m3"]


def torch_dtype(name: str) -> "torch.dtype":
    """``"bfloat16"`` -> ``torch.bfloat16`` (any floating dtype torch names, e.g. ``"float16"`` for exports)."""
    import torch  # here, not at the top: configs import this module and stay free of torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {name!r}")
    return dtype


DTYPE_NAMES: tuple[str, ...] = get_args(Dtype)
