"""Tensor and pipeline parallelism on real gloo ranks (``state.spawn``): TP=2, PP=2 and TP2 x PP2 must give
the TP=1 logits, losses and gradients, and save the same canonical tensors; plus the ``eval`` CLI at TP=2.

Each layout is one spawn (several seconds each: every rank imports megatron) that runs all checks on all
models; the tests below only compare what it returned with a TP=1 run in this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DIST_ENV, destroy_state

TOL = 1e-5
# name in tiny_hf_dirs -> saved / exported by every layout (the padded one cannot be: see test_models.py)
MODELS = {"untied": True, "tied": True, "padded": False}
# layout -> (tensor_model_parallel_size, pipeline_model_parallel_size)
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
GRAD_KEYS = (
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
)


def micro_batches() -> list[torch.Tensor]:
    """Two micro-batches of tokens [2, 17] (ids < 250: valid for every tiny vocabulary)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 250, (2, 17), generator=g) for _ in range(2)]


# ------------------------------------------------------------------------------ runs on every rank


def _capture_loss_fn(vocab_size: int):
    """LM loss that also reports the full (TP-gathered) logits of the micro-batch."""
    import torch.distributed as dist

    from nemo_minitron.parallel import state
    from nemo_minitron.parallel.vocab import token_cross_entropy

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor):
        parts = [torch.empty_like(logits) for _ in range(state.tp_size())]
        dist.all_gather(parts, logits.detach().contiguous(), group=state.tp_group())
        full = torch.cat(parts, dim=-1)[..., :vocab_size]
        loss = token_cross_entropy(logits, labels, vocab_size).mean()
        # clone: megatron divides the returned loss by the number of micro-batches in place.
        return loss, {"loss": loss.detach().clone(), "logits": full}

    return loss_fn


def _run_model(source: str, out_dir: str | None) -> dict:
    """Forward-only pass (logits + losses), forward-backward pass (local grads), save and export."""
    from nemo_minitron.checkpoint import io
    from nemo_minitron.parallel.schedule import forward_backward
    from nemo_minitron.parallel.sharding import canonical_key

    loaded = io.load_model(source)
    model, cfg = loaded.model, loaded.cfg
    loss_fn = _capture_loss_fn(cfg.vocab_size)
    batches = micro_batches()

    with torch.no_grad():
        outputs = forward_backward(model, batches, loss_fn, forward_only=True)

    model.zero_grad(set_to_none=True)
    train_outputs = forward_backward(model, batches, loss_fn, forward_only=False)
    grads = {}
    for name, p in model.named_parameters():
        key = canonical_key(model, name)
        assert key is not None and p.grad is not None, name
        grads[key] = p.grad.detach().clone().numpy()

    if out_dir is not None:
        io.save_checkpoint(loaded, Path(out_dir) / "ckpt")
        io.export_hf(loaded, Path(out_dir) / "hf")
    return {
        "logits": [o["logits"].numpy() for o in outputs],
        "losses": [float(o["loss"]) for o in outputs],
        "train_losses": [float(o["loss"]) for o in train_outputs],
        "grads": grads,
    }


def run_layout(tp: int, pp: int, sources: dict[str, str], out_root: str) -> dict:
    """Everything one rank reports for one parallel layout. Results hold numpy arrays, not tensors:
    torch shares tensors between processes through file descriptors that die with the spawned rank."""
    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    try:
        report = {"tp_rank": state.tp_rank(), "pp_rank": state.pp_rank(), "models": {}}
        for name, source in sources.items():
            out = str(Path(out_root) / name) if MODELS[name] else None
            report["models"][name] = _run_model(source, out)
        return report
    finally:
        state.destroy()


# ------------------------------------------------------------------------------ results in pytest


