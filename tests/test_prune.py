"""Pruning against independent references: a model sliced by hand in Hugging Face layout, the identity,
deliberately zeroed units, transformers' own loss for depth scores, and TP=1 for TP=2 / PP=2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_minitron.checkpoint import io
from nemo_minitron.config import build_config
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.prune import ImportanceConfig, PruneTarget, prune
from nemo_minitron.prune import importance as imp_lib
from nemo_minitron.prune.config import BF16_ABOVE_PARAMS, CalibrationConfig, PruneConfig, importance_dtype
from nemo_minitron.prune.importance import Importance, _Moments, finalize, reduce_sequence
from nemo_minitron.prune.slicing import select
from nemo_minitron.prune.stage import _layers_to_drop, resolved_dtype, target_config

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def calibration(vocab: int, n: int = 3, b: int = 4, s: int = 24, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, s + 1), generator=gen) for _ in range(n)]


def megatron_logits(loaded, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return loaded.model(ids, pos, None)[..., : loaded.cfg.vocab_size].float()


def hand_sliced_hf(src: Path, out: Path, report: dict) -> Path:
    """The pruned model built directly from the source HF tensors and the chosen indices (no project code)."""
    from transformers import AutoConfig

    hf = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    sel = report["selection"]
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hpg, d = heads // groups, cfg["hidden_size"] // heads
    ch = torch.tensor(sel["channels"])
    new: dict[str, torch.Tensor] = {}
    new["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"][:, ch]
    new["model.norm.weight"] = hf["model.norm.weight"][ch]
    if "lm_head.weight" in hf:
        new["lm_head.weight"] = hf["lm_head.weight"][:, ch]
    for i, old in enumerate(sel["layers"]):
        p, q = f"model.layers.{old}.", f"model.layers.{i}."
        kept_groups = sel["query_groups"][str(old)]
        kept_heads = [g * hpg + j for g, js in zip(kept_groups, sel["heads"][str(old)]) for j in js]
        head_rows = torch.tensor([h * d + k for h in kept_heads for k in range(d)])
        group_rows = torch.tensor([g * d + k for g in kept_groups for k in range(d)])
        n = torch.tensor(sel["neurons"][str(old)])
        new[q + "self_attn.q_proj.weight"] = hf[p + "self_attn.q_proj.weight"][head_rows][:, ch]
        new[q + "self_attn.k_proj.weight"] = hf[p + "self_attn.k_proj.weight"][group_rows][:, ch]
        new[q + "self_attn.v_proj.weight"] = hf[p + "self_attn.v_proj.weight"][group_rows][:, ch]
        new[q + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"][ch][:, head_rows]
        new[q + "mlp.gate_proj.weight"] = hf[p + "mlp.gate_proj.weight"][n][:, ch]
        new[q + "mlp.up_proj.weight"] = hf[p + "mlp.up_proj.weight"][n][:, ch]
        new[q + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"][ch][:, n]
        new[q + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"][ch]
        new[q + "post_attention_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"][ch]
    tgt = report["target"]
    cfg.update(
        hidden_size=tgt["hidden_size"], intermediate_size=tgt["ffn_hidden_size"],
        num_attention_heads=tgt["num_attention_heads"], num_key_value_heads=tgt["num_query_groups"],
        num_hidden_layers=tgt["num_layers"], head_dim=d,
    )
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in new.items()}, out / "model.safetensors")
    AutoConfig.from_pretrained(out)  # the config is well-formed
    return out


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


WIDTH_AND_DEPTH = PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1,
                              drop_layers=[1])


@pytest.mark.parametrize("name", ["untied", "tied"])
@pytest.mark.parametrize("criterion", ["activation", "magnitude", "random"])
def test_pruned_model_equals_hand_sliced_reference(tiny_hf_dirs, single_rank, tmp_path, name, criterion):
    loaded = io.load_model(str(tiny_hf_dirs[name]))
    pruned, report = prune(loaded, WIDTH_AND_DEPTH, calibration(loaded.cfg.vocab_size),
                           ImportanceConfig(criterion=criterion))
    assert (pruned.cfg.hidden_size, pruned.cfg.ffn_hidden_size, pruned.cfg.num_layers) == (48, 64, 3)
    assert report["target_params"] == pruned.cfg.num_params() == sum(
        p.numel() for n, p in pruned.model.named_parameters()
        if not (pruned.cfg.tie_word_embeddings and "output_layer" in n)
    ) - (pruned.cfg.padded_vocab_size(1) - pruned.cfg.vocab_size) * 48
    ids = torch.randint(0, loaded.cfg.vocab_size, (2, 20))
    ref = hf_logits(hand_sliced_hf(tiny_hf_dirs[name], tmp_path / "hand", report), ids)
    assert (megatron_logits(pruned, ids) - ref).abs().max() <= TOL
    # The exported pruned model is a plain transformers model with the same logits.
    io.export_hf(pruned, tmp_path / "export")
    assert (hf_logits(tmp_path / "export", ids) - ref).abs().max() <= TOL


def test_pruning_to_the_source_size_is_the_identity(tiny_hf_dirs, single_rank):
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    ids = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    before = megatron_logits(loaded, ids)
    same = PruneTarget(hidden_size=loaded.cfg.hidden_size, num_layers=loaded.cfg.num_layers)
    pruned, report = prune(loaded, same, calibration(loaded.cfg.vocab_size))
    assert pruned.cfg == loaded.cfg.model_copy(update={"head_dim": loaded.cfg.kv_channels})
    assert torch.equal(megatron_logits(pruned, ids), before)
    assert report["calibration_loss_after"] == pytest.approx(report["calibration_loss_before"], abs=1e-6)


def test_zeroed_units_rank_least_important(tiny_hf_dirs, single_rank, tmp_path):
    """Zeroed v of a query group, up row of a neuron and norm weight of a channel make their outputs 0."""
    src = Path(shutil.copytree(tiny_hf_dirs["untied"], tmp_path / "zeroed"))
    w = load_file(src / "model.safetensors")
    d, layer, group, neuron, channel = 16, 2, 1, 37, 11
    w[f"model.layers.{layer}.self_attn.v_proj.weight"][group * d : (group + 1) * d] = 0
    w[f"model.layers.{layer}.mlp.up_proj.weight"][neuron] = 0
    for i in range(4):
        w[f"model.layers.{i}.input_layernorm.weight"][channel] = 0
        w[f"model.layers.{i}.post_attention_layernorm.weight"][channel] = 0
    save_file(w, src / "model.safetensors")
    loaded = io.load_model(str(src))
    target = PruneTarget(hidden_size=63, ffn_hidden_size=95, num_attention_heads=2, num_query_groups=1)
    _, report = prune(loaded, target, calibration(loaded.cfg.vocab_size))
    scores, sel = report["importance"], report["selection"]
    assert np.argmin(scores["query_groups"][layer]) == group and min(scores["query_groups"][layer]) == 0
    assert sel["query_groups"][str(layer)] == [1 - group]
    assert np.argmin(scores["neurons"][layer]) == neuron and neuron not in sel["neurons"][str(layer)]
    assert np.argmin(scores["channels"]) == channel and channel not in sel["channels"]


def test_depth_scores_match_transformers_losses(tiny_hf_dirs, single_rank, tmp_path):
    """drop_one and contiguous-block scores equal transformers' LM loss of the model with layers removed."""
    from transformers import AutoModelForCausalLM

    src = tiny_hf_dirs["untied"]
    batches = calibration(256)
    ids = torch.cat(batches)

    def hf_loss_without(drop: list[int]) -> float:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(model.model.layers) if i not in drop])
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = i
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    loaded = io.load_model(str(src))
    _, report = prune(loaded, PruneTarget(num_layers=3), batches, ImportanceConfig(depth="drop_one"))
    base = hf_loss_without([])
    assert report["calibration_loss_before"] == pytest.approx(base, abs=1e-5)
    expected = [hf_loss_without([i]) - base for i in range(4)]
    assert report["importance"]["layers"]["drop_one"] == pytest.approx(expected, abs=1e-5)
    assert report["dropped_layers"] == [int(np.argmin(expected))]

    _, report = prune(loaded, PruneTarget(num_layers=2), batches, ImportanceConfig(depth="contiguous"))
    blocks = [hf_loss_without([s, s + 1]) for s in range(3)]
    assert report["importance"]["layers"]["contiguous_block_loss_k2"] == pytest.approx(blocks, abs=1e-5)
    best = int(np.argmin(blocks))
    assert report["dropped_layers"] == [best, best + 1]
    assert report["calibration_loss_after"] == pytest.approx(blocks[best], abs=1e-5)

    _, report = prune(loaded, PruneTarget(num_layers=2), batches, ImportanceConfig(depth="block_importance"))
    bi = report["importance"]["layers"]["block_importance"]
    assert report["dropped_layers"] == sorted(np.argsort(bi, kind="stable")[:2].tolist())
    assert all(0 <= x <= 2 for x in bi)


