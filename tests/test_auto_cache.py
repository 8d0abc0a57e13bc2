"""``distill.teacher_cache: auto`` in ``run`` and ``nas``: one teacher logit cache, written once as a ledger stage
after teacher correction and read by every NAS candidate's short distillation and every schedule step, with no
teacher built beside the students; with k = vocabulary in fp32 the run ends where the online run ends.

The tiny teacher and corpus are those of ``tests/test_pipeline.py`` (vocabulary 49,152: the SmolLM2 tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import destroy_state
from nemo_minitron.config import load_config
from nemo_minitron.errors import UserError
from nemo_minitron.pipeline.config import NASStageConfig, RunConfig
from test_pipeline import inputs, tiny_run  # noqa: F401 (inputs: a fixture)

VOCAB = 49152
# Step 1 searches 60-80% shapes (two short-listed, one short distillation step each = 4 windows); step 2 cuts
# a layer from the winner and distils for 2 steps (8 windows): the cache holds 8 windows.
SCHEDULE = [{"params": 0.8, "kd_tokens": 128}, {"target": {"num_layers": 3}, "kd_tokens": 128}]
NAS = {"search": {"hidden_size": [40, 48, 56], "ffn_hidden_size": [48, 64, 80]}, "tolerance": 0.25, "top_k": 2,
       "short_kd_tokens": 64, "eval_windows": 4}


def _config(inputs, output: Path, teacher_cache) -> RunConfig:  # noqa: F811
    path = tiny_run(inputs, output, schedule=SCHEDULE, nas=NAS, report={"generation_tokens": 0, "chat_tokens": 0})
    cfg = yaml.safe_load(path.read_text())
    cfg["distill"]["teacher_cache"] = teacher_cache
    path.write_text(yaml.safe_dump(cfg))
    return load_config(RunConfig, path)


def _run(cfg: RunConfig, monkeypatch) -> list[str]:
    """Run the pipeline in this process; the models that the distillations (``trainer:``), NAS (``nas:``, the
    model it prunes and the teacher of its candidates) and cache-logits (``cache:``) loaded, in order."""
    from nemo_minitron.distill import cache, trainer
    from nemo_minitron.pipeline import nas
    from nemo_minitron.pipeline.run import run_pipeline

    loaded: list[str] = []
    for module, tag in ((trainer, "trainer:"), (nas, "nas:"), (cache, "cache:")):
        original = module.load_model
        monkeypatch.setattr(module, "load_model",
                            lambda ref, _o=original, _t=tag, **kw: loaded.append(_t + str(ref)) or _o(ref, **kw))
    try:
        run_pipeline(cfg)
    finally:
        destroy_state()
        monkeypatch.undo()
    return loaded


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):  # noqa: F811
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("auto_cache")
    online = _config(inputs, root / "online", None)
    cached = _config(inputs, root / "cached", {"top_k": VOCAB, "dtype": "float32"})
    return {"online": (online, _run(online, monkeypatch)), "cached": (cached, _run(cached, monkeypatch)),
            "teacher": str(inputs["teacher"])}


def _ledger(cfg: RunConfig) -> dict:
    return json.loads((Path(cfg.output) / "pipeline.json").read_text())["stages"]


def test_run_writes_one_cache_after_teacher_correction_sized_for_its_longest_distillation(runs) -> None:
    cfg, loaded = runs["cached"]
    out = Path(cfg.output)
    stages = list(_ledger(cfg))
    assert stages.index("teacher_cache") == stages.index("eval.teacher") - 1
    assert [p.parent for p in out.rglob("index.json")] == [out / "teacher_cache"]
    index = json.loads((out / "teacher_cache" / "index.json").read_text())
    # The longest reader: step 2's 128 tokens = 2 steps of 4 windows of 16 tokens (NAS reads 1 step).
    assert index["windows"] == 8 and index["top_k"] == VOCAB and index["seq_length"] == 16
    # The teacher is loaded once, by cache-logits; no distillation builds it, and NAS loads it only as the model
    # it prunes (step 1 starts from the teacher), not as its candidates' teacher.
    teacher = runs["teacher"]
    assert loaded.count("cache:" + teacher) == 1
    assert loaded.count("nas:" + teacher) == 1 and "trainer:" + teacher not in loaded
    nas = json.loads((out / "step1" / "nas" / "nas.json").read_text())
    assert nas["teacher_cache"] == str(out / "teacher_cache")
    assert not (out / "step1" / "nas" / "teacher_cache").exists()
    ledger = _ledger(cfg)
    for key in ("step1.distill", "step2.distill"):
        assert ledger[key]["config"]["teacher_cache"]["path"] == str(out / "teacher_cache")
    # The online run builds the teacher for the NAS candidates and each schedule step, and writes no cache.
    online_cfg, online_loaded = runs["online"]
    assert online_loaded.count("nas:" + teacher) == 2 and online_loaded.count("trainer:" + teacher) == 2
    assert not any(r.startswith("cache:") for r in online_loaded)
    assert "teacher_cache" not in _ledger(online_cfg)


def test_full_vocabulary_cache_ends_where_the_online_run_ends(runs) -> None:
    online, cached = Path(runs["online"][0].output), Path(runs["cached"][0].output)
    a = json.loads((online / "step1" / "nas" / "nas.json").read_text())
    b = json.loads((cached / "step1" / "nas" / "nas.json").read_text())
    assert a["best"] == b["best"]
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["name"] == y["name"]
        assert x["loss_pruned"] == y["loss_pruned"]
        if "loss_short_kd" in x:
            assert y["loss_short_kd"] == pytest.approx(x["loss_short_kd"], rel=1e-5)
    ledger_a, ledger_b = _ledger(runs["online"][0]), _ledger(runs["cached"][0])
    for step in ("step1", "step2"):
        steps_a = [json.loads(line) for line in (online / step / "distill" / "metrics.jsonl").read_text().splitlines()]
        steps_b = [json.loads(line) for line in (cached / step / "distill" / "metrics.jsonl").read_text().splitlines()]
        kd_a, kd_b = [m["kd"] for m in steps_a if "kd" in m], [m["kd"] for m in steps_b if "kd" in m]
        assert len(kd_a) == len(kd_b) == 2
        assert kd_b == pytest.approx(kd_a, rel=1e-5)
        key = f"{step}.eval_distilled"
        assert ledger_b[key]["result"]["loss"] == pytest.approx(ledger_a[key]["result"]["loss"], rel=1e-5)
        wa = load_file(online / step / "distill" / "final" / "model.safetensors")
        wb = load_file(cached / step / "distill" / "final" / "model.safetensors")
        assert wa.keys() == wb.keys()
        # Per tensor, not per element: after Adam steps a weight whose gradient is near zero moves by up to lr on
        # a rounding difference (the NAS winner's short distillation, then two chained steps of two).
        for name in wa:
            diff = ((wb[name] - wa[name]).norm() / wa[name].norm()).item()
            assert diff < 1e-3, (name, diff)


def test_rerun_skips_the_cache_stage(runs, monkeypatch, capsys) -> None:
    cfg, _ = runs["cached"]
    index = Path(cfg.output) / "teacher_cache" / "index.json"
    before = index.stat().st_mtime_ns
    capsys.readouterr()
    loaded = _run(cfg, monkeypatch)
    printed = capsys.readouterr().out
    assert "[run] teacher_cache: finished before, skipped" in printed
    assert loaded == [] and index.stat().st_mtime_ns == before


def test_nas_stage_with_auto_writes_its_own_cache_and_reads_it(runs, inputs, tmp_path, monkeypatch) -> None:  # noqa: F811
    """The ``nas`` stage alone: the run's search again, with its own cache of the 4 windows the short
    distillations read; the same ranking and losses as the online search within the run."""
    from nemo_minitron.stages import run_stage

    cfg, _ = runs["online"]
    run = Path(cfg.output)
    raw = _ledger(cfg)["step1.nas"]["config"]
    raw["output"] = str(tmp_path / "nas")
    raw["distill"]["teacher_cache"] = {"top_k": VOCAB, "dtype": "float32"}
    config = NASStageConfig.model_validate(raw)
    try:
        summary = run_stage("nas", config)
    finally:
        destroy_state()
    index = json.loads((tmp_path / "nas" / "teacher_cache" / "index.json").read_text())
    assert index["windows"] == 4 and summary["teacher_cache"] == str(tmp_path / "nas" / "teacher_cache")
    online = json.loads((run / "step1" / "nas" / "nas.json").read_text())
    assert summary["best"] == online["best"]
    for x, y in zip(online["candidates"], summary["candidates"]):
        if "loss_short_kd" in x:
            assert y["loss_short_kd"] == pytest.approx(x["loss_short_kd"], rel=1e-5)


@pytest.mark.parametrize("distill, message", [
    ({"loss": {"logits": {"temperature": 2.0}}}, "divergence forward_kl at temperature 1"),
    ({"loss": {"logits": {"divergence": "reverse_kl"}}}, "divergence forward_kl at temperature 1"),
    ({"loss": {"intermediate": {"pairs": [{"student_layer": 1, "teacher_layer": 1}]}}},
     "loss.intermediate needs the teacher's hidden states"),
    ({"loss": {"logits": {"top_k": 8}}}, "set teacher_cache.top_k instead of loss.logits.top_k"),
])
def test_run_and_nas_refuse_a_loss_the_cache_cannot_give(distill, message) -> None:
    run = {"output": "x", "teacher": "t", "data": {"input": "c"}, "schedule": [{"params": 0.5, "kd_tokens": 64}],
           "nas": {"search": {"hidden_size": [32]}}, "distill": {**distill, "teacher_cache": "auto"}}
    nas = {"model": "m", "teacher": "t", "data": "d", "output": "o", "params": 0.5,
           "nas": {"search": {"hidden_size": [32]}}, "calibration": {"data": "d"},
           "distill": {**distill, "teacher_cache": "auto"}}
    for cls, raw in ((RunConfig, run), (NASStageConfig, nas)):
        with pytest.raises(Exception, match=message):
            cls.model_validate(raw)
        raw["distill"].pop("teacher_cache")
        cls.model_validate(raw)  # the same loss online is accepted


def test_teacher_cache_is_auto_a_mapping_or_null(tmp_path) -> None:
    base = {"output": "x", "teacher": "t", "data": {"input": "c"}, "schedule": [{"params": 0.5, "kd_tokens": 64}],
            "nas": {"search": {"hidden_size": [32]}}}
    assert RunConfig.model_validate(base).distill.teacher_cache is None
    auto = RunConfig.model_validate({**base, "distill": {"teacher_cache": "auto"}}).distill.teacher_cache
    assert (auto.top_k, auto.tail, auto.dtype) == (64, "bucket", "bfloat16")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**base, "distill": {"teacher_cache": "yes"}}))
    with pytest.raises(UserError, match="distill.teacher_cache: .*give auto, a mapping"):
        load_config(RunConfig, path)


def test_cache_is_written_from_the_corrected_teacher(inputs, tmp_path, monkeypatch) -> None:  # noqa: F811
    path = tiny_run(inputs, tmp_path / "corrected", teacher_correction={"tokens": 64},
                    schedule=[{"target": {"hidden_size": 48}, "kd_tokens": 64}],
                    report={"generation_tokens": 0, "chat_tokens": 0})
    cfg = yaml.safe_load(path.read_text())
    cfg["distill"]["teacher_cache"] = {"top_k": 8}
    path.write_text(yaml.safe_dump(cfg))
    run = load_config(RunConfig, path)
    loaded = _run(run, monkeypatch)
    out = Path(run.output)
    corrected = out / "teacher_correction" / "final"
    stages = list(_ledger(run))
    assert stages.index("teacher_correction") < stages.index("teacher_cache") < stages.index("step1.distill")
    index = json.loads((out / "teacher_cache" / "index.json").read_text())
    assert index["teacher"]["path"] == str(corrected.absolute())
    assert (index["windows"], index["top_k"], index["dtype"]) == (4, 8, "bfloat16")
    assert loaded.count(f"cache:{corrected}") == 1 and f"trainer:{corrected}" not in loaded


def test_run_refuses_a_cache_top_k_beyond_the_vocabulary_before_any_work(inputs, tmp_path) -> None:  # noqa: F811
    from nemo_minitron.pipeline.run import validate

    run = _config(inputs, tmp_path / "too_wide", {"top_k": VOCAB + 1})
    with pytest.raises(UserError, match=f"^distill.teacher_cache.top_k {VOCAB + 1} exceeds the teacher's vocabulary"):
        validate(run)
    assert not (tmp_path / "too_wide").exists()