def canonical_grads(reports: list[dict], name: str, cfg) -> dict[str, torch.Tensor]:
    """Unshard every gradient over TP; sum over the pipeline stages that hold a copy of the tensor.

    Only the tied embedding lives on two stages (input embedding on the first, output layer on the last):
    ``forward_backward`` leaves their gradients apart, as megatron does until ``finalize_model_grads``.
    """
    from nemo_minitron.parallel.sharding import unshard

    by_stage: dict[str, dict[int, dict[int, torch.Tensor]]] = {}
    for r in reports:
        for key, grad in r["models"][name]["grads"].items():
            by_stage.setdefault(key, {}).setdefault(r["pp_rank"], {})[r["tp_rank"]] = torch.from_numpy(grad)
    out = {}
    for key, stages in by_stage.items():
        per_stage = [unshard(key, [parts[t] for t in sorted(parts)], cfg) for parts in stages.values()]
        out[key] = torch.stack(per_stage).sum(0)
    return out


def last_stage_outputs(reports: list[dict], name: str) -> dict:
    """The forward results of the last stage; every TP rank there must report the same."""
    last = [r["models"][name] for r in reports if r["models"][name]["losses"]]
    assert last
    for other in last[1:]:
        assert other["losses"] == last[0]["losses"]
        for a, b in zip(other["logits"], last[0]["logits"]):
            assert np.array_equal(a, b)
    # Only the last stage computes losses.
    assert len(last) == len([r for r in reports if r["pp_rank"] == max(x["pp_rank"] for x in reports)])
    return last[0]


@pytest.fixture(scope="module")
def reference(tiny_hf_dirs, tmp_path_factory):
    """TP=PP=1 in this process: outputs, gradients and canonical tensors of every model; checkpoints."""
    from nemo_minitron.checkpoint import io
    from nemo_minitron.parallel import state
    from nemo_minitron.parallel.sharding import gather_canonical

    root = tmp_path_factory.mktemp("reference")
    state.initialize(state.ParallelConfig())
    try:
        results, canonical, cfgs = {}, {}, {}
        for name, saved in MODELS.items():
            results[name] = _run_model(str(tiny_hf_dirs[name]), str(root / name) if saved else None)
            loaded = io.load_model(str(tiny_hf_dirs[name]))
            canonical[name] = gather_canonical(loaded.model, loaded.cfg)
            cfgs[name] = loaded.cfg
    finally:
        destroy_state()
    return {"root": root, "results": results, "canonical": canonical, "cfgs": cfgs}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, reference, tiny_hf_dirs, tmp_path_factory):
    """One spawn per layout. TP=2 loads the TP=1 nemo_minitron checkpoints, the others the HF dirs."""
    from nemo_minitron.parallel import state

    tp, pp = LAYOUTS[request.param]
    sources = {name: str(tiny_hf_dirs[name]) for name in MODELS}
    if request.param == "tp2":
        sources.update({name: str(reference["root"] / name / "ckpt") for name, saved in MODELS.items() if saved})
    out_root = tmp_path_factory.mktemp(request.param)
    reports = state.spawn(run_layout, tp * pp, tp, pp, sources, str(out_root))
    assert sorted((r["pp_rank"], r["tp_rank"]) for r in reports) == [(p, t) for p in range(pp) for t in range(tp)]
    return {"name": request.param, "reports": reports, "out_root": out_root}


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_losses_match_tp1(reference, layout, name):
    ref = reference["results"][name]
    got = last_stage_outputs(layout["reports"], name)
    assert len(got["logits"]) == len(ref["logits"]) == 2
    for mb, (a, b) in enumerate(zip(got["logits"], ref["logits"])):
        assert a.shape == b.shape == (2, 16, reference["cfgs"][name].vocab_size)
        # fp32 sums in another order (TP all-reduces, split GEMMs) move logits of size ~7 by ~1e-5.
        diff, scale = np.abs(a - b).max(), max(1.0, np.abs(b).max())
        assert diff <= TOL * scale, f"{layout['name']} {name} micro-batch {mb}: max logit diff {diff:.3g}"
    for key in ("losses", "train_losses"):
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=TOL, err_msg=f"{layout['name']} {name} {key}")
    # The forward-only and training passes see the same weights.
    np.testing.assert_allclose(got["train_losses"], got["losses"], rtol=0, atol=TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_match_tp1(reference, layout, name):
    cfg = reference["cfgs"][name]
    # Unsharding one TP=1 part only cuts the padded vocabulary rows.
    ref = canonical_grads([{"tp_rank": 0, "pp_rank": 0, "models": reference["results"]}], name, cfg)
    got = canonical_grads(layout["reports"], name, cfg)
    assert sorted(got) == sorted(ref)
    for key in GRAD_KEYS:
        assert got[key].abs().max() > 1e-3, f"{key}: gradient is ~0, the comparison would prove nothing"
    for key in sorted(ref):
        assert got[key].shape == ref[key].shape, key
        diff = (got[key] - ref[key]).abs().max().item()
        assert diff <= TOL, f"{layout['name']} {name} {key}: max grad diff {diff:.3g}"


@pytest.mark.parametrize("name", [n for n, saved in MODELS.items() if saved])
def test_saved_checkpoint_equals_hf_import(reference, layout, tiny_hf_dirs, name):
    from test_models import file_tensors

    canonical = reference["canonical"][name]
    saved = file_tensors(layout["out_root"] / name / "ckpt")
    assert sorted(saved) == sorted(canonical)
    for key, value in canonical.items():
        assert torch.equal(saved[key], value), f"{layout['name']} {name} {key}"
    # The reference itself is the HF import, tensor for tensor.
    from nemo_minitron.checkpoint.hf import HFTensors, canonical_getter

    get = canonical_getter(HFTensors(tiny_hf_dirs[name]), reference["cfgs"][name])
    for key, value in canonical.items():
        assert torch.equal(get(key), value), key
    # And the HF export of the parallel run is the original checkpoint, byte for byte in its tensors.
    original, exported = file_tensors(tiny_hf_dirs[name]), file_tensors(layout["out_root"] / name / "hf")
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value), f"{layout['name']} {name} export {key}"


