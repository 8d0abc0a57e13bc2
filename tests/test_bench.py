"""``nemo-minitron bench`` on a tiny teacher through the CLI: every arm, the report's numbers against the
stages' own outputs, skipping finished stages on a rerun, and bad configs refused before compute.

The speed scripts and the ModelOpt peer run on the embedded teacher; they are off here (``make bench-quick``
runs them, in CI).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import test_pipeline
from nemo_minitron.bench.config import BenchConfig
from nemo_minitron.bench.report import splice_readme
from nemo_minitron.bench.run import depth_target, stage_keys
from nemo_minitron.config import load_config
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from test_pipeline import cli, skipped

# test_pipeline's tiny teacher and corpus, under the fixture name the tests ask for.
inputs = test_pipeline.inputs


def tiny_bench(inputs: dict[str, Path], output: Path, **changes) -> Path:
    budgets = {"recovery_tokens": 256, "compare_tokens": 128, "scratch_tokens": 256, "correction_tokens": 64,
               "calibration_samples": 4, "eval_windows": 4, "speed_steps": 1, "speed_seq": 16, "kl_tokens": 64,
               "kl_vocab": 512}
    cfg = {
        "output": str(output),
        "teacher": str(inputs["teacher"]),
        "data": {"input": str(inputs["corpus"]), "valid_fraction": 0.25},
        "target": {"hidden_size": 48, "ffn_hidden_size": 64},
        "iterative_steps": [{"hidden_size": 56, "ffn_hidden_size": 80}],
        "aggregations": [["mean", "l2"], ["l2", "mean"]],
        "calibration": {"seq_length": 16, "micro_batch_size": 2},
        "distill": {
            "train": {"seq_length": 16, "micro_batch_size": 2, "global_batch_size": 4, "dtype": "float32",
                      "teacher_dtype": "float32"},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
            "checkpoint": {"every_steps": 4, "keep_last": 1, "keep_when_done": False},
            "eval": {"every_steps": 2},
            "log": {"progress": False, "tensorboard": False},
        },
        "eval": {"seq_length": 32, "micro_batch_size": 2},
        "budgets": budgets,
        "quick_budgets": {**budgets, "recovery_tokens": 128, "seq_length": 8, "recovery_eval_every_steps": 1,
                          "nas_max_candidates": 2, "nas_top_k": 1},
        "peers": {"modelopt": False},
        # The full method's search: shapes within 10% under the target's parameter count.
        "nas": {"search": {"hidden_size": [40, 48, 56], "ffn_hidden_size": [48, 64, 80]}, "tolerance": 0.1,
                "top_k": 2, "short_kd_tokens": 32, "eval_windows": 2},
        "speed": False,
        **changes,
    }
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_depth_target_is_the_nearest_parameter_count():
    teacher = ModelConfig(vocab_size=1000, hidden_size=64, ffn_hidden_size=128, num_layers=10, num_attention_heads=4,
                          num_query_groups=2)
    width = teacher.model_copy(update={"hidden_size": 48, "ffn_hidden_size": 64})
    n = depth_target(teacher, width).num_layers
    params = lambda k: teacher.model_copy(update={"num_layers": k}).num_params()  # noqa: E731
    assert all(abs(params(n) - width.num_params()) <= abs(params(k) - width.num_params()) for k in range(1, 10))


def test_bench_end_to_end(inputs, tmp_path):
    out = tmp_path / "bench"
    distill = yaml.safe_load(tiny_bench(inputs, tmp_path / "plain").read_text())["distill"]
    config = tiny_bench(inputs, out, distill={**distill, "teacher_cache": "auto"})
    proc = cli("bench", str(config), "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(f"{out}-quick")
    # The stages rerun_from names are the ones the bench runs, in its order.
    ledger = json.loads((out / "pipeline.json").read_text())["stages"]
    assert list(ledger) == stage_keys(BenchConfig(**yaml.safe_load(config.read_text()), quick=True))
    # quick_budgets.seq_length replaces the calibration, training and held-out sequence lengths (16, 16, 32).
    assert {ledger["ours.prune"]["config"]["calibration"]["seq_length"],
            ledger["ours.train"]["config"]["train"]["seq_length"],
            ledger["ours.eval_trained"]["config"]["seq_length"]} == {8}
    # The held-out eval after the cut measures the pruned model: no calibration pass for it.
    assert ledger["ours.prune"]["config"]["pruned_loss"] is False
    assert ledger["ours.prune"]["result"]["calibration_loss_after"] is None
    # No training checkpoint outlives its finished stage (NAS's short distillations included): the models stay.
    assert not list(out.rglob("checkpoints")) and (out / "recovery" / "train" / "final").is_dir()
    report = json.loads((out / "report.json").read_text())
    results, derived = report["results"], report["derived"]

    def loss(name: str) -> float:
        return json.loads((out / "eval" / f"{name}.json").read_text())["loss"]

    # The report's numbers are the stages' own.
    assert results["teacher_loss"] == loss("eval_teacher")
    pruned, distilled = loss("ours_eval_pruned"), loss("recovery_eval_trained")
    assert derived["recovery"] == pytest.approx((pruned - distilled) / (pruned - loss("eval_teacher")))
    assert results["recovery"]["tokens"] == 128  # quick_budgets
    # The recovery-budget runs' curves have a point every recovery_eval_every_steps (1) steps of 32 tokens, the
    # other arms' every distill.eval.every_steps (2); every curve ends with the final evaluation.
    for arm in (results["recovery"], results["lsq"]["recovery"], results["full"]["recovery"]):
        assert [tokens for tokens, _ in arm["curve"]["eval"]] == [32, 64, 96, 128]
    for arm in (results["ours"], results["lsq"], results["full"]):
        assert [tokens for tokens, _ in arm["curve"]["eval"]] == [64, 128]
    for arm in ("random", "magnitude", "ce", "scratch", "depth", "corrected"):
        assert derived["vs_ours"][arm] == pytest.approx(loss(f"{arm}_eval_trained") - loss("ours_eval_trained"))
    assert results["depth"]["num_layers"] < 4
    assert [a["pruned_loss"] for a in results["aggregation"]] == [pruned, loss("agg_l2_mean_eval_pruned")]
    assert results["iterative"]["pruned_loss"] == loss("iterative_eval_pruned")
    # Beyond the baseline: the lsq arm is the fixed target corrected; the full method's shape comes from NAS over
    # lsq-corrected candidates within the target's parameter count, and its distillations start from the
    # winner's pruned model (not its short distillation).
    assert ledger["lsq.prune"]["config"]["correction"] == "lsq"
    assert ledger["ours.prune"]["config"]["correction"] == "none"
    for arm in ("lsq", "full"):
        assert derived["vs_ours"][arm] == pytest.approx(loss(f"{arm}_eval_trained") - loss("ours_eval_trained"))
    nas = ledger["full.nas"]
    assert nas["config"]["prune_correction"] == "lsq" and nas["config"]["params"] == results["student_params"]
    # quick_budgets: two candidates ranked after pruning, one of them distilled.
    assert (nas["config"]["nas"]["max_candidates"], nas["config"]["nas"]["top_k"]) == (2, 1)
    ranked = nas["result"]["candidates"]
    assert len(ranked) == 2 and sum("loss_short_kd" in row for row in ranked) == 1
    full = results["full"]
    assert 0.9 * results["student_params"] <= full["params"] <= results["student_params"]
    assert ledger["full.train"]["config"]["student"] == nas["result"]["best_pruned"] == full["pruned"]
    assert ledger["full.recovery.train"]["config"]["student"] == full["pruned"]
    assert full["recovery"]["tokens"] == results["recovery"]["tokens"] == 128
    assert full["recovery"]["loss"] == loss("full_recovery_eval_trained")
    lsq = results["lsq"]
    assert ledger["lsq.recovery.train"]["config"]["student"] == lsq["pruned"] == ledger["lsq.prune"]["config"]["output"]
    assert (lsq["recovery"]["tokens"], lsq["recovery"]["loss"]) == (128, loss("lsq_recovery_eval_trained"))
    # One teacher logit cache, written once, feeds every distillation from the original teacher (the NAS's short
    # ones too); the corrected arm's teacher differs, so it distils online.
    cache = str(out / "teacher_cache")
    assert ledger["teacher_cache"]["config"]["teacher"] == str(inputs["teacher"])
    # The longest distillation, the recovery run: 128 tokens in steps of 4 windows of 8 tokens.
    assert ledger["teacher_cache"]["config"]["windows"] == 128 // (4 * 8) * 4
    for arm in ("ours", "recovery", "random", "magnitude", "depth", "lsq", "lsq.recovery", "full", "full.recovery"):
        assert ledger[f"{arm}.train"]["config"]["teacher_cache"]["path"] == cache, arm
    assert nas["config"]["teacher_cache"]["path"] == cache
    assert ledger["corrected.train"]["config"]["teacher_cache"] is None
    assert "read one logit cache" in (out / "report.md").read_text()
    assert json.loads((out / "iterative.step2" / "pruned" / "model_config.json").read_text())["hidden_size"] == 48
    # The from-scratch student starts from small random weights: near-uniform predictions, loss ~ ln(vocab).
    scratch_first = results["scratch"]["curve"]["train"][0][1]
    assert scratch_first == pytest.approx(math.log(49152), abs=0.05)
    assert results["ce"]["curve"]["train"][0][1] != pytest.approx(scratch_first, abs=0.05)
    text = (out / "report.md").read_text()
    assert f"{derived['recovery']:.3f}" in text and "| width beats depth after KD |" in text
    # At the recovery budget: ours, lsq and the full method side by side.
    for label, arm in (("ours + lsq weight correction + logit KD", lsq), ("ours, full method", full)):
        assert f"| {label}" in text and f"| {arm['pruned_loss']:.4f} | {arm['recovery']['loss']:.4f} |" in text
    assert (out / "recovery.png").stat().st_size > 0 and (out / "arms.png").stat().st_size > 0
    assert (out / "results.md").read_text().strip()
    header = None  # every row of a table has its header's cells (a "|" inside a cell would add one)
    for line in text.splitlines():
        header = (header or line) if line.startswith("|") else None
        assert header is None or line.count("|") == header.count("|"), line

    # Run again with another curve resolution (not what a distillation computes): every stage is skipped.
    again = cli("bench", str(config), "--quick", "distill.eval.every_steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert skipped(again.stdout) == set(ledger)
    assert json.loads((out / "report.json").read_text())["derived"]["recovery"] == derived["recovery"]


@pytest.mark.parametrize("changes, message", [
    ({"iterative_steps": [{"num_attention_heads": 2}]}, "iterative_steps: the steps must end at target"),
    ({"iterative_steps": [{"hidden_size": 40}]}, "target.hidden_size 48 is larger than the source's 40"),
    ({"target": {"hidden_size": 4096}}, "target.hidden_size 4096 is larger than the source's 64"),
    ({"aggregations": [["l2", "l2"]]}, "aggregations: include importance's own (mean, l2)"),
    ({"rerun_from": "ours.distill"}, "rerun_from: no stage 'ours.distill'; stages: data, eval.teacher, ours.prune"),
    ({"nas": {"search": {"hidden_size": [8]}, "tolerance": 0.01}}, "nas: no candidate of nas.search has"),
])
def test_bad_bench_config_is_one_line(inputs, tmp_path, changes, message):
    proc = cli("bench", str(tiny_bench(inputs, tmp_path / "bench", **changes)))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "bench").exists()


def test_quick_is_a_bench_option():
    proc = cli("eval", "--quick")
    assert proc.returncode == 2 and "--quick is an option of the bench stage" in proc.stderr


@pytest.mark.modelopt
def test_bench_with_the_modelopt_peer(inputs, tmp_path):
    pytest.importorskip("modelopt", reason="NVIDIA ModelOpt is not installed (make install-modelopt)")
    out = tmp_path / "bench"
    proc = cli("bench", str(tiny_bench(inputs, out, peers={"modelopt": True})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    peer, derived = report["results"]["modelopt"], report["derived"]["modelopt"]
    comparison = json.loads((out / "modelopt" / "comparison.json").read_text())
    assert peer["modelopt_importance_s"] == comparison["seconds"]["modelopt_prune"]
    pruned = json.loads((out / "eval" / "modelopt_eval_pruned.json").read_text())["loss"]
    trained = json.loads((out / "eval" / "modelopt_eval_trained.json").read_text())["loss"]
    ours = report["results"]["ours"]
    assert derived["pruned"] == pytest.approx(pruned - ours["pruned_loss"])
    assert derived["trained"] == pytest.approx(trained - ours["loss"])
    assert json.loads((out / "modelopt" / "modelopt" / "model_config.json").read_text())["hidden_size"] == 48
    md = (out / "report.md").read_text()
    assert "| NVIDIA ModelOpt 0.43.0 vs ours (the same shape, no correction) | ModelOpt - ours |" in md
    # The target compares the full method with ModelOpt after both distillation budgets.
    target, full = report["derived"]["target"], report["results"]["full"]
    recovered = json.loads((out / "eval" / "modelopt_recovery_eval_trained.json").read_text())["loss"]
    assert target["arm"] == "full" and target["compare"] == pytest.approx(trained - full["loss"])
    assert target["recovery"] == pytest.approx(recovered - full["recovery"]["loss"])
    assert target["met"] == (min(target["compare"], target["recovery"]) >= 0.05)
    assert ("**met**" if target["met"] else "**missed**") in md
    tokens = report["results"]["budgets"]["recovery_tokens"]
    assert f"| loss after {tokens:,} KD tokens | {target['recovery']:+.4f} |" in md


def test_readme_results_section_is_replaced_between_its_markers():
    readme = "# Tool\n\n## Results\n<!-- results:start -->\nold table\n<!-- results:end -->\n\n## Tests\n"
    new = splice_readme(readme, "| a | b |\n|---|---|\n")
    assert new == ("# Tool\n\n## Results\n<!-- results:start -->\n| a | b |\n|---|---|\n<!-- results:end -->\n"
                   "\n## Tests\n")
    assert splice_readme(new, "| a | b |\n|---|---|\n") == new
    with pytest.raises(UserError, match="no <!-- results:start --> ... <!-- results:end --> section"):
        splice_readme("# Tool\n", "x\n")


# Half a minute on 2 cores; CI's make bench-quick runs the shipped bench, a blend with an out-of-blend text.
@pytest.mark.slow
def test_bench_on_a_blend_reports_each_corpus_and_the_out_of_blend_text(inputs, tmp_path):
    """The bench on a weighted blend with the teacher's generated chat answers and an out-of-blend text: every
    arm reads the blend, and the report gives each model's held-out loss on each component and on the
    out-of-blend text, the eval stages' own numbers."""
    from nemo_minitron.pipeline.config import GENERATED

    text = (inputs["corpus"] / "part0.md").read_text(encoding="utf-8")
    for name, count in (("bench-prose", 4), ("bench-other", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):  # the same play, reversed word by word: another text of the same vocabulary
            words = text.split()[i::count]
            (tmp_path / name / f"part{i}.txt").write_text(" ".join(reversed(words)) * 2, encoding="utf-8")
    plays, prose, other = str(inputs["corpus"]), str(tmp_path / "bench-prose"), str(tmp_path / "bench-other")
    config = tiny_bench(inputs, tmp_path / "bench", aggregations=[["mean", "l2"]], nas=None, data={
        "blend": [{"weight": 1, "input": plays}, {"weight": 1, "input": prose}],
        "generated": {"weight": 0.5, "max_prompts": 8, "batch_size": 3, "valid_fraction": 0.5,
                      "sampling": {"temperature": 0, "max_new_tokens": 12}},
        "out_of_blend": [{"input": other}], "valid_fraction": 0.25})
    quick = {**yaml.safe_load(config.read_text())["quick_budgets"], "generated_prompts": 6,
             "generated_max_new_tokens": 8}
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "quick_budgets": quick}))
    proc = cli("bench", str(config), "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "bench-quick"
    ledger = json.loads((out / "pipeline.json").read_text())["stages"]
    assert list(ledger) == stage_keys(BenchConfig(**yaml.safe_load(config.read_text()), quick=True))
    blend = ledger["ours.train"]["config"]["data"]
    assert [c["weight"] for c in blend] == [1.0, 1.0, 0.5] and blend[2]["path"] == str(out / "data" / "generated")
    assert ledger["ours.prune"]["config"]["calibration"]["data"] == blend
    assert ledger["generate"]["config"]["model"] == str(inputs["teacher"])
    generated = ledger["generate"]["config"]  # quick_budgets: 6 answers of at most 8 tokens
    assert (generated["max_prompts"], generated["sampling"]["max_new_tokens"]) == (6, 8)
    assert ledger["generate"]["result"]["answers"] == 6
    results = json.loads((out / "report.json").read_text())["results"]

    def losses(name: str) -> dict[str, float]:
        found = json.loads((out / "eval" / f"{name}.json").read_text())["components"]
        extra = json.loads((out / "eval" / f"{name}_out_of_blend.json").read_text())["components"]
        return {plays: found[0]["loss"], prose: found[1]["loss"], GENERATED: found[2]["loss"], other: extra[0]["loss"]}

    assert results["teacher_losses"] == losses("eval_teacher")
    assert results["out_of_blend"] == [other]
    for arm in ("ours", "random", "magnitude", "depth", "corrected"):
        assert results[arm]["pruned_losses"] == losses(f"{arm}_eval_pruned"), arm
        assert results[arm]["losses"] == losses(f"{arm}_eval_trained"), arm
        weighted = (results[arm]["losses"][plays] + results[arm]["losses"][prose]
                    + 0.5 * results[arm]["losses"][GENERATED]) / 2.5
        assert results[arm]["loss"] == pytest.approx(weighted, rel=1e-12)
    md = (out / "report.md").read_text()
    assert f"| model | {plays} | {prose} | {GENERATED} | {other} (out of blend) |" in md
    t = results["teacher_losses"]
    assert f"| teacher | {t[plays]:.4f} | {t[prose]:.4f} | {t[GENERATED]:.4f} | {t[other]:.4f} |" in md


def test_shipped_quick_bench_shortens_the_answers_and_the_search() -> None:
    """conf/bench/smollm2.yaml --quick (CI's `make bench-quick`): 16 generated answers of at most 48 tokens and
    the three largest shapes of the search, two of them distilled; the full bench keeps data and search as
    written."""
    from nemo_minitron.bench.run import bench_data, bench_nas

    cfg = load_config(BenchConfig, Path(__file__).resolve().parents[1] / "conf" / "bench" / "smollm2.yaml")
    assert (bench_data(cfg), bench_nas(cfg)) == (cfg.data, cfg.nas)
    quick = cfg.model_copy(update={"quick": True})
    data, nas = bench_data(quick), bench_nas(quick)
    assert (data.generated.max_prompts, data.generated.sampling.max_new_tokens) == (16, 48)
    assert data.generated.sampling.model_dump(exclude={"max_new_tokens"}) == \
        cfg.data.generated.sampling.model_dump(exclude={"max_new_tokens"})
    assert (nas.max_candidates, nas.top_k, nas.short_kd_tokens) == (3, 2, 512)
    assert nas.model_dump(exclude={"max_candidates", "top_k", "short_kd_tokens"}) == \
        cfg.nas.model_dump(exclude={"max_candidates", "top_k", "short_kd_tokens"})


def test_shipped_bench_keeps_no_checkpoint_of_a_finished_arm() -> None:
    """conf/bench/smollm2.yaml (what `make bench` runs) deletes each arm's training checkpoints once it finished."""
    cfg = load_config(BenchConfig, Path(__file__).resolve().parents[1] / "conf" / "bench" / "smollm2.yaml")
    assert cfg.distill.checkpoint.keep_when_done is False
    # The 512-step recovery runs' curves: 16 points, not one per distill.eval.every_steps (8).
    steps = cfg.budgets.recovery_tokens // (cfg.distill.train.global_batch_size * cfg.distill.train.seq_length)
    assert (steps // cfg.budgets.recovery_eval_every_steps, cfg.distill.eval.every_steps) == (16, 8)
