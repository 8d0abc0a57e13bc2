"""Bad inputs, one table: configs, data and checkpoints that cannot work. Each must stop with one line naming
the problem on stderr, exit status 2, before any compute (no process group, no model built), and leave no
output behind (a resumed run directory is left exactly as it was)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch.distributed as dist

from conftest import destroy_state

from .reliability_helpers import distill_args

# ------------------------------------------------------------------------------------------ broken inputs


def copy_model(models: dict[str, Path], name: str, tmp: Path, config: dict | None = None) -> Path:
    """A copy of model ``name`` in ``tmp``, with ``config`` merged into its config.json."""
    dst = shutil.copytree(models[name], tmp / f"{name}_copy")
    if config:
        path = dst / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


def truncated(models: dict[str, Path], tmp: Path, name: str = "student") -> Path:
    dst = copy_model(models, name, tmp)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def not_safetensors(models: dict[str, Path], tmp: Path) -> Path:
    dst = copy_model(models, "student", tmp)
    (dst / "model.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    return dst


def resharded(models: dict[str, Path], tmp: Path, drop_shard: bool = False, drop_tensor: str = "") -> Path:
    """The student split into two safetensors shards with an index; optionally one shard or one tensor gone."""
    from safetensors.torch import load_file, save_file

    dst = copy_model(models, "student", tmp)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    tensors.pop(drop_tensor, None)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), 1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if drop_shard:
        (dst / "model-00002-of-00002.safetensors").unlink()
    return dst


def text_file(tmp: Path, content: bytes, name: str = "doc.txt") -> Path:
    folder = tmp / "corpus"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(content)
    (folder / "other.txt").write_text("Another document, long enough to count.", encoding="utf-8")
    return folder


def finished_checkpoint(tmp: Path, **meta_changes) -> Path:
    """A run directory whose newest checkpoint was written with ``meta_changes`` to this run's meta."""
    out = tmp / "out"
    step = out / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    meta = {"global_batch_size": 4, "seq_length": 16, "step": 2, **meta_changes}
    (step / "meta.json").write_text(json.dumps(meta))
    return out


def a_file(path: Path) -> Path:
    path.write_text("a regular file")
    return path


def a_file_in(folder: Path, name: str) -> Path:
    folder.mkdir()
    a_file(folder / name)
    return folder


def student_meta(models: dict[str, Path], **changes) -> dict:
    from nemo_minitron.checkpoint.io import read_model_config

    return {**read_model_config(models["student"]).model_dump(), **changes}


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    id: str
    # (fixture models, this case's empty folder) -> the command line; the output is always <folder>/out.
    args: Callable[[dict[str, Path], Path], list[str]]
    message: str
    output_exists_before: bool = False


def distill(**changes) -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda m, tmp: distill_args(m, tmp / "out", **changes)


def distill_with(**makers: Callable[[dict[str, Path], Path], object]) -> Callable[[dict[str, Path], Path], list[str]]:
    """``distill`` with keys whose values are made by ``maker(models, tmp)``."""
    return lambda m, tmp: distill_args(m, tmp / "out", **{k: make(m, tmp) for k, make in makers.items()})


def prune(*overrides: str) -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda m, tmp: ["prune", f"model={m['student']}", f"output={tmp / 'out'}",
                           f"calibration.data={m['data']}", "calibration.seq_length=16", *overrides]


def prepare(content: bytes, name: str = "doc.txt") -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda m, tmp: ["prepare-data", f"input={text_file(tmp, content, name)}", f"tokenizer={m['teacher']}",
                           f"output_dir={tmp / 'out'}"]


