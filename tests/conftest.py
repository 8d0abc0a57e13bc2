"""Shared fixtures: tiny Hugging Face checkpoints and clean-up of in-process megatron state.

Set at import, before torch is imported by any test module: spawned gloo ranks inherit the environment,
and one OpenMP thread per process keeps several ranks on a few cores from thrashing.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Launcher variables. Left behind by a test, they would make a later `nemo-minitron` subprocess (or
# run_stage in this process) believe it runs under torchrun and skip spawning its ranks.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# name -> keyword arguments of tests/tiny.py's write_tiny_hf
TINY_MODELS = {
    # 4 query heads in 2 KV groups: GQA with untied input / output embeddings.
    "untied": dict(tied=False, seed=1),
    "tied": dict(tied=True, seed=2),
    # Llama-3.1 RoPE scaling with original_max_position_embeddings=64.
    "rope": dict(rope_scaling=True, seed=3),
    "mistral": dict(model_type="mistral", seed=4),
    # Tied, with a vocabulary (250) that megatron pads (to 256 rows, 2 x 128 at TP=2): padding masks.
    "padded": dict(tied=True, vocab_size=250, seed=5),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs longer than a minute (make test-all)")
    config.addinivalue_line("markers", "llamacpp: reads exports with llama.cpp (make test-gguf)")
    config.addinivalue_line("markers", "modelopt: compares with NVIDIA ModelOpt's pruning (make test-modelopt)")


def clean_dist_env() -> None:
    for name in DIST_ENV:
        os.environ.pop(name, None)


def destroy_state() -> None:
    """Tear down megatron's groups and the default process group of this process, and their env vars."""
    from nemo_minitron.parallel import state

    state.destroy()
    clean_dist_env()


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random HF checkpoints (written by transformers itself), by the names of TINY_MODELS."""
    from tiny import write_tiny_hf

    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: write_tiny_hf(root / name, **kw) for name, kw in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def gguf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints with the teacher's tokenizer for the GGUF export tests, by tests/exports.py's names."""
    from exports import write_gguf_checkpoints

    return write_gguf_checkpoints(tmp_path_factory.mktemp("gguf_models"))


@pytest.fixture()
def single_rank():
    """megatron initialized in this process at TP=PP=1; destroyed (with its env vars) afterwards."""
    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig())
    try:
        yield
    finally:
        destroy_state()


@pytest.fixture()
def destroy_after():
    """For tests that call ``state.initialize`` themselves: destroy whatever they set up."""
    try:
        yield
    finally:
        destroy_state()