def test_tied_scores_keep_the_lower_index_in_width_and_depth(monkeypatch):
    """One rule for every choice: among equal scores the lower index is kept, for the units width pruning
    keeps and for the layers each depth criterion removes."""
    cfg = ModelConfig(vocab_size=256, hidden_size=64, ffn_hidden_size=96, num_layers=4, num_attention_heads=4,
                      num_query_groups=2)
    target = PruneTarget(hidden_size=32, ffn_hidden_size=48, num_attention_heads=1, num_query_groups=1, num_layers=2)
    new_cfg = target_config(cfg, target)
    # Layer 0 scores highest; layers 1-3 tie, so the two removed are the last two.
    tied = torch.tensor([0.3, 0.1, 0.1, 0.1])
    scores = Importance(heads=torch.ones(4, 4), neurons=torch.ones(4, 96), channels=torch.ones(64),
                        layers={"block_importance": tied}, calibration_loss=1.0)
    monkeypatch.setattr(imp_lib, "drop_one_importance", lambda *args, **kwargs: tied)
    # Removing layers 1-2 or layers 2-3 costs the same: the later block goes.
    monkeypatch.setattr(imp_lib, "contiguous_block_losses", lambda *args, **kwargs: torch.tensor([1.5, 1.0, 1.0]))
    for depth in ("block_importance", "drop_one", "contiguous"):
        assert _layers_to_drop(None, cfg, new_cfg, target, depth, [], scores) == [2, 3], depth
    kept = select(scores, cfg, new_cfg, [0, 1])
    assert kept.channels.tolist() == list(range(32))
    assert kept.neurons[0].tolist() == list(range(48))
    assert kept.groups[0].tolist() == [0] and kept.heads[0].tolist() == [[0]]


