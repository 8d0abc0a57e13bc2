"""Weights that hold NaN or inf: every load of them (eval, prune, distill, import-hf) stops with one line naming
the tensor and exit status 2, instead of reporting a NaN loss (which is not even valid JSON) as a result."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from nemo_minitron.checkpoint import io
from nemo_minitron.errors import UserError

from .reliability_helpers import main_in_process


def poisoned(src: Path, dst: Path, tensor: str) -> Path:
    """A copy of the model directory ``src`` in which 12 values of ``tensor`` are NaN or inf."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    flat = tensors[tensor].view(-1)
    flat[:4], flat[4:8], flat[8:12] = math.nan, math.inf, -math.inf
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def message(model: Path, tensor: str) -> str:
    return f"{model / 'model.safetensors'}: tensor '{tensor}' holds 12 non-finite values (NaN or inf)"


@pytest.mark.parametrize("layout, pp", [("hf", 1), ("native", 2)])
def test_eval_of_non_finite_weights_is_one_line_and_exit_2(models, tmp_path, capsys, layout, pp):
    """At PP=2 only the second stage reads layer 3: the first stage must stop too, with the same line."""
    source = models["teacher"]
    tensor = "model.layers.3.mlp.up_proj.weight"
    if layout == "native":
        assert main_in_process(["import-hf", f"source={source}", f"output={tmp_path / 'native'}"]) == 0
        source, tensor = tmp_path / "native", "decoder.layers.3.mlp.linear_fc1.weight"
    model = poisoned(source, tmp_path / "poisoned", tensor)
    capsys.readouterr()
    args = ["eval", f"model={model}", f"data={models['data']}", "seq_length=16", "max_windows=4",
            f"parallel.pipeline_model_parallel_size={pp}"]
    assert main_in_process(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [f"nemo-minitron eval: error: {message(model, tensor)}"]


def test_load_model_refuses_non_finite_weights(models, tmp_path, single_rank):
    """prune, distill and nas load their models through load_model."""
    tensor = "model.layers.0.self_attn.q_proj.weight"
    model = poisoned(models["student"], tmp_path / "poisoned", tensor)
    with pytest.raises(UserError) as caught:
        io.load_model(str(model))
    assert str(caught.value) == message(model, tensor)


def test_import_hf_refuses_non_finite_weights(models, tmp_path, capsys):
    tensor = "model.embed_tokens.weight"
    model = poisoned(models["student"], tmp_path / "poisoned", tensor)
    capsys.readouterr()
    assert main_in_process(["import-hf", f"source={model}", f"output={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"nemo-minitron import-hf: error: {message(model, tensor)}"]
    assert not (tmp_path / "out").exists()
