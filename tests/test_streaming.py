"""Checkpoints and exports written one tensor at a time: the same files as the libraries' whole-dict writers, and
no more memory on the writing rank than a few tensors, at TP=2 x PP=2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

from nemo_minitron.checkpoint import io
from nemo_minitron.checkpoint.streaming import SafetensorsFile, Spec, save_streaming
from nemo_minitron.parallel import state
from nemo_minitron.parallel.sharding import canonical_shapes, gather_canonical, held_keys


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"b.weight": (3, 5), "a.weight": (7,), "layers.10.w": (2, 2, 3), "layers.2.w": (4, 1)}
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_streamed_file_equals_safetensors_save_file_with_any_write_order(tmp_path):
    tensors = _tensors()
    tensors["c.half"] = torch.randn(3, 3).half()
    tensors["d.bf16"] = torch.randn(2, 5).bfloat16()
    tensors["e.double"] = torch.randn(4).double()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    out = SafetensorsFile(tmp_path / "got.safetensors", {k: Spec(tuple(v.shape), v.dtype) for k, v in tensors.items()},
                          {"format": "pt"})
    for name in reversed(list(tensors)):
        out.write(name, tensors[name])
    out.close()
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("max_shard_size", ["5GB", 100])
def test_streamed_checkpoints_equal_save_torch_state_dict_single_and_sharded(tmp_path, max_shard_size):
    tensors = _tensors(1)
    (tmp_path / "ref").mkdir()
    save_torch_state_dict(tensors, tmp_path / "ref", max_shard_size=max_shard_size)
    (tmp_path / "got").mkdir()
    save_streaming({k: Spec(tuple(v.shape), v.dtype) for k, v in tensors.items()}, reversed(list(tensors.items())),
                   tmp_path / "got", max_shard_size=max_shard_size)
    ref = _files(tmp_path / "ref")
    assert _files(tmp_path / "got") == ref
    assert ("model.safetensors.index.json" in ref) == (max_shard_size == 100)


def test_a_tensor_never_written_is_an_error(tmp_path):
    out = SafetensorsFile(tmp_path / "x.safetensors", {"a": Spec((2,), torch.float32)}, {"format": "pt"})
    with pytest.raises(ValueError, match="never written"):
        out.close()


def test_canonical_order_is_the_state_dict_order_of_one_rank(tiny_hf_dirs, single_rank):
    for name in ("untied", "tied"):
        loaded = io.load_model(str(tiny_hf_dirs[name]))
        shapes = canonical_shapes(loaded.cfg)
        assert held_keys(loaded.model) == list(shapes)
        full = gather_canonical(loaded.model, loaded.cfg)
        assert {k: tuple(v.shape) for k, v in full.items()} == shapes


def test_a_checkpoint_keeps_each_tensors_own_dtype(tiny_hf_dirs, single_rank, tmp_path):
    """A 16-bit model whose norm weights stay fp32 (as megatron's local spec keeps them in training) is saved with
    each tensor in its own dtype, as the whole-dict writer did."""
    loaded = io.load_model(str(tiny_hf_dirs["untied"]), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.data = param.data.float()
    io.save_checkpoint(loaded, tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    expected = gather_canonical(loaded.model, loaded.cfg)
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in expected.items()}
    assert {v.dtype for v in saved.values()} == {torch.bfloat16, torch.float32}
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def _export_memory_on_ranks(src: str, out: str) -> dict | None:
    from memory import peak_allocated

    state.initialize(state.ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    loaded = io.load_model(src)
    peaks = {}
    with peak_allocated() as peak:
        io.save_checkpoint(loaded, Path(out) / "ckpt")
    peaks["checkpoint"] = peak.bytes
    with peak_allocated() as peak:
        io.export_hf(loaded, Path(out) / "hf", dtype=torch.bfloat16)
    peaks["hf"] = peak.bytes
    full = gather_canonical(loaded.model, loaded.cfg)
    if full is None:
        return None
    sizes = [v.numel() * 4 for v in full.values()]
    return {"peaks": peaks, "largest": max(sizes), "model": sum(sizes),
            "canonical": {k: v.numpy() for k, v in full.items()}}


def test_tp2_pp2_saves_and_exports_hold_a_few_tensors_on_the_writer(tmp_path):
    """Rank 0 receives one tensor at a time from its owners and writes it at its offset: its peak is a few of the
    largest tensor (its parts, the joined tensor, converted copies, the previous one not yet freed), far below
    the model that a gather gives it. The files hold the model's tensors: the checkpoint as they are, the HF
    export in bf16. (GGUF streams the same way; with its tokenizer's 49,152-token embeddings a tiny model is
    mostly one tensor, so it is not measured here.)"""
    from tiny import write_tiny_hf

    src = write_tiny_hf(tmp_path / "twelve", hidden_size=128, intermediate_size=256, num_hidden_layers=12, seed=6)
    got = state.spawn(_export_memory_on_ranks, 4, str(src), str(tmp_path))[0]
    assert got["model"] > 25 * got["largest"]  # a small model, but one of many tensors
    for kind, peak in got["peaks"].items():
        assert peak <= 6 * got["largest"], (kind, peak, got["largest"])
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert stored.keys() == got["canonical"].keys()
    for key, value in got["canonical"].items():
        np.testing.assert_array_equal(stored[key].numpy(), value, err_msg=key)
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    assert {v.dtype for v in hf.values()} == {torch.bfloat16}
    embed = torch.from_numpy(got["canonical"]["embedding.word_embeddings.weight"]).bfloat16()
    assert torch.equal(hf["model.embed_tokens.weight"], embed)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 12