@pytest.mark.parametrize(
    "depth, bar", [("drop_one", r"drop-one: 100%.*\| 4/4 \["), ("contiguous", r"contiguous: 100%.*\| 3/3 \[")]
)
def test_calibration_passes_show_progress_only_when_asked(tiny_hf_dirs, single_rank, capsys, depth, bar):
    """The importance pass counts its micro-batches, a depth criterion its candidate layers or blocks, each
    out of the total with an ETA on stderr; without progress nothing is printed."""
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    batches = calibration(loaded.cfg.vocab_size)
    target = PruneTarget(num_layers=2)
    capsys.readouterr()
    _, shown = prune(loaded, target, batches, ImportanceConfig(depth=depth), progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert re.search(r"importance: 100%.*\| 3/3 \[", err) and re.search(bar, err), err
    _, quiet = prune(loaded, target, batches, ImportanceConfig(depth=depth))
    assert capsys.readouterr() == ("", "")
    assert shown["importance"] == quiet["importance"] and shown["dropped_layers"] == quiet["dropped_layers"]
    # A display setting: left out of dumps, so the digests of finished prune stages in run ledgers stay valid.
    assert "progress" not in CalibrationConfig(data="prepared").model_dump()


@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("batch_agg", ["mean", "l2", "var"])
def test_aggregations_match_numpy(seq_agg, batch_agg):
    x = np.random.default_rng(0).random((7, 10, 5))  # [s, b, n], split into two batches below
    per_sample = {"mean": x.mean(0), "l2": np.sqrt((x**2).sum(0)), "var": x.var(0)}[seq_agg]  # [b, n]
    expected = {"mean": per_sample.mean(0), "l2": np.sqrt((per_sample**2).sum(0)), "var": per_sample.var(0)}[batch_agg]
    m = _Moments()
    for part in (x[:, :4], x[:, 4:]):
        m.add(reduce_sequence(torch.from_numpy(part).float(), seq_agg))
    assert finalize(m.packed(), batch_agg).numpy() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(hidden_size=65), "target.hidden_size 65 is larger than the source's 64"),
        (dict(num_attention_heads=3), "target.num_attention_heads 3 is not divisible by target.num_query_groups 2"),
        (dict(num_attention_heads=4, num_query_groups=1), "4 heads per query group, more than the source's 2"),
        (dict(drop_layers=[4]), "target.drop_layers: layer 4 does not exist"),
        (dict(drop_layers=[0, 1, 2, 3]), "removes every layer"),
        (dict(drop_layers=[0], num_layers=2), "disagrees with drop_layers"),
        (dict(num_layers=5), "target.num_layers 5 is larger than the source's 4"),
    ],
)
def test_impossible_targets_are_user_errors(tiny_hf_dirs, target, message):
    src = io.read_model_config(tiny_hf_dirs["untied"])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        target_config(src, PruneTarget(**target))


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(), "give at least one target size or drop_layers"),
        (dict(drop_layers=[]), "drop_layers: Value error, must name at least one layer"),
        (dict(drop_layers=[1, 1]), "must be distinct"),
        (dict(hidden_size=0), "hidden_size: Input should be greater than 0"),
        (dict(hiden_size=32), "hiden_size: unknown key"),
    ],
)
def test_bad_target_fields_fail_validation(target, message):
    with pytest.raises(UserError, match=message):
        build_config(PruneTarget, target)


