"""NVIDIA ModelOpt's Minitron pruning as a peer (nemo_minitron.bench.scripts.modelopt_peer), on tiny teachers.

ModelOpt's pruned model, saved as our checkpoint, reloads with the logits ModelOpt's in-memory model gives,
and it is the teacher sliced at the units it kept; our pruner and ModelOpt's reach the same target shapes on
the same calibration batches (how many kept units they share is printed, not asserted). Skipped when ModelOpt
is not installed (`make install-modelopt`; `make test-modelopt` runs these tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nemo_minitron import embedded
from nemo_minitron.bench.scripts import modelopt_peer
from nemo_minitron.checkpoint import io
from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.data.prepare import prepare_data
from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.config import EvalConfig
from nemo_minitron.evaluation.stage import evaluate
from nemo_minitron.parallel.sharding import gather_canonical
from nemo_minitron.prune import PruneTarget, prune
from nemo_minitron.prune.config import CalibrationConfig
from nemo_minitron.prune.stage import target_config

pytest.importorskip("modelopt", reason="NVIDIA ModelOpt is not installed (make install-modelopt)")

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.modelopt

# 4 query heads in 2 groups -> 1 head per group, 64 -> 48 channels, 96 -> 64 neurons, 4 -> 3 layers.
TARGET = PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_layers=3)


def calibration(vocab: int, n: int = 3, b: int = 4, s: int = 24) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (b, s + 1), generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def teacher_with_data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny teacher with the embedded tokenizer, and a prepared corpus of four plays' openings."""
    from tiny import write_tiny_hf

    root = tmp_path_factory.mktemp("modelopt_teacher")
    model = write_tiny_hf(root / "tiny", vocab_size=49152, with_tokenizer=True, seed=7)
    corpus = root / "corpus"
    corpus.mkdir()
    for play in sorted(embedded.corpus_dir().glob("comedies/*.md"))[:4]:
        (corpus / play.name).write_text(play.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    prepare_data(PrepareDataConfig(input=str(corpus), tokenizer=str(model), output_dir=str(root / "data"),
                                   valid_fraction=0.3))
    return model, root / "data"


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_saved_checkpoint_reloads_with_modelopts_logits(tiny_hf_dirs, single_rank, tmp_path, name):
    loaded = io.load_model(str(tiny_hf_dirs[name]), use_te=False)
    source, source_cfg = gather_canonical(loaded.model, loaded.cfg), loaded.cfg
    pruned, timing = modelopt_peer.modelopt_prune(loaded, TARGET, calibration(loaded.cfg.vocab_size))
    assert pruned.cfg == target_config(source_cfg, TARGET)
    assert 0 < timing["forward_loop_s"] <= timing["importance_s"]
    ids = torch.randint(0, source_cfg.vocab_size, (2, 20))
    in_memory = modelopt_peer.logits(pruned, ids)
    io.save_checkpoint(pruned, tmp_path / "student")
    reloaded = io.load_model(str(tmp_path / "student"), use_te=False)
    assert reloaded.cfg == pruned.cfg
    assert (modelopt_peer.logits(reloaded, ids) - in_memory).abs().max() <= 1e-5
    # ModelOpt's weights are the teacher's sliced at the units it kept (kept_units raises otherwise).
    kept = modelopt_peer.kept_units(source, source_cfg, gather_canonical(reloaded.model, reloaded.cfg), reloaded.cfg)
    assert len(kept.layers) == 3 and len(kept.channels) == 48
    assert all(h.shape == (2, 1) for h in kept.heads.values()) and all(len(n) == 64 for n in kept.neurons.values())


def test_ours_and_modelopt_reach_the_same_shapes(tiny_hf_dirs, single_rank):
    loaded = io.load_model(str(tiny_hf_dirs["untied"]), use_te=False)
    batches = calibration(loaded.cfg.vocab_size)
    source = gather_canonical(loaded.model, loaded.cfg)
    ours, report = prune(loaded, TARGET, batches)
    theirs, _ = modelopt_peer.modelopt_prune(loaded, TARGET, batches)
    assert ours.cfg == theirs.cfg
    shapes = {k: tuple(v.shape) for k, v in gather_canonical(ours.model, ours.cfg).items()}
    assert shapes == {k: tuple(v.shape) for k, v in gather_canonical(theirs.model, theirs.cfg).items()}
    kept = modelopt_peer.kept_units(source, loaded.cfg, gather_canonical(theirs.model, theirs.cfg), theirs.cfg)
    shared = modelopt_peer.overlap(report["selection"], kept.to_json())
    print(f"\nunits kept by ours that ModelOpt keeps too: {json.dumps(shared)}")
    assert all(0.0 <= v <= 1.0 for v in shared.values())


def test_prune_with_modelopt_writes_a_checkpoint_our_eval_reads(teacher_with_data, destroy_after, tmp_path):
    model, data = teacher_with_data
    cal = CalibrationConfig(data=str(data), num_samples=8, seq_length=32, micro_batch_size=4)
    out = tmp_path / "student"
    result = modelopt_peer.prune_with_modelopt(str(model), TARGET, cal, out)
    assert result["model_config"]["hidden_size"] == 48 and result["model_config"]["num_layers"] == 3
    assert result["params"] == io.read_model_config(out).num_params()
    assert result["reload_max_abs_diff"] <= modelopt_peer.RELOAD_TOL and result["importance_s"] > 0
    assert {"model_config.json", "tokenizer.json", "modelopt_report.json"} <= {p.name for p in out.iterdir()}
    loss = evaluate(EvalConfig(model=str(out), data=str(data), seq_length=32, max_windows=4)).loss
    assert 0 < loss < 20
    with pytest.raises(UserError, match="output directory already exists"):
        modelopt_peer.prune_with_modelopt(str(model), TARGET, cal, out)


@pytest.mark.parametrize("target, message", [
    (PruneTarget(num_query_groups=1), "ModelOpt keeps all 2 query groups"),
    (PruneTarget(drop_layers=[1]), "ModelOpt chooses the layers to drop itself"),
    (PruneTarget(hidden_size=100), "target.hidden_size 100 is larger than the source's 64"),
])
def test_targets_modelopt_cannot_prune_are_one_line_errors(tiny_hf_dirs, target, message):
    cfg = io.read_model_config(tiny_hf_dirs["untied"])
    with pytest.raises(UserError, match=message) as err:
        modelopt_peer.export_config(cfg, target)
    assert "\n" not in str(err.value)


def test_cpu_fixes_are_undone_on_exit():
    from modelopt.torch.nas.registry import DMRegistry

    before = (torch.Tensor.cuda, dist.all_gather_into_tensor)
    with modelopt_peer.modelopt_cpu_fixes():
        assert torch.nn.RMSNorm in DMRegistry
        assert dist.all_gather_into_tensor is not before[1]
    assert torch.nn.RMSNorm not in DMRegistry
    assert (torch.Tensor.cuda, dist.all_gather_into_tensor) == before


def test_cli_compares_both_pruners(teacher_with_data, tmp_path):
    model, data = teacher_with_data
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/modelopt_peer.py"), str(ROOT / "conf/prune/smollm2_width_55.yaml"),
         f"model={model}", f"calibration.data={data}", "calibration.num_samples=8", "calibration.seq_length=32",
         "calibration.micro_batch_size=4", "target.hidden_size=48", "target.ffn_hidden_size=64",
         # No dtype: resolved as prune resolves it (float32 below 1B parameters).
         "dtype=null", "--workdir", str(tmp_path / "bench"), "--repeats", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["params"]["ours"] == result["params"]["modelopt"] < result["params"]["teacher"]
    assert set(result["overlap"]) == {"layers", "channels", "heads", "neurons"}
    assert all(len(runs) == 2 for runs in result["seconds"]["runs"].values())
    assert json.loads((tmp_path / "bench/comparison.json").read_text()) == result
    assert (tmp_path / "bench/ours/model_config.json").is_file()
    assert (tmp_path / "bench/modelopt/model_config.json").is_file()
    # A target ModelOpt cannot reach stops before any compute, with one line and exit status 2.
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/modelopt_peer.py"), str(ROOT / "conf/prune/smollm2_width_55.yaml"),
         f"model={model}", f"calibration.data={data}", "target.hidden_size=48", "target.ffn_hidden_size=64",
         "target.num_attention_heads=2", "target.num_query_groups=1", "--workdir", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 2 and not (tmp_path / "bad").exists()
    assert run.stderr.strip().splitlines()[-1] == (
        "error: target.num_query_groups 1: ModelOpt keeps all 2 query groups (it prunes heads inside them)"
    )