CASES = [
    # ---- configs
    Case("unknown_key", distill(**{"train.max_stepz": 3}), "train.max_stepz: unknown key"),
    Case("target_key", distill(**{"loss._target_": "os.system"}),
         "loss._target_: unknown key (configs never name a class or function to instantiate)"),
    Case("wrong_type_int", distill(**{"train.max_steps": "many"}),
         "train.max_steps: Input should be a valid integer"),
    Case("wrong_type_bool", distill(**{"log.progress": "sometimes"}), "log.progress: Input should be a valid boolean"),
    Case("nan_learning_rate", distill(**{"optim.lr": "nan"}), "optim.lr: Input should be a finite number"),
    Case("zero_micro_batch", distill(**{"train.micro_batch_size": 0}),
         "train.micro_batch_size: Input should be greater than 0"),
    Case("negative_ffn_target", prune("target.ffn_hidden_size=-64"),
         "target.ffn_hidden_size: Input should be greater than 0"),
    Case("heads_not_divisible_by_groups", prune("target.num_attention_heads=3"),
         "target.num_attention_heads 3 is not divisible by target.num_query_groups 2"),
    Case("groups_not_divisible_by_tp", distill(**{"parallel.tensor_model_parallel_size": 4}),
         "num_query_groups 2 is not divisible by tensor_model_parallel_size 4"),
    Case("layers_not_divisible_by_pp", distill(**{"parallel.pipeline_model_parallel_size": 3}),
         "num_layers 4 is not divisible by pipeline_model_parallel_size 3"),
    Case("prune_target_larger_than_source", prune("target.hidden_size=128"),
         "target.hidden_size 128 is larger than the source's 32"),
    Case("empty_drop_layers", prune("target.drop_layers=[]"),
         "target.drop_layers: Value error, must name at least one layer"),
    Case("drop_layer_out_of_range", prune("target.drop_layers=[7]"), "target.drop_layers: layer 7 does not exist"),
    Case("batch_not_divisible", distill(**{"train.global_batch_size": 5}),
         "global_batch_size 5 is not divisible by micro_batch_size 2"),
    Case("min_lr_above_lr", distill(**{"optim.min_lr": 1.0}), "min_lr 1.0 is larger than lr 0.003"),
    Case("missing_config_file", lambda m, tmp: ["distill", str(tmp / "no_such.yaml"), f"output={tmp / 'out'}"],
         "config file not found"),
    Case("missing_student", distill(student="/nonexistent/student"), "model directory not found: /nonexistent/student"),
    Case("output_under_a_file", lambda m, tmp: distill_args(m, a_file(tmp / "out") / "run"),
         "is not a directory", output_exists_before=True),
    Case("checkpoints_folder_is_a_file", lambda m, tmp: distill_args(m, a_file_in(tmp / "out", "checkpoints")),
         "checkpoints exists and is not a directory", output_exists_before=True),
    # ---- data
    Case("empty_text", prepare(b"  \n\n"), "file is empty"),
    Case("binary_text", prepare(b"PK\x03\x04\x00\x00binary"), "binary file (NUL byte at byte offset 4)"),
    Case("non_utf8_text", prepare("caf\u00e9".encode("latin-1")), "not valid UTF-8 (byte offset 3)"),
    Case("broken_jsonl", prepare(b'{"text": "fine"}\n{"text": \n', "doc.jsonl"), "doc.jsonl:2: not valid JSON"),
    Case("data_shorter_than_a_sequence", distill(**{"train.seq_length": 100000}),
         "fewer than one sequence of train.seq_length + 1 = 100001"),
    Case("eval_text_shorter_than_a_window",
         lambda m, tmp: ["eval", f"model={m['student']}", f"data={text_file(tmp, b'Too short.') / 'doc.txt'}",
                         "seq_length=512", f"output={tmp / 'out'}"],
         "tokens, not enough for one eval window of 512"),
    Case("data_not_prepared", distill_with(data=lambda m, tmp: text_file(tmp, b"raw text")),
         "is not a prepared dataset (run prepare-data first)"),
    # ---- checkpoints
    Case("truncated_safetensors", distill_with(student=truncated), "model.safetensors: truncated"),
    Case("not_safetensors", distill_with(student=not_safetensors), "model.safetensors: not a safetensors file"),
    Case("missing_shard", distill_with(student=lambda m, tmp: resharded(m, tmp, drop_shard=True)),
         "shard 'model-00002-of-00002.safetensors' is missing"),
    Case("missing_tensor", distill_with(student=lambda m, tmp: resharded(m, tmp, drop_tensor="model.norm.weight")),
         "tensor 'model.norm.weight' is missing"),
    Case("weights_of_another_architecture",
         distill_with(student=lambda m, tmp: copy_model(m, "student", tmp, {"intermediate_size": 48})),
         "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], the config's architecture needs [48, 32]"),
    Case("unsupported_architecture",
         distill_with(teacher=lambda m, tmp: copy_model(m, "teacher", tmp, {"model_type": "gpt2"})),
         "unsupported model_type 'gpt2'"),
    Case("truncated_teacher", distill_with(teacher=lambda m, tmp: truncated(m, tmp, "teacher")),
         "teacher: ", ),
    Case("teacher_not_divisible_by_student_tp",
         distill_with(teacher=lambda m, tmp: copy_model(m, "teacher", tmp, {"num_key_value_heads": 1}),
                      **{"parallel.tensor_model_parallel_size": lambda m, tmp: 2}),
         "teacher: num_query_groups 1 is not divisible by tensor_model_parallel_size 2"),
    # (Another parallel layout is no error: checkpoints reshard.)
    Case("resume_with_another_batch", lambda m, tmp: distill_args(
        m, finished_checkpoint(tmp, global_batch_size=8, student=student_meta(m))),
         "global_batch_size is 8 in the checkpoint, 4 in this run", output_exists_before=True),
    Case("resume_another_student", lambda m, tmp: distill_args(
        m, finished_checkpoint(tmp, student=student_meta(m, hidden_size=48))),
         "student.hidden_size is 48 in the checkpoint, 32 in this run", output_exists_before=True),
]


def snapshot(path: Path) -> object:
    """Every file under ``path`` with its content (the content when ``path`` is a file; None when absent)."""
    if path.is_file():
        return path.read_bytes()
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_stops_before_compute_with_one_line_and_exit_2(case: Case, models, tmp_path, capsys):
    from nemo_minitron.cli import main

    args = case.args(models, tmp_path)
    out = tmp_path / "out"
    assert out.exists() == case.output_exists_before
    before = snapshot(out)
    capsys.readouterr()
    try:
        status = main(args)
        started = dist.is_initialized()
    finally:
        destroy_state()

    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"nemo-minitron {args[0]}: error: ") and case.message in err, err
    assert not started  # no process group, hence no model: it stopped before any compute
    assert snapshot(out) == before  # absent, or left exactly as it was


def test_the_table_covers_configs_data_and_checkpoints():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
