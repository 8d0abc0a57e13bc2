"""``nemo-minitron run`` end to end on a tiny teacher, through the CLI: every stage, the report, skipping finished
stages, resuming after a kill during distillation (bit for bit), refusing a changed config, NAS with an
iterative schedule, and the shipped Llama-3.1-8B pipelines with their shapes scaled down.

The tiny teacher (hidden 64, 4 heads in 2 query groups, MLP 96, 4 layers) uses the real SmolLM2 tokenizer, so
the corpus is prepared from Hamlet as in the default job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from nemo_minitron import embedded
    from tiny import write_tiny_hf

    root = tmp_path_factory.mktemp("pipeline")
    teacher = write_tiny_hf(root / "teacher", vocab_size=49152, hidden_size=64, intermediate_size=96, seed=31,
                            with_tokenizer=True)
    play = next(embedded.corpus_dir().glob("tragedies/*hamlet*.md")).read_text(encoding="utf-8")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"part{i}.md").write_text(play[i * 3000 : (i + 1) * 3000], encoding="utf-8")
    return {"root": root, "teacher": teacher, "corpus": corpus}


def tiny_run(inputs: dict[str, Path], output: Path, **changes) -> Path:
    """A run config for the tiny teacher: one width step, 8 KD steps, a checkpoint after every step."""
    cfg = {
        "output": str(output),
        "teacher": str(inputs["teacher"]),
        "data": {"input": str(inputs["corpus"]), "valid_fraction": 0.25},
        "calibration": {"num_samples": 4, "seq_length": 16, "micro_batch_size": 2},
        "schedule": [{"target": {"hidden_size": 48, "ffn_hidden_size": 64}, "kd_tokens": 512}],
        "distill": {
            "train": {"seq_length": 16, "micro_batch_size": 2, "global_batch_size": 4, "dtype": "float32",
                      "teacher_dtype": "float32"},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
            "checkpoint": {"every_steps": 1, "keep_last": 1},
            "eval": {"every_steps": 4},
            "log": {"progress": False, "tensorboard": False},
        },
        "eval": {"seq_length": 32, "micro_batch_size": 2, "max_windows": 8},
        "report": {"generation_tokens": 4},
        **changes,
    }
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_minitron.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, **kw)


def skipped(stdout: str) -> set[str]:
    return {line.split()[1].rstrip(":") for line in stdout.splitlines() if line.endswith("finished before, skipped")}


def run_until_first_checkpoint(config: Path, run: Path, **popen) -> subprocess.Popen:
    """Start ``nemo-minitron run config`` and return it, still running, once step 1's distillation has written
    its first checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "nemo_minitron.cli", "run", str(config)], cwd=ROOT, **popen)
    checkpoints = run / "step1" / "distill" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first distillation checkpoint"
    return proc


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "step1" / "distill" / "final" / "model.safetensors")