def test_importance_passes_default_to_bf16_above_a_billion_parameters(tiny_hf_dirs):
    llama8b = ModelConfig(vocab_size=128256, hidden_size=4096, ffn_hidden_size=14336, num_layers=32,
                          num_attention_heads=32, num_query_groups=8)
    assert llama8b.num_params() == 8_030_261_248  # Llama-3.1-8B as Hugging Face counts it
    assert importance_dtype(None, llama8b.num_params()) == "bfloat16"
    assert importance_dtype("float32", llama8b.num_params()) == "float32"  # an explicit dtype wins
    assert importance_dtype(None, 134_515_008) == "float32"  # the embedded teacher
    assert importance_dtype(None, BF16_ABOVE_PARAMS) == "float32"
    cfg = build_config(PruneConfig, dict(model="m", output="o", target={"hidden_size": 8}, calibration={"data": "d"}))
    assert cfg.dtype is None
    assert resolved_dtype(None, str(tiny_hf_dirs["untied"])) == "float32"


# ------------------------------------------------------------------------- the same choice at TP / PP


def _prune_on_ranks(src: str, tp: int, pp: int) -> dict:
    state.initialize(state.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    loaded = io.load_model(src)
    target = PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=2, num_layers=2)
    pruned, report = prune(loaded, target, calibration(loaded.cfg.vocab_size))
    ids = torch.randint(0, loaded.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    from nemo_minitron.parallel.sharding import gather_canonical

    canonical = gather_canonical(pruned.model, pruned.cfg)
    return {
        "selection": report["selection"],
        "dropped": report["dropped_layers"],
        "heads": np.array(report["importance"]["heads"]),
        "neurons": np.array(report["importance"]["neurons"]),
        "channels": np.array(report["importance"]["channels"]),
        "block": np.array(report["importance"]["layers"]["block_importance"]),
        "loss_after": report["calibration_loss_after"],
        "canonical": None if canonical is None else {k: v.numpy() for k, v in canonical.items()},
        "ids": ids.numpy(),
    }


def test_tp2_and_pp2_choose_what_tp1_chooses(tiny_hf_dirs):
    src = str(tiny_hf_dirs["untied"])
    ref = state.spawn(_prune_on_ranks, 1, src, 1, 1)[0]
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        got = state.spawn(_prune_on_ranks, tp * pp, src, tp, pp)
        for rank_result in got:
            assert rank_result["selection"] == ref["selection"], (tp, pp)
            assert rank_result["dropped"] == ref["dropped"]
            for key in ("heads", "neurons", "channels", "block"):
                np.testing.assert_allclose(rank_result[key], ref[key], rtol=1e-5, atol=1e-6)
            assert rank_result["loss_after"] == pytest.approx(ref["loss_after"], abs=1e-5)
        for key, value in ref["canonical"].items():
            np.testing.assert_array_equal(got[0]["canonical"][key], value)


def _prune_memory_on_ranks(src: str, criterion: str) -> dict:
    from memory import peak_allocated

    state.initialize(state.ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    loaded = io.load_model(src)
    batches = calibration(loaded.cfg.vocab_size, n=1, b=2, s=8)
    # Width and depth: the pruned layers come from both stages of the source (layers 0-3 and 4-7) to both of the
    # pruned model's (0-2 and 3-5).
    target = PruneTarget(hidden_size=96, ffn_hidden_size=192, drop_layers=[1, 6])
    with peak_allocated() as peak:
        prune(loaded, target, batches, ImportanceConfig(criterion=criterion), calibration_loss=False)
    return {"peak": peak.bytes, "model": loaded.cfg.num_params() * 4}


@pytest.mark.parametrize("criterion", ["activation", "magnitude"])
def test_pruning_at_tp2_pp2_holds_a_shard_per_rank_not_the_model(tmp_path, criterion):
    """Each rank builds its new shard from the full source tensors it is cut from, received one at a time: its
    peak is that shard and a tensor in flight, far below the whole model that a gather would give every rank."""
    from tiny import write_tiny_hf

    src = write_tiny_hf(tmp_path / "eight", hidden_size=128, intermediate_size=256, num_hidden_layers=8, seed=6)
    for rank, got in enumerate(state.spawn(_prune_memory_on_ranks, 4, str(src), criterion)):
        assert got["peak"] < 0.7 * got["model"], (rank, got)


# ------------------------------------------------------------------------------------------ the CLI


def test_prune_cli_end_to_end(tmp_path):
    """prepare-data -> prune (writes checkpoint, importance.json/.png, report) -> eval of the pruned model."""
    from nemo_minitron import embedded
    from tiny import write_tiny_hf

    model = write_tiny_hf(tmp_path / "tiny", vocab_size=49152, with_tokenizer=True, seed=7)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for play in sorted(embedded.corpus_dir().glob("comedies/*.md"))[:4]:
        (corpus / play.name).write_text(play.read_text(encoding="utf-8")[:20000], encoding="utf-8")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nemo_minitron.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    run = cli("prepare-data", f"input={corpus}", f"tokenizer={model}", "output_dir=data", "valid_fraction=0.3")
    assert run.returncode == 0, run.stderr
    run = cli(
        "prune", str(ROOT / "conf/prune/smollm2_width_55.yaml"), f"model={model}", "output=pruned",
        "calibration.data=data", "calibration.num_samples=8", "calibration.seq_length=32",
        "calibration.micro_batch_size=4", "target.hidden_size=48", "target.ffn_hidden_size=64",
        "target.num_layers=3", "parallel.pipeline_model_parallel_size=1",
    )
    assert run.returncode == 0, run.stderr
    assert re.search(r"importance: 100%.*\| 2/2 \[", run.stderr), run.stderr  # calibration.progress is on
    summary = json.loads(run.stdout)
    out = tmp_path / "pruned"
    assert summary["target_params"] < summary["source_params"] and len(summary["dropped_layers"]) == 1
    assert {"importance.json", "importance.png", "prune_report.json", "model_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((out / "importance.json").read_text())
    assert np.array(scores["importance"]["heads"]).shape == (4, 4)
    run = cli("eval", f"model={out}", "data=data", "seq_length=32", "max_windows=4")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["loss"] == pytest.approx(summary["calibration_loss_after"], rel=0.5)
    # Refused before compute, nothing written: an existing output, and an impossible target.
    run = cli("prune", str(ROOT / "conf/prune/smollm2_width_55.yaml"), f"model={model}", "output=pruned",
              "calibration.data=data", "target.hidden_size=48", "target.ffn_hidden_size=64")
    assert run.returncode == 2 and "output directory already exists" in run.stderr
    run = cli("prune", str(ROOT / "conf/prune/smollm2_width_55.yaml"), f"model={model}", "output=other",
              "calibration.data=data", "target.hidden_size=100")
    assert run.returncode == 2 and run.stderr.strip().endswith("target.hidden_size 100 is larger than the source's 64")
    assert not (tmp_path / "other").exists()


def test_a_prune_run_in_this_process_leaves_no_model_behind(tiny_hf_dirs, tmp_path, destroy_after):
    """The source and pruned models sit in reference cycles: run_stage frees them when the stage ends (a `run`
    or `bench` runs dozens of stages in one process), not at Python's next full collection (disabled here, so
    that nothing else frees them)."""
    import gc

    from megatron.core.models.gpt import GPTModel

    from nemo_minitron.stages import run_stage
    from test_data import fake_prepared

    data = fake_prepared(tmp_path, "data", 0, 200, vocab_size=256)
    cfg = PruneConfig(model=str(tiny_hf_dirs["untied"]), output=str(tmp_path / "pruned"),
                      target=PruneTarget(hidden_size=48, ffn_hidden_size=64),
                      calibration=CalibrationConfig(data=data, num_samples=4, seq_length=16, micro_batch_size=2))
    gc.disable()
    try:
        run_stage("prune", cfg)
        assert not [o for o in gc.get_objects() if isinstance(o, GPTModel)]
    finally:
        gc.enable()


def test_export_refuses_a_hidden_size_transformers_cannot_load(tiny_hf_dirs, single_rank, tmp_path):
    """transformers' LlamaConfig requires hidden_size % num_attention_heads == 0 (even with head_dim)."""
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    pruned, _ = prune(loaded, PruneTarget(hidden_size=50), calibration(loaded.cfg.vocab_size, n=1))
    with pytest.raises(UserError, match="hidden_size 50 is not a multiple of num_attention_heads 4"):
        io.export_hf(pruned, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    io.save_checkpoint(pruned, tmp_path / "ckpt")  # the project's own format has no such limit
    from nemo_minitron.cli import main

    assert main(["export-hf", f"source={tmp_path / 'ckpt'}", f"output={tmp_path / 'export'}"]) == 2
    assert not (tmp_path / "export").exists()