def test_initialize_rejects_world_not_divisible_by_tp_pp(destroy_after):
    from nemo_minitron.errors import UserError
    from nemo_minitron.parallel import state

    with pytest.raises(UserError, match="world size 1 is not divisible by TP\\*PP = 2"):
        state.initialize(state.ParallelConfig(tensor_model_parallel_size=2))


def test_initialize_again_destroys_the_groups_it_replaces(destroy_after):
    """A process that runs many stages (``run``, ``bench``) initializes megatron once per stage: the groups of
    the stage before are destroyed, not kept alive (each with its gloo threads) beside the new ones."""
    import torch.distributed.distributed_c10d as c10d

    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig())
    live = len(c10d._world.pg_map)
    for _ in range(3):
        state.initialize(state.ParallelConfig())
    assert len(c10d._world.pg_map) == live


# ------------------------------------------------------------------------------------------- CLI


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("nemo-minitron")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "nemo_minitron.cli"]


def _printed_json(stdout: str) -> dict:
    starts = [m.start() for m in re.finditer(r"^\{$", stdout, flags=re.M)]
    assert starts, f"no JSON object on stdout:\n{stdout}"
    return json.loads(stdout[starts[-1] :])


def test_cli_eval_tensor_parallel_matches_hf_backend(tmp_path):
    from nemo_minitron import embedded
    from nemo_minitron.evaluation.config import EvalConfig
    from nemo_minitron.evaluation.stage import evaluate
    from tiny import write_tiny_hf

    model = write_tiny_hf(tmp_path / "model", vocab_size=49152, with_tokenizer=True, seed=6)
    text = tmp_path / "eval.txt"
    play = sorted(embedded.corpus_dir().glob("*/*.md"))[0]
    text.write_text(play.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    # 5 windows in micro-batches of 2: two full micro-batches and a remainder of one.
    args = dict(model=str(model), data=str(text), seq_length=32, micro_batch_size=2, max_windows=5)

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run(
        _cli() + ["eval"] + [f"{k}={v}" for k, v in args.items()] + ["parallel.tensor_model_parallel_size=2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _printed_json(proc.stdout)

    ref = evaluate(EvalConfig(**args, backend="hf"))
    assert (got["windows"], got["tokens"]) == (ref.windows, ref.tokens) == (5, 5 * 31)
    assert abs(got["loss"] - ref.loss) <= 1e-5 * abs(ref.loss), (got["loss"], ref.loss)
    assert abs(got["perplexity"] - ref.perplexity) <= 1e-4 * ref.perplexity
