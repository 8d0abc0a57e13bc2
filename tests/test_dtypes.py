"""``dtype: auto``: bfloat16 only where this machine computes it natively, float32 elsewhere."""

from pathlib import Path

import pytest
import torch

from nemo_minitron.distill.config import CacheLogitsConfig, TrainSettings
from nemo_minitron.dtypes import native_dtype, resolve, torch_dtype


def _cpu(monkeypatch, bf16_arithmetic: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_arithmetic)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("bf16_arithmetic, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cpu_follows_its_bf16_arithmetic(monkeypatch, bf16_arithmetic: bool, expected: str) -> None:
    _cpu(monkeypatch, bf16_arithmetic)
    assert native_dtype() == resolve("auto") == expected
    assert torch_dtype("auto") is getattr(torch, expected)
    assert (resolve("float32"), resolve("bfloat16")) == ("float32", "bfloat16")  # an explicit name wins


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch, bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not bf16)
    assert native_dtype() == expected


def test_auto_here_matches_the_cpu_flags() -> None:
    """On Linux x86 without CUDA: bfloat16 where the kernel lists bf16 dot products (AVX512_BF16 or AMX-BF16)."""
    cpuinfo = Path("/proc/cpuinfo")
    if torch.cuda.is_available() or not cpuinfo.is_file() or "avx2" not in cpuinfo.read_text():
        pytest.skip("an x86 Linux CPU without CUDA")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert native_dtype() == ("bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32")


def test_distillation_and_cache_default_to_auto() -> None:
    train = TrainSettings()
    cache = CacheLogitsConfig(teacher="t", data="d", output="o", windows=4)
    assert (train.dtype, train.teacher_dtype, cache.teacher_dtype, cache.dtype) == ("auto", "auto", "auto", "bfloat16")
