"""The command line as a user runs it: shipped configs, one-line errors with exit 2, and a real
end-to-end evaluation of the embedded teacher checked against transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_minitron.cli import main
from nemo_minitron.config import load_config
from nemo_minitron.errors import UserError
from nemo_minitron.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
# conf/cluster holds the cluster configs of `launch` (tests/test_launch.py validates them), not a stage's config.
CONFIGS = sorted(p for p in (ROOT / "conf").glob("*/*.yaml") if p.parent.name != "cluster")


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nemo_minitron.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates(path: Path) -> None:
    stage = path.parent.name.replace("_", "-")
    assert stage in STAGES, f"conf/{path.parent.name} does not name a stage"
    load_config(STAGES[stage].config_class(), path)


# A blend in a stage config: Megatron's `--data-path 0.7 A 0.3 B`, written as a list of {weight, path}.
BLEND_YAML = """
  - weight: 0.7
    path: runs/data/shakespeare-smollm2
  - weight: 0.3
    path: runs/data/other-smollm2"""


@pytest.mark.parametrize("config, key", [("distill/smollm2_width_55.yaml", "data"), ("nas/smollm2_55.yaml", "data"),
                                         ("prune/smollm2_width_55.yaml", "calibration.data"),
                                         ("eval/teacher.yaml", "data")])
def test_blend_config_validates(tmp_path: Path, config: str, key: str) -> None:
    from nemo_minitron.data import blend_weights

    text = (ROOT / "conf" / config).read_text()
    single = "  data: runs/data/shakespeare-smollm2" if "." in key else "data: runs/data/shakespeare-smollm2"
    assert single + "\n" in text
    path = tmp_path / Path(config).name
    path.write_text(text.replace(single, single.split("runs/")[0].rstrip() + BLEND_YAML.replace(
        "\n  ", "\n    " if "." in key else "\n  ")))
    stage = STAGES[Path(config).parent.name]
    cfg = load_config(stage.config_class(), path)
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert blend_weights(value) == [("runs/data/shakespeare-smollm2", 0.7), ("runs/data/other-smollm2", 0.3)]
    # The shipped single path keeps its plain form.
    plain = load_config(stage.config_class(), ROOT / "conf" / config).model_dump(mode="json")
    for part in key.split("."):
        plain = plain[part]
    assert plain == "runs/data/shakespeare-smollm2"


def test_every_stage_has_a_shipped_config() -> None:
    shipped = {p.parent.name.replace("_", "-") for p in CONFIGS}
    # launch and plan take another stage's config (and a cluster's).
    assert {name for name, stage in STAGES.items() if stage.parser is None} <= shipped
    assert {name for name, stage in STAGES.items() if stage.parser is not None} == {"launch", "plan"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "conf/eval/teacher.yaml", "max_windowz=3"], "max_windowz: unknown key"),
        (["eval", "conf/eval/teacher.yaml", "seq_length=abc"], "seq_length: Input should be a valid integer"),
        (["eval", "conf/eval/teacher.yaml", "seq_length=1"], "seq_length: Input should be greater than or equal to 2"),
        (["eval", "conf/eval/teacher.yaml", "parallel.tensor_model_parallel_size=0"], "tensor_model_parallel_size"),
        (["eval", "conf/eval/teacher.yaml", "dtype=float8"], "dtype: Input should be"),
        (["eval", "conf/eval/no_such.yaml"], "config file not found"),
        (["eval", "conf/eval/teacher.yaml", "model=/nonexistent/model"],
         "model directory not found: /nonexistent/model"),
        (["import-hf", "conf/import_hf/teacher.yaml", "parallel.tensor_model_parallel_size=2"],
         "num_query_groups 3 is not divisible by tensor_model_parallel_size 2"),
        (["import-hf", "conf/import_hf/teacher.yaml", "parallel.pipeline_model_parallel_size=4"],
         "num_layers 30 is not divisible by pipeline_model_parallel_size 4"),
        (["prepare-data", "conf/prepare_data/shakespeare.yaml", "valid_fraction=1.5"], "valid_fraction"),
        (["eval", "conf/eval/teacher.yaml", "justakey"], "is not of the form key=value"),
        (["eval", "conf/eval/teacher.yaml", "data=/nonexistent.txt", "parallel.pipeline_model_parallel_size=2"],
         "eval data not found: /nonexistent.txt"),
        (["eval", "conf/eval/teacher.yaml", "data=[{weight: 1, path: /nonexistent}]"],
         "data: /nonexistent is not a prepared dataset"),
        (["distill", "conf/distill/smollm2_width_55.yaml", "data=[{weight: 1, path: a}, {weight: 2, path: a}]"],
         "data.blend: Value error, a is listed twice"),
        (["prune", "conf/prune/smollm2_width_55.yaml", "calibration.data=[{weight: -1, path: a}]"],
         "calibration.data.blend.0.weight: Input should be greater than 0"),
        (["run", "conf/run/smollm2_width_55.yaml", "data.generated.weight=0"],
         "data.generated.weight: Input should be greater than 0"),
        (["run", "conf/run/smollm2_width_55.yaml", "data.generated.model=x"], "data.generated.model: unknown key"),
        (["run", "conf/run/smollm2_width_55.yaml", "data.generated.prompts=/nonexistent.jsonl"],
         "data.generated: prompts: /nonexistent.jsonl is not a file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("seq_length: 64\nmodel: /nonexistent/model\nseq_length: 128\n", "seq_length", (1, 3)),
        ("model: /nonexistent/model\nparallel:\n  tensor_model_parallel_size: 1\n  tensor_model_parallel_size: 2\n",
         "parallel.tensor_model_parallel_size", (3, 4)),
        ("model: /nonexistent/model\nharness:\n  tasks: [{name: a, name: b}]\n", "harness.tasks.0.name", (3, 3)),
    ],
    ids=["top", "nested", "in_a_list"],
)
def test_a_key_written_twice_is_refused(tmp_path: Path, capsys, text: str, key: str, lines: tuple[int, int]) -> None:
    """YAML would keep the last of the two values without a word: the first setting would silently not apply."""
    config = tmp_path / "job.yaml"
    config.write_text(text)
    message = f"{config}: not valid YAML (key '{key}' is written twice, on lines {lines[0]} and {lines[1]})"
    with pytest.raises(UserError) as caught:
        load_config(STAGES["eval"].config_class(), config)
    assert str(caught.value) == message
    assert main(["eval", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"nemo-minitron eval: error: {message}"]


def test_unsupported_model_type_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    assert main(["import-hf", f"source={tmp_path}", f"output={tmp_path / 'out'}"]) == 2
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_teacher_perplexity_on_a_text_file_matches_transformers(tmp_path: Path) -> None:
    """`nemo-minitron eval` of the embedded teacher on a play equals transformers on the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_minitron import embedded

    play = next(embedded.corpus_dir().glob("tragedies/*hamlet*.md"))
    text = tmp_path / "hamlet.txt"
    text.write_text(play.read_text(encoding="utf-8"), encoding="utf-8")
    seq, windows = 256, 4
    out = tmp_path / "eval.json"
    proc = _cli(
        "eval", "conf/eval/teacher.yaml", f"data={text}", f"seq_length={seq}",
        f"max_windows={windows}", f"output={out}",
    )
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(out.read_text())
    assert ours == json.loads(proc.stdout)

    teacher = embedded.teacher_dir()
    ids = AutoTokenizer.from_pretrained(teacher)(text.read_text(), add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[: seq * windows]).view(windows, seq)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_loss = model(batch, labels=batch).loss.item()
    assert ours["tokens"] == windows * (seq - 1)
    assert abs(ours["perplexity"] / math.exp(ref_loss) - 1) < 0.005
    assert abs(ours["loss"] - ref_loss) < 1e-4


def test_user_error_from_a_spawned_rank_is_one_line(tmp_path: Path) -> None:
    """An error found only after ranks start (here: a text too short for one window) is one line, exit 2."""
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.", encoding="utf-8")
    proc = _cli("eval", "conf/eval/teacher.yaml", f"data={short}", "parallel.pipeline_model_parallel_size=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"nemo-minitron eval: error: {short}: 8 tokens, not enough for one eval window of 512"
    ]