def test_run_end_to_end_skip_resume_and_changed_config(inputs) -> None:
    from nemo_minitron.config import load_config
    from nemo_minitron.pipeline.config import RunConfig
    from nemo_minitron.pipeline.run import stage_keys

    root = inputs["root"]
    config = tiny_run(inputs, root / "full")
    first = cli("run", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    run = root / "full"
    ledger = json.loads((run / "pipeline.json").read_text())["stages"]
    expected = [k for k in stage_keys(load_config(RunConfig, config)) if k != "export.teacher"]  # an HF teacher
    assert list(ledger) == expected
    report = json.loads((run / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["teacher", "step 1 pruned", "step 1 distilled", "final student"]
    assert report["kd_tokens"] == 512
    for name in ("report.md", "report_files/loss_curves.png", "report_files/step1_importance.png"):
        assert (run / name).stat().st_size > 0, name
    assert "| teacher |" in first.stdout and str(run / "export" / "hf") in first.stdout
    # The teacher's and the student's greedy answers to the default chat prompts, side by side.
    chat = report["chat_answers"]
    assert [c["prompt"] for c in chat] == load_config(RunConfig, config).report.chat_prompts
    assert all(set(c["answers"]) == {"teacher", "student"} for c in chat)
    assert "## Chat answers" in (run / "report.md").read_text()
    records = [json.loads(line) for line in (run / "step1/distill/metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in records if "kd" in r]
    assert len(kd) == 8 and kd[-1] < kd[0]
    # One evaluation for every point of the loss-curve plot: the distillation's held-out curve uses the eval
    # stages' windows, so it ends where the distilled model's eval stage stands.
    held_out = [r["eval_loss"] for r in records if "eval_loss" in r]
    final_eval = ledger["step1.eval_distilled"]["result"]["loss"]
    assert len(held_out) == 2 and abs(held_out[-1] - final_eval) <= 1e-6 * final_eval, (held_out, final_eval)
    assert ledger["step1.distill"]["config"]["eval"] == {"every_steps": 4, "max_windows": 8, "seq_length": 32,
                                                         "micro_batch_size": 2}

    # The exported student is the distilled checkpoint, as transformers computes it.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run / "export" / "hf", dtype=torch.float32)
    assert hf.config.hidden_size == 48 and hf.config.intermediate_size == 64
    exported = {k: v for k, v in hf.state_dict().items()}
    assert torch.equal(exported["model.embed_tokens.weight"], final_weights(run)["embedding.word_embeddings.weight"])

    # Everything finished: a second run skips every stage and reports the same numbers.
    again = cli("run", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert skipped(again.stdout) == set(ledger)
    assert json.loads((run / "report.json").read_text())["rows"] == report["rows"]
    # Other checkpoint, log and periodic-eval settings leave what finished as it is.
    io_only = cli("run", str(config), "distill.checkpoint.keep_last=3", "distill.checkpoint.keep_when_done=false",
                  "distill.log.every_steps=2", "distill.eval.every_steps=3")
    assert io_only.returncode == 0, io_only.stderr[-3000:]
    assert skipped(io_only.stdout) == set(ledger)

    # A changed stage config is refused, naming the stage and the key, before any compute.
    changed = cli("run", str(config), "schedule.0.target.hidden_size=40")
    assert changed.returncode == 2
    assert changed.stderr.strip().endswith(
        "stage step1.prune finished with another config (target.hidden_size: 48 -> 40); set "
        "rerun_from=step1.prune to redo it and the stages after it, or use a new output directory")

    # Killed during distillation, then run again: the finished stages are skipped, the distillation resumes
    # from its last checkpoint, and the student is the uninterrupted run's bit for bit.
    killed_run = root / "killed"
    config2 = tiny_run(inputs, killed_run)
    proc = run_until_first_checkpoint(config2, killed_run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_run / "step1" / "distill" / "final").exists()
    resumed = cli("run", str(config2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {"data", "eval.teacher", "step1.prune", "step1.eval_pruned"} <= skipped(resumed.stdout)
    assert "step1.distill" not in skipped(resumed.stdout)
    uninterrupted, after_kill = final_weights(run), final_weights(killed_run)
    assert uninterrupted.keys() == after_kill.keys()
    assert all(torch.equal(uninterrupted[k], after_kill[k]) for k in uninterrupted)

    # SIGTERM (pre-emption) during distillation: the run stops cleanly (status 0, "stopped_early", as distill
    # does), the stage is not recorded as finished, and the next run resumes it to the same student.
    termed_run = root / "termed"
    config3 = tiny_run(inputs, termed_run)
    proc = run_until_first_checkpoint(config3, termed_run, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "stage step1.distill was stopped by SIGTERM" in stderr, stderr[-2000:]
    assert json.loads(stdout[stdout.index("{"):]) == {"stopped_early": True}
    assert "step1.distill" not in json.loads((termed_run / "pipeline.json").read_text())["stages"]
    resumed = cli("run", str(config3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after_term = final_weights(termed_run)
    assert all(torch.equal(uninterrupted[k], after_term[k]) for k in uninterrupted)


def test_nas_then_iterative_step(inputs) -> None:
    """Step 1 searches 60-80% shapes (pruned, ranked, two short-listed get a short distillation); step 2 cuts
    a layer from the winner and distils again."""
    root = inputs["root"]
    config = tiny_run(
        inputs, root / "nas",
        schedule=[{"params": 0.8, "kd_tokens": 128}, {"target": {"num_layers": 3}, "kd_tokens": 128}],
        nas={"search": {"hidden_size": [40, 48, 56], "ffn_hidden_size": [48, 64, 80]}, "tolerance": 0.25,
             "top_k": 2, "short_kd_tokens": 64, "eval_windows": 4},
    )
    done = cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "nas"
    nas = json.loads((run / "step1" / "nas" / "nas.json").read_text())
    table = nas["candidates"]
    assert len(table) >= 3
    assert all(0.6 * nas["source_params"] <= c["params"] <= 0.8 * nas["source_params"] for c in table)
    assert [c["rank_pruned"] for c in table] == list(range(1, len(table) + 1))
    assert sorted(c["loss_pruned"] for c in table) == [c["loss_pruned"] for c in table]
    shortlisted = [c for c in table if "rank_short_kd" in c]
    assert len(shortlisted) == 2 and all(c["short_kd_tokens"] == 64 for c in shortlisted)
    best = min(shortlisted, key=lambda c: c["loss_short_kd"])
    assert nas["best"] == best["name"]
    # The short distillation lowers each short-listed candidate's held-out loss (same windows, same precision).
    assert all(c["loss_short_kd"] < c["loss_pruned"] for c in shortlisted), shortlisted
    # Each short distillation keeps its final model and no training checkpoint (it is never resumed).
    assert not any((Path(c["student"]).parent / "checkpoints").exists() for c in shortlisted)
    report = json.loads((run / "report.json").read_text())
    assert report["kd_tokens"] == 128 + 128 + 2 * 64
    assert report["steps"][0]["shape"]["hidden_size"] == best["target"]["hidden_size"]
    assert report["steps"][1]["shape"]["num_layers"] == 3
    assert "architecture search" in (run / "report.md").read_text()
    ledger = json.loads((run / "pipeline.json").read_text())["stages"]
    assert ledger["step2.prune"]["config"]["model"] == str(run / "step1" / "distill" / "final")


def test_nas_with_weight_correction_cuts_as_the_prune_stage_does(inputs) -> None:
    """prune_correction lsq in a run reaches NAS: every candidate is the lsq-corrected cut, so the winner's
    pruned model is bit for bit what the prune stage writes for its shape on the same calibration set."""
    root = inputs["root"]
    config = tiny_run(
        inputs, root / "nas-lsq", schedule=[{"params": 0.8, "kd_tokens": 0}],
        nas={"search": {"hidden_size": [40, 48, 56], "ffn_hidden_size": [48, 64, 80]}, "tolerance": 0.25,
             "top_k": 1, "short_kd_tokens": 0, "eval_windows": 4},
        prune_correction="lsq", prune_correction_damping=0.05)
    done = cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "nas-lsq"
    ledger = json.loads((run / "pipeline.json").read_text())["stages"]
    nas = ledger["step1.nas"]
    assert (nas["config"]["prune_correction"], nas["config"]["prune_correction_damping"]) == ("lsq", 0.05)
    best = next(c for c in nas["result"]["candidates"] if c["name"] == nas["result"]["best"])
    alone = {"model": str(inputs["teacher"]), "output": str(root / "nas-lsq-alone"), "target": best["target"],
             "calibration": nas["config"]["calibration"], "importance": nas["config"]["importance"],
             "dtype": nas["config"]["prune_dtype"], "correction": "lsq", "correction_damping": 0.05,
             "pruned_loss": False, "seed": nas["config"]["seed"]}
    (root / "nas-lsq-alone.yaml").write_text(yaml.safe_dump(alone))
    pruned = cli("prune", str(root / "nas-lsq-alone.yaml"))
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    expected = load_file(root / "nas-lsq-alone" / "model.safetensors")
    found = load_file(Path(nas["result"]["best_pruned"]) / "model.safetensors")
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    # ... and not the plain cut.
    (root / "nas-plain-alone.yaml").write_text(yaml.safe_dump(
        {**alone, "correction": "none", "output": str(root / "nas-plain-alone")}))
    assert cli("prune", str(root / "nas-plain-alone.yaml")).returncode == 0
    plain = load_file(root / "nas-plain-alone" / "model.safetensors")
    assert any(not torch.equal(plain[k], found[k]) for k in found)


@pytest.mark.parametrize("name", ["llama31_8b_to_4b_width", "llama31_8b_to_4b_depth"])
def test_shipped_llama_pipelines_run_scaled_down(inputs, name: str) -> None:
    """The GPU-scale Llama-3.1-8B -> 4B configs, unchanged but for sizes, paths and parallelism (one rank, so
    no sequence parallelism): a tiny Llama teacher with the same structure (GQA, untied, SwiGLU), the width
    target scaled by the same ratios (hidden 3/4, MLP 9/14 rounded), the depth target dropping the second half
    of the layers."""
    root = inputs["root"]
    run = root / name
    shape = (["schedule.0.target.hidden_size=48", "schedule.0.target.ffn_hidden_size=64"] if "width" in name
             else ["schedule.0.target.drop_layers=[2,3]"])
    done = cli(
        "run", str(ROOT / "conf" / "run" / f"{name}.yaml"), f"output={run}", f"teacher={inputs['teacher']}",
        f"data.input={inputs['corpus']}", "data.valid_fraction=0.25", *shape,
        "teacher_correction.tokens=64", "schedule.0.kd_tokens=64", "calibration.num_samples=4",
        "calibration.seq_length=16", "distill.train.seq_length=16", "distill.train.global_batch_size=4",
        "distill.train.micro_batch_size=2", "distill.train.dtype=float32", "distill.train.teacher_dtype=float32",
        "distill.loss.logits.chunk_tokens=16", "distill.log.progress=false", "distill.log.tensorboard=false",
        "eval.seq_length=32", "eval.max_windows=4", "eval.dtype=float32", "prune_dtype=float32",
        "parallel.tensor_model_parallel_size=1", "distill.train.sequence_parallel=false",
        "report.generation_tokens=0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    shape = report["steps"][0]["shape"]
    assert (shape["hidden_size"], shape["num_layers"]) == ((48, 4) if "width" in name else (64, 2))
    assert report["kd_tokens"] == 64
    assert (run / "teacher_correction" / "final").is_dir()


def test_run_refuses_its_own_windows_for_the_periodic_evaluation() -> None:
    """The distillations' periodic held-out loss uses the run's eval windows: setting others is a config error."""
    from nemo_minitron.config import build_config
    from nemo_minitron.errors import UserError
    from nemo_minitron.pipeline.config import RunConfig

    base = {"output": "out", "teacher": "t", "data": {"input": "x"},
            "schedule": [{"target": {"hidden_size": 8}, "kd_tokens": 0}]}
    assert build_config(RunConfig, base, ["distill.eval.every_steps=5"]).distill.eval.every_steps == 5
    with pytest.raises(UserError, match=r"distill\.eval\.max_windows: the periodic evaluation uses the run's eval"):
        build_config(RunConfig, base, ["distill.eval.max_windows=4"])


def test_run_refuses_sequence_parallelism_without_tensor_parallelism() -> None:
    from nemo_minitron.config import build_config
    from nemo_minitron.errors import UserError
    from nemo_minitron.pipeline.config import RunConfig

    base = {"output": "out", "teacher": "t", "data": {"input": "x"},
            "schedule": [{"target": {"hidden_size": 8}, "kd_tokens": 0}]}
    with pytest.raises(UserError) as err:
        build_config(RunConfig, base, ["distill.train.sequence_parallel=true"])
    assert str(err.value) == ("<root>: Value error, distill.train.sequence_parallel needs "
                              "parallel.tensor_model_parallel_size > 1")
    overrides = ["distill.train.sequence_parallel=true", "parallel.tensor_model_parallel_size=2"]
    assert build_config(RunConfig, base, overrides).distill.train.sequence_parallel


def test_a_second_run_on_a_held_run_directory_stops_before_any_work(inputs) -> None:
    from test_distill import _hold

    run = inputs["root"] / "held"
    holder = _hold(run)
    try:
        second = cli("run", str(tiny_run(inputs, run)))
        assert second.returncode == 2
        assert f"run directory {run} is in use by process {holder.pid} on " in second.stderr
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_run_on_a_blend_reports_each_corpus_and_the_out_of_blend_text(inputs) -> None:
    """A run on a weighted blend of two corpora with an out-of-blend text: each corpus is prepared on its own,
    every stage reads the blend, and every eval row reports each corpus's held-out loss (the headline weighted as
    the blend) and the out-of-blend text's, each equal to transformers' loss on the same windows."""
    from nemo_minitron import embedded
    from nemo_minitron.config import load_config
    from nemo_minitron.evaluation.config import EvalConfig
    from nemo_minitron.evaluation.stage import evaluate
    from nemo_minitron.pipeline.config import RunConfig
    from nemo_minitron.pipeline.run import stage_keys

    root = inputs["root"]
    for name, novel, parts in (("prose", embedded.resolve_path(embedded.AUSTEN) / "emma", 8),
                               ("other", embedded.resolve_path(embedded.AUSTEN_HELD_OUT) / "persuasion", 4)):
        text = (novel / "chapter-001.txt").read_text(encoding="utf-8")
        (root / name).mkdir()
        for i in range(parts):
            (root / name / f"part{i}.txt").write_text(text[i * 2000 : (i + 1) * 2000], encoding="utf-8")
    plays, prose, other = str(inputs["corpus"]), str(root / "prose"), str(root / "other")
    config = tiny_run(inputs, root / "blend", data={
        "blend": [{"weight": 3, "input": plays}, {"weight": 1, "input": prose}],
        "out_of_blend": [{"input": other}], "valid_fraction": 0.25},
        schedule=[{"target": {"hidden_size": 48, "ffn_hidden_size": 64}, "kd_tokens": 256}],
        report={"generation_tokens": 0})
    done = cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "blend"
    ledger = json.loads((run / "pipeline.json").read_text())["stages"]
    expected = [k for k in stage_keys(load_config(RunConfig, config)) if k not in ("export.teacher", "generation")]
    assert list(ledger) == expected
    assert expected[:3] == ["data.1", "data.2", "data.out_of_blend.1"]
    assert "step1.eval_distilled.out_of_blend" in expected
    dirs = sorted((run / "data").iterdir()) + sorted((run / "out_of_blend").iterdir())
    assert [d.name.split("-")[0] for d in dirs] == ["1", "2", "1"] and all((d / "meta.json").is_file() for d in dirs)
    blend = [{"weight": 3.0, "path": str(dirs[0])}, {"weight": 1.0, "path": str(dirs[1])}]
    # Training, calibration and the periodic evaluation read the blend; nothing reads the out-of-blend text.
    assert ledger["step1.distill"]["config"]["data"] == blend
    assert ledger["step1.prune"]["config"]["calibration"]["data"] == blend
    assert str(dirs[2]) not in json.dumps({k: v["config"] for k, v in ledger.items()
                                           if not k.endswith(".out_of_blend") and not k.startswith("data.")})

    report = json.loads((run / "report.json").read_text())
    names = ["teacher", "step 1 pruned", "step 1 distilled", "final student"]
    assert [r["name"] for r in report["rows"]] == names
    for row in report["rows"]:
        assert set(row["losses"]) == {plays, prose, other}
        weighted = 0.75 * row["losses"][plays] + 0.25 * row["losses"][prose]
        assert abs(row["loss"] - weighted) <= 1e-9 * weighted, row
    # transformers on the same held-out windows of each prepared directory (the teacher and the exported student).
    for row, model in ((report["rows"][0], inputs["teacher"]), (report["rows"][-1], run / "export" / "hf")):
        for name, folder in zip((plays, prose, other), dirs):
            ref = evaluate(EvalConfig(model=str(model), data=str(folder), backend="hf", seq_length=32,
                                      micro_batch_size=2, max_windows=8)).loss
            assert abs(row["losses"][name] - ref) <= 1e-4 * ref, (row["name"], name, row["losses"][name], ref)
    md = (run / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert f"| {plays} (weight 0.75) | {prose} (weight 0.25) | {other} (out of blend) |" in header
    assert "out of blend (never trained, calibrated or searched on" in md


def test_run_data_is_one_corpus_or_a_blend() -> None:
    from nemo_minitron.config import build_config
    from nemo_minitron.errors import UserError
    from nemo_minitron.pipeline.config import RunConfig

    base = {"output": "out", "teacher": "t", "schedule": [{"target": {"hidden_size": 8}, "kd_tokens": 0}]}
    both = {"input": "a", "blend": [{"weight": 1, "input": "b"}]}
    for data, message in ((both, "give exactly one of input"), ({}, "give exactly one of input"),
                          ({"blend": [{"weight": 1, "input": "a"}], "out_of_blend": [{"input": "a"}]},
                           "a is listed twice"),
                          ({"blend": [{"weight": 0, "input": "a"}]}, "greater than 0")):
        with pytest.raises(UserError, match=message):
            build_config(RunConfig, {**base, "data": data}, [])
    cfg = build_config(RunConfig, {**base, "data": {"input": "a"}}, [])
    assert cfg.data.corpora() == [("a", 1.0)] and cfg.data.out_of_blend == []


def test_default_job_distils_on_a_blend_and_reports_an_out_of_blend_novel() -> None:
    from nemo_minitron.config import load_config
    from nemo_minitron.data.prepare import list_input_files
    from nemo_minitron.pipeline.config import GENERATED, RunConfig
    from nemo_minitron.pipeline.run import validate

    cfg = load_config(RunConfig, ROOT / "conf/run/smollm2_width_55.yaml")
    assert cfg.data.corpora() == [("embedded:shakespeare", 0.5), ("embedded:austen", 0.5)]
    assert [t.input for t in cfg.data.out_of_blend] == ["embedded:austen-persuasion"]
    assert cfg.data.components()[-1] == (GENERATED, 0.05) and cfg.data.generated.prompts == "embedded:chat-prompts"
    validate(cfg)  # the teacher has a chat template, the prompts are readable
    trained = {Path(name).parts[0] for name, _ in list_input_files("embedded:austen")}
    assert "persuasion" not in trained and len(trained) == 5
    assert {Path(name).parts[0] for name, _ in list_input_files("embedded:austen-persuasion")} == {"persuasion"}


def test_run_blends_the_teachers_generated_chat_answers(inputs) -> None:
    """``data.generated``: the run's teacher answers the prompts (the same dataset as the ``generate`` stage run on
    its own), every stage reads the answers blended in at their weight, each eval row reports their held-out
    loss (equal to transformers' on the same windows) beside the corpus's, and a second run skips every stage."""
    from nemo_minitron.chat.config import GenerateConfig
    from nemo_minitron.chat.generate import generate
    from nemo_minitron.config import load_config
    from nemo_minitron.evaluation.config import EvalConfig
    from nemo_minitron.evaluation.stage import evaluate
    from nemo_minitron.pipeline.config import GENERATED, RunConfig
    from nemo_minitron.pipeline.run import stage_keys

    root, plays = inputs["root"], str(inputs["corpus"])
    settings = {"max_prompts": 6, "batch_size": 3, "valid_fraction": 0.5,
                "sampling": {"temperature": 0.7, "max_new_tokens": 8, "seed": 5}}
    config = tiny_run(inputs, root / "chat", data={
        "input": plays, "valid_fraction": 0.25, "generated": {"weight": 0.5, **settings}},
        schedule=[{"target": {"hidden_size": 48, "ffn_hidden_size": 64}, "kd_tokens": 256}],
        report={"generation_tokens": 0, "chat_tokens": 0})
    done = cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "chat"
    ledger = json.loads((run / "pipeline.json").read_text())["stages"]
    expected = [k for k in stage_keys(load_config(RunConfig, config)) if k not in ("export.teacher", "generation")]
    assert list(ledger) == expected and expected[:2] == ["data.1", "generate"]

    # The answers are the teacher's: the generate stage on its own writes the same bytes.
    generated = run / "data" / "generated"
    alone = generate(GenerateConfig.model_validate({"model": str(inputs["teacher"]), "output_dir": str(root / "alone"),
                                                    "split_seed": 1234, **settings}))
    assert alone["prompts"] == 6 and alone["num_valid_tokens"] > 0
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (generated / name).read_bytes() == (root / "alone" / name).read_bytes(), name

    corpus_dir = next(d for d in (run / "data").iterdir() if d.name.startswith("1-"))
    blend = [{"weight": 1.0, "path": str(corpus_dir)}, {"weight": 0.5, "path": str(generated)}]
    assert ledger["step1.distill"]["config"]["data"] == blend
    assert ledger["step1.prune"]["config"]["calibration"]["data"] == blend
    assert ledger["eval.teacher"]["config"]["data"] == blend

    report = json.loads((run / "report.json").read_text())
    for row in report["rows"]:
        assert set(row["losses"]) == {plays, GENERATED}
        weighted = (row["losses"][plays] + 0.5 * row["losses"][GENERATED]) / 1.5
        assert abs(row["loss"] - weighted) <= 1e-9 * weighted, row
    for row, model in ((report["rows"][0], inputs["teacher"]), (report["rows"][-1], run / "export" / "hf")):
        ref = evaluate(EvalConfig(model=str(model), data=str(generated), backend="hf", seq_length=32,
                                  micro_batch_size=2, max_windows=8)).loss
        assert abs(row["losses"][GENERATED] - ref) <= 1e-4 * ref, (row["name"], row["losses"][GENERATED], ref)
    md = (run / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert f"| {plays} (weight 0.67) | {GENERATED} (weight 0.33) |" in header
    assert "the teacher's sampled answers to 6 prompts" in md

    again = cli("run", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert skipped(again.stdout) == set(ledger)


def test_generated_data_needs_a_teacher_with_a_chat_template(inputs, tmp_path) -> None:
    """A teacher whose tokenizer has no chat template is refused in one line before anything is written."""
    from tiny import write_tiny_hf

    teacher = write_tiny_hf(tmp_path / "base", vocab_size=49152, hidden_size=64, intermediate_size=96, seed=3,
                            with_tokenizer=True)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (teacher / extra).unlink(missing_ok=True)
    path = tiny_run({**inputs, "teacher": teacher}, tmp_path / "run",
                    data={"input": str(inputs["corpus"]), "generated": {"weight": 0.1}})
    done = cli("run", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"nemo-minitron run: error: data.generated: model: {teacher} has no chat template in its tokenizer files"]
    assert not (tmp_path / "run").exists()


def launched(*args: str, ranks: int = 2) -> list[subprocess.CompletedProcess]:
    """``nemo-minitron ARGS`` started as torchrun does: ``ranks`` processes with ``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; each one's outcome, by rank."""
    from conftest import DIST_ENV
    from nemo_minitron.parallel.state import _free_port

    base = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    rendezvous = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "nemo_minitron.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(ranks)]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


TIMINGS = {"seconds", "tokens_per_second", "importance_seconds"}


def without_timings(value):
    """A ledger entry's result without the wall times, which differ between any two runs."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


# A minute on 2 cores; CI runs `run` on two ranks under the real one-node Slurm (make test-slurm).
@pytest.mark.slow
def test_run_launched_on_two_ranks_equals_the_run_that_spawns_its_ranks(inputs) -> None:
    """``run`` under a launcher (two ranks with torchrun's variables, TP=2): rank 0 alone prepares the data and
    writes the ledger and the report, both ranks run each parallel stage, and everything equals the same run
    started directly (which spawns TP=2 ranks for each parallel stage). A stage rank 0 refuses, and a run
    directory held by another job, stop both ranks with the same one line and exit status 2."""
    from test_distill import _hold

    root = inputs["root"]
    changes = dict(schedule=[{"target": {"hidden_size": 48, "ffn_hidden_size": 64}, "kd_tokens": 128}],
                   parallel={"tensor_model_parallel_size": 2}, report={"generation_tokens": 2, "chat_tokens": 0})
    local_cfg = tiny_run(inputs, root / "local2", **changes)
    local = cli("run", str(local_cfg))
    assert local.returncode == 0, local.stderr[-3000:]
    config = tiny_run(inputs, root / "launched2", **changes)
    ranks = launched("run", str(config))
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]

    # Rank 0 alone prepares the data (its tokenizer's progress bar), prints the progress and the summary.
    assert "tokenizing" in ranks[0].stderr and "tokenizing" not in ranks[1].stderr
    assert ranks[1].stdout == ""
    assert ranks[0].stdout.count("[run] data ...") == 1 and "| teacher |" in ranks[0].stdout
    ledgers = [json.loads((root / name / "pipeline.json").read_text())["stages"] for name in ("local2", "launched2")]
    assert list(ledgers[1]) == list(ledgers[0])
    assert "generation" in ledgers[1] and "step1.distill" in ledgers[1]
    for key in ledgers[0]:
        local_result, launched_result = (without_timings(ledger[key]["result"]) for ledger in ledgers)
        # Paths name each run's own directory.
        launched_result = json.loads(json.dumps(launched_result).replace(str(root / "launched2"),
                                                                         str(root / "local2")))
        if key == "generation":  # tokens per second only: a timing
            assert set(launched_result) == set(local_result)
            continue
        assert launched_result == local_result, key
    reports = [json.loads((root / name / "report.json").read_text()) for name in ("local2", "launched2")]
    assert reports[1]["rows"] == reports[0]["rows"] and reports[1]["kd_tokens"] == 128
    final = [load_file(root / name / "export" / "hf" / "model.safetensors") for name in ("local2", "launched2")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])

    # A changed stage config: rank 0's ledger refuses it, and every rank stops with its one line, exit status 2.
    refused = launched("run", str(config), "schedule.0.target.hidden_size=40")
    message = ("nemo-minitron run: error: stage step1.prune finished with another config (target.hidden_size: "
               "48 -> 40); set rerun_from=step1.prune to redo it and the stages after it, or use a new output "
               "directory")
    assert [(r.returncode, r.stderr.strip().splitlines()[-1]) for r in refused] == [(2, message)] * 2

    # Another job holds the run directory: both ranks stop before any work.
    held = root / "held2"
    holder = _hold(held)
    try:
        refused = launched("run", str(tiny_run(inputs, held, **changes)))
    finally:
        holder.kill()
        holder.wait()
    assert [r.returncode for r in refused] == [2, 2]
    assert all(r.stderr.strip().splitlines()[-1].startswith(f"nemo-minitron run: error: run directory {held} is in "
                                                            f"use by process {holder.pid} on ") for r in refused)
    assert sorted(p.name for p in held.iterdir()) == [".lock"]
