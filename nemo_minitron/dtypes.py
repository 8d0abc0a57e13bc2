"""The precisions a config may name, in one place.

Configs import the names only; :func:`torch_dtype` turns one into a torch dtype where a model is built, so
reading a config never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

# Compute precision of a model's weights and activations. "auto": bfloat16 where this machine has bf16 arithmetic
# (a CUDA GPU from Ampere on; an x86 CPU with AVX512_BF16 or AMX), float32 elsewhere: other CPUs convert bf16 to
# float32 around every product, at a fraction of their float32 rate (docs/distillation.md measures it).
Dtype = Literal["auto", "float32", "bfloat16"]
# Transformer Engine's FP8 recipes: hybrid = E4M3 forward and E5M2 gradients; e4m3 = E4M3 both ways.
Fp8 = Literal["hybrid", "e4m3"]


def native_dtype() -> Literal["float32", "bfloat16"]:
    """What ``"auto"`` means on this machine (see :data:`Dtype`)."""
    import torch  # here, not at the top: configs import this module and stay free of torch

    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported()
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def resolve(name: str) -> str:
    """``name`` with ``"auto"`` replaced by this machine's :func:`native_dtype`."""
    return native_dtype() if name == "auto" else name


def torch_dtype(name: str) -> "torch.dtype":
    """``"bfloat16"`` -> ``torch.bfloat16`` (any floating dtype torch names, e.g. ``"float16"`` for exports;
    ``"auto"`` as :func:`resolve` reads it)."""
    import torch

    dtype = getattr(torch, resolve(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {name!r}")
    return dtype


DTYPE_NAMES: tuple[str, ...] = get_args(Dtype)
