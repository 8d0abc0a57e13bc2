"""Weight correction (``correction: lsq``) against a dense reference: the activations that the re-fit linear layers
read (and, for a removed layer's map, the MLP output and residual stream around it), captured from transformers'
model of the same checkpoint, and numpy's float64 least squares on them; ``correction: none`` is the plain slice;
TP=2, PP=2 and DP=2 re-fit what TP=1 does (with PP=2, a removed layer's map spans the two stages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nemo_minitron.checkpoint import io
from nemo_minitron.config import build_config
from nemo_minitron.errors import UserError
from nemo_minitron.parallel import state
from nemo_minitron.parallel.sharding import gather_canonical
from nemo_minitron.prune import PruneTarget, prune
from nemo_minitron.prune import correction as corr_lib
from nemo_minitron.prune import importance as imp_lib
from nemo_minitron.prune.config import PruneConfig
from nemo_minitron.prune.stage import calibration_batches, cut, score

# 4 heads in 2 groups -> 2 groups of 1 head, 96 -> 64 neurons, 64 -> 48 channels, 4 -> 3 layers.
TARGET = PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=2, drop_layers=[2])
DAMPING = 0.01


def calibration(vocab: int, n: int = 4, b: int = 4, s: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, s + 1), generator=gen) for _ in range(n)]


def hf_inputs(path, batches: list[torch.Tensor]) -> dict[tuple[int, str], np.ndarray]:
    """float64 [tokens, n] inputs of every layer's q_proj (= k_proj, v_proj), o_proj, gate_proj (= up_proj) and
    down_proj, from transformers' model of the checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen: dict[tuple[int, str], list] = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "o_proj"):
            getattr(layer.self_attn, name).register_forward_pre_hook(
                lambda _m, args, key=(i, name): seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            )
        for name in ("gate_proj", "down_proj"):
            getattr(layer.mlp, name).register_forward_pre_hook(
                lambda _m, args, key=(i, name): seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            )
    with torch.no_grad():
        for batch in batches:
            model(batch[:, :-1])
    return {k: torch.cat(v).double().numpy() for k, v in seen.items()}


def hf_norm_energy(path, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Each RMS norm's [h] sum over the tokens of (x_c / rms(x))^2 of its input, in transformers' names (numpy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen: dict[str, list] = {}
    for name, module in model.named_modules():
        if name.endswith("layernorm") or name == "model.norm":
            module.register_forward_pre_hook(lambda _m, args, key=f"{name}.weight": seen.setdefault(key, []).append(
                args[0].reshape(-1, args[0].shape[-1]).double().numpy()))
    with torch.no_grad():
        for batch in batches:
            model(batch[:, :-1])
    eps = model.config.rms_norm_eps
    energy = {}
    for key, parts in seen.items():
        x = np.concatenate(parts)
        energy[key] = (x**2 / ((x**2).mean(1, keepdims=True) + eps)).sum(0)
    return energy


def hf_run_map(path, batches: list[torch.Tensor], before: int, last: int, damping: float) -> np.ndarray:
    """The map T [hidden, hidden] of the run of removed layers ``before + 1 .. last``, as one stacked numpy least
    squares problem on transformers' activations: M T ~ M + Y' - Y with M the output of layer ``before``'s MLP,
    Y that layer's output and Y' the run's, damped toward T = I."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mlp, ys, ends = [], [], []
    model.model.layers[before].mlp.register_forward_hook(lambda _m, _a, out: mlp.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        for batch in batches:
            hidden = model(batch[:, :-1], output_hidden_states=True).hidden_states  # [embeddings, layer 0, ...]
            ys.append(hidden[before + 1].reshape(mlp[-1].shape))
            ends.append(hidden[last + 1].reshape(mlp[-1].shape))
    m, y, end = (torch.cat(t).double().numpy() for t in (mlp, ys, ends))
    lam, eye = damping * (m**2).sum(0).mean(), np.eye(m.shape[1])
    a = np.vstack([m, np.sqrt(lam) * eye])
    b = np.vstack([m + end - y, np.sqrt(lam) * eye])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def reference_refit(x: np.ndarray, w: np.ndarray, keep: np.ndarray, damping: float) -> np.ndarray:
    """argmin ||X W^T - X_K V^T||^2 + lam ||V - W_K||^2 as one stacked least-squares problem (numpy lstsq)."""
    lam = damping * (x**2).sum(0).mean()
    a = np.vstack([x[:, keep], np.sqrt(lam) * np.eye(len(keep))])
    b = np.vstack([x @ w.T, np.sqrt(lam) * w[:, keep].T])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


def problems(sel: dict, old: int, hpg: int, d: int) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(HF linear, the HF module whose input it reads, kept output rows, kept inputs) of layer ``old``."""
    ch = np.array(sel["channels"])
    groups = sel["query_groups"][str(old)]
    heads = [g * hpg + j for g, js in zip(groups, sel["heads"][str(old)]) for j in js]
    head_cols = np.array([h * d + k for h in heads for k in range(d)])
    group_rows = np.array([g * d + k for g in groups for k in range(d)])
    n = np.array(sel["neurons"][str(old)])
    return [
        ("self_attn.q_proj", "q_proj", head_cols, ch),
        ("self_attn.k_proj", "q_proj", group_rows, ch),
        ("self_attn.v_proj", "q_proj", group_rows, ch),
        ("self_attn.o_proj", "o_proj", ch, head_cols),
        ("mlp.gate_proj", "gate_proj", n, ch),
        ("mlp.up_proj", "gate_proj", n, ch),
        ("mlp.down_proj", "down_proj", ch, n),
    ]


def test_corrected_weights_equal_a_dense_least_squares_solve(tiny_hf_dirs, single_rank, tmp_path):
    """Every linear layer that reads pruned heads, neurons or channels, re-fit; compared in transformers'
    layout (the pruned models exported), against numpy on activations captured by transformers."""
    src = tiny_hf_dirs["untied"]
    loaded = io.load_model(str(src))
    batches = calibration(loaded.cfg.vocab_size)
    hpg, d = loaded.cfg.heads_per_group, loaded.cfg.kv_channels
    lsq, report = prune(loaded, TARGET, batches, correction="lsq", damping=DAMPING)
    plain, plain_report = prune(io.load_model(str(src)), TARGET, batches)
    assert report["selection"] == plain_report["selection"]
    assert (report["correction"], report["correction_damping"]) == ("lsq", DAMPING)
    io.export_hf(lsq, tmp_path / "lsq")
    io.export_hf(plain, tmp_path / "plain")
    got, sliced = load_file(tmp_path / "lsq/model.safetensors"), load_file(tmp_path / "plain/model.safetensors")
    sel = report["selection"]
    x = hf_inputs(src, batches)
    hf = {k: v.double().numpy() for k, v in load_file(src / "model.safetensors").items()}
    # Removed layer 2 is replaced by a map merged into layer 1's down projection, before its re-fit.
    assert report["layer_maps"] == [1] and plain_report["layer_maps"] == []
    t = hf_run_map(src, batches, 1, 2, DAMPING)
    assert np.abs(t - np.eye(len(t))).max() > 1e-2
    mapped = {**hf, "model.layers.1.mlp.down_proj.weight": t.T @ hf["model.layers.1.mlp.down_proj.weight"]}
    refit = set()
    for new, old in enumerate(sel["layers"]):
        for linear, reads, rows, keep in problems(sel, old, hpg, d):
            key = f"model.layers.{new}.{linear}.weight"
            # none: the teacher's weight sliced, bit for bit.
            plain_w = hf[f"model.layers.{old}.{linear}.weight"][rows]
            np.testing.assert_array_equal(sliced[key].double().numpy(), plain_w[:, keep])
            w = mapped[f"model.layers.{old}.{linear}.weight"][rows]
            ref = reference_refit(x[(old, reads)], w, keep, DAMPING)
            np.testing.assert_allclose(got[key].double().numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                       err_msg=key)
            # The re-fit moved the weights by much more than that tolerance.
            assert np.abs(ref - w[:, keep]).max() > 100 * 1e-4 * np.abs(ref).max(), key
            # It reconstructs the unpruned layer's output on the calibration inputs better than the slice.
            target = x[(old, reads)] @ w.T
            err_lsq = np.linalg.norm(target - x[(old, reads)][:, keep] @ got[key].double().numpy().T)
            err_none = np.linalg.norm(target - x[(old, reads)][:, keep] @ w[:, keep].T)
            assert err_lsq < err_none, (key, err_lsq, err_none)
            refit.add(key)
    # Each RMS norm is the plain slice times sqrt(f h / h'), f the kept channels' share of its normalised input's
    # energy on the calibration tokens; every other tensor (embeddings, output layer) is the plain slice.
    assert set(got) == set(sliced) and len(refit) == 7 * 3
    energy = hf_norm_energy(src, batches)
    h, kept = loaded.cfg.hidden_size, TARGET.hidden_size
    ch = np.array(sel["channels"])
    norms = {f"model.layers.{new}.{name}.weight": f"model.layers.{old}.{name}.weight"
             for new, old in enumerate(sel["layers"]) for name in ("input_layernorm", "post_attention_layernorm")}
    norms["model.norm.weight"] = "model.norm.weight"
    assert plain_report["norm_scales"] == {} and len(report["norm_scales"]) == len(norms) == 2 * 3 + 1
    for key in set(sliced) - refit:
        if key in norms:
            e = energy[norms[key]]
            scale = np.sqrt(e[ch].sum() / e.sum() * h / kept)
            assert scale != 1 and scale < np.sqrt(h / kept), key
            np.testing.assert_allclose(got[key].double().numpy(), sliced[key].double().numpy() * scale, rtol=1e-5,
                                       err_msg=key)
        else:
            assert torch.equal(got[key], sliced[key]), key
    # And the whole pruned model's logits are closer to the teacher's on the calibration tokens.
    ids = torch.cat(batches)[:, :-1]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)

    def kl_to_teacher(model) -> float:
        with torch.no_grad():
            t = torch.log_softmax(loaded.model(ids, pos, None)[..., :256].float(), -1)
            s = torch.log_softmax(model(ids, pos, None)[..., :256].float(), -1)
        return (t.exp() * (t - s)).sum(-1).mean().item()

    assert kl_to_teacher(lsq.model) < kl_to_teacher(plain.model)


def test_a_layer_that_loses_no_input_keeps_its_weights(tiny_hf_dirs, single_rank):
    """All heads and channels kept: linear_proj, linear_qkv and linear_fc1 are only sliced (by their kept rows),
    while linear_fc2, which loses neurons, is re-fit."""
    src = tiny_hf_dirs["tied"]
    loaded = io.load_model(str(src))
    plain, _ = prune(loaded, PruneTarget(ffn_hidden_size=80), calibration(loaded.cfg.vocab_size))
    lsq, _ = prune(loaded, PruneTarget(ffn_hidden_size=80), calibration(loaded.cfg.vocab_size), correction="lsq",
                   damping=DAMPING)
    got, sliced = gather_canonical(lsq.model, lsq.cfg), gather_canonical(plain.model, plain.cfg)
    for key, value in sliced.items():
        assert torch.equal(got[key], value) != key.endswith("linear_fc2.weight"), key


def test_large_damping_gives_back_the_plain_slice(tiny_hf_dirs, single_rank):
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    scored = score(loaded, calibration(loaded.cfg.vocab_size), grams=True)
    plain, _ = cut(loaded, scored, TARGET, calibration_loss=False)
    damped, report = cut(loaded, scored, TARGET, calibration_loss=False, correction="lsq", damping=1e9)
    # The RMS norms' rescale takes no damping: they are the plain slice times their factor (by source name).
    layers, scales = report["selection"]["layers"], report["norm_scales"]
    assert len(scales) == 2 * len(layers) + 1

    def source(key: str) -> str:
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            parts[2] = str(layers[int(parts[2])])
        return ".".join(parts)

    for key, value in gather_canonical(plain.model, plain.cfg).items():
        expected = value * scales[source(key)] if source(key) in scales else value
        torch.testing.assert_close(gather_canonical(damped.model, damped.cfg)[key], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"score\(\.\.\., grams=True\)"):
        cut(loaded, score(loaded, calibration(loaded.cfg.vocab_size, n=1)), TARGET, correction="lsq")


def test_a_rescaled_norm_gives_the_kept_channels_of_the_unpruned_norm(tiny_hf_dirs, single_rank):
    """When the removed channels carried no energy on the calibration set, the factor is sqrt(h / h') and the
    sliced RMS norm times it outputs, on such inputs, the kept channels of the teacher's norm (numpy); channels of
    equal energy give 1."""
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    h, keep = loaded.cfg.hidden_size, torch.arange(0, 64, 2)
    energy = torch.zeros(h, dtype=torch.float64)
    energy[keep] = torch.rand(len(keep), dtype=torch.float64) + 0.5
    scales = corr_lib.norm_scales({"a": energy, "b": torch.ones(h, dtype=torch.float64)}, keep)
    assert scales["a"] == pytest.approx(np.sqrt(h / len(keep)), rel=1e-12) and scales["b"] == pytest.approx(1.0)
    norm = loaded.model.decoder.layers[0].input_layernorm
    x = np.zeros((5, h))
    x[:, keep] = np.random.default_rng(0).normal(size=(5, len(keep)))
    g = norm.weight.detach().double().numpy()
    expected = (x / np.sqrt((x**2).mean(-1, keepdims=True) + loaded.cfg.norm_eps) * g)[:, keep]
    sliced = torch.nn.RMSNorm(len(keep), eps=loaded.cfg.norm_eps, dtype=torch.float64)
    with torch.no_grad():
        sliced.weight.copy_(norm.weight[keep] * scales["a"])
        got = sliced(torch.tensor(x[:, keep])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_grams_that_cannot_fit_are_refused_before_the_pass(tiny_hf_dirs, single_rank, monkeypatch):
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    need = corr_lib.gram_bytes(loaded.cfg, 1, 1, 1)
    # The estimate covers what one rank holds: 4 layers x (96^2 + 64^2 + 2 x 64^2) float64 at TP=1.
    held = sum(g.numel() * g.element_size() for g in score(loaded, calibration(256, n=1), grams=True).grams.values())
    assert held == 8 * 4 * (96**2 + 64**2 + 2 * 64**2) <= need
    assert corr_lib.gram_bytes(loaded.cfg, 2, 1, 1) < need and corr_lib.gram_bytes(loaded.cfg, 1, 2, 1) < need
    monkeypatch.setattr(corr_lib, "free_bytes", lambda: need - 1)
    monkeypatch.setattr(imp_lib, "activation_importance", lambda *a, **k: pytest.fail("calibration pass ran"))
    with pytest.raises(UserError, match=r"^correction lsq needs about 0\.0 GiB per rank .* use more TP/PP ranks"):
        prune(loaded, TARGET, calibration(loaded.cfg.vocab_size), correction="lsq")


def test_damping_must_be_positive():
    base = dict(model="m", output="o", target={"hidden_size": 8}, calibration={"data": "d"})
    assert build_config(PruneConfig, {**base, "correction": "lsq"}).correction_damping == 0.01
    with pytest.raises(UserError, match="correction_damping"):
        build_config(PruneConfig, {**base, "correction": "lsq", "correction_damping": 0})
    with pytest.raises(UserError, match="correction"):
        build_config(PruneConfig, {**base, "correction": "obs"})


# ------------------------------------------------------------------------- the same re-fit at TP / PP / DP


def _refit_on_ranks(src: str, tp: int, pp: int) -> dict | None:
    state.initialize(state.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    loaded = io.load_model(src)
    batches = calibration(loaded.cfg.vocab_size)
    # Data-parallel ranks calibrate on their own share of the same batches.
    mine = batches[state.dp_rank()::state.dp_size()]
    # Two layers stay, so that the pruned model splits into two pipeline stages too.
    target = TARGET.model_copy(update={"drop_layers": [0, 2]})
    pruned, report = prune(loaded, target, mine, correction="lsq", damping=DAMPING)
    # Layer 0 has no layer before it; layer 2's map goes into layer 1 (on the other stage at PP=2).
    assert report["layer_maps"] == [1]
    canonical = gather_canonical(pruned.model, pruned.cfg)
    if canonical is None:
        return None
    return {"selection": report["selection"], "canonical": {k: v.numpy() for k, v in canonical.items()}}


@pytest.mark.parametrize("tp, pp, world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)])
def test_tp2_pp2_and_dp2_refit_what_tp1_does(tiny_hf_dirs, tp, pp, world):
    src = str(tiny_hf_dirs["untied"])
    ref = state.spawn(_refit_on_ranks, 1, src, 1, 1)[0]
    got = state.spawn(_refit_on_ranks, world, src, tp, pp)[0]
    assert got["selection"] == ref["selection"]
    for key, value in ref["canonical"].items():
        np.testing.assert_allclose(got["canonical"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------- the bench's correction table


def test_correction_table_reports_the_held_out_losses_of_each_pruning(tiny_hf_dirs, single_rank, tmp_path):
    """modelopt_peer --correction: each loss is transformers' loss of the exported pruned model on the windows."""
    from transformers import AutoModelForCausalLM

    from nemo_minitron.bench.scripts import modelopt_peer
    from nemo_minitron.prune import ImportanceConfig

    src = tiny_hf_dirs["untied"]
    loaded = io.load_model(str(src))
    batches = calibration(loaded.cfg.vocab_size)
    windows = list(torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(3)))
    table = modelopt_peer.correction_table(loaded, batches, [TARGET], ImportanceConfig(), windows, 4, DAMPING)
    (row,) = table["rows"]
    assert row["target"] == TARGET.model_dump(exclude_none=True) and table["eval_windows"] == 6
    ids = torch.stack(windows)
    for name, kwargs in (("none", {}), ("lsq", {"correction": "lsq", "damping": DAMPING})):
        pruned, _ = prune(io.load_model(str(src)), TARGET, batches, **kwargs)
        io.export_hf(pruned, tmp_path / name)
        with torch.no_grad():
            loss = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)(ids, labels=ids).loss
        assert row[f"loss_{name}"] == pytest.approx(loss.item(), abs=1e-4), name
    assert len({row["loss_none"], row["loss_lsq_units"], row["loss_lsq_linears"], row["loss_lsq"]}) == 4
    assert row["gain_lsq"] == pytest.approx(row["loss_none"] - row["loss_lsq"])


@pytest.mark.parametrize("text", ["hidden_size", "hidden_size=a", "hidden=8", "hidden_size=0"])
def test_bad_also_targets_are_one_line_errors(text):
    from nemo_minitron.bench.scripts import modelopt_peer

    with pytest.raises(UserError):
        modelopt_peer.parse_target(text)
    assert modelopt_peer.parse_target("hidden_size=8,ffn_hidden_size=16") == PruneTarget(hidden_size=8,
                                                                                         ffn_hidden_size=16)


# ------------------------------------------------------------------------- benchmarks/layer_correction.py


def test_layer_correction_script_scores_none_and_the_maps_as_eval_does(tiny_hf_dirs, tmp_path):
    """The script's held-out losses are those of eval on the two students it cuts (none; lsq with the map)."""
    import importlib.util

    from nemo_minitron.evaluation.config import EvalConfig
    from nemo_minitron.evaluation.loss import windows_loss_sums
    from nemo_minitron.evaluation.stage import eval_tokens
    from test_logit_cache import _write_dataset

    spec = importlib.util.spec_from_file_location(
        "layer_correction", Path(__file__).parents[1] / "benchmarks" / "layer_correction.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = _write_dataset(tmp_path / "data", seed=0)
    src = str(tiny_hf_dirs["untied"])
    cfg = build_config(PruneConfig, dict(model=src, output=str(tmp_path / "unused"), target={"num_layers": 3},
                                         calibration={"data": str(data), "num_samples": 8, "seq_length": 32,
                                                      "micro_batch_size": 4}))
    eval_cfg = build_config(EvalConfig, dict(model=src, data=str(data), seq_length=32, micro_batch_size=4,
                                             max_windows=6))
    try:
        result = script.measure(cfg, eval_cfg, [3], tmp_path / "work", None, 0)
        (row,) = result["rows"]
        batches = calibration_batches(cfg.calibration)
        loaded = io.load_model(src)
        scored = score(loaded, batches, grams=True)
        windows = eval_tokens(eval_cfg, tiny_hf_dirs["untied"])
        for name, kwargs in (("none", {}), ("lsq", {"correction": "lsq", "damping": cfg.correction_damping})):
            pruned, report = cut(loaded, scored, PruneTarget(num_layers=3), calibration_loss=False, **kwargs)
            total, count = windows_loss_sums(pruned.model, pruned.cfg.vocab_size, windows, 4)
            assert row[f"pruned_{name}"] == pytest.approx(total / count, rel=1e-6), name
        assert row["dropped_layers"] == report["dropped_layers"] and row["mapped_layers"] == report["layer_maps"]
        assert row["gain_pruned"] == pytest.approx(row["pruned_none"] - row["pruned_lsq"])
    finally:
        state.destroy()


def test_cuts_that_drop_the_same_layers_share_one_pass_for_the_maps(tiny_hf_dirs, single_rank, monkeypatch):
    from nemo_minitron.prune import layer_map

    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    scored = score(loaded, calibration(loaded.cfg.vocab_size), grams=True)
    calls = []
    real = layer_map.layer_maps
    monkeypatch.setattr(layer_map, "layer_maps", lambda *a: calls.append(a[3]) or real(*a))
    first, _ = cut(loaded, scored, TARGET, calibration_loss=False, correction="lsq", damping=DAMPING)
    wider, _ = cut(loaded, scored, TARGET.model_copy(update={"hidden_size": 56}), calibration_loss=False,
                   correction="lsq", damping=DAMPING)
    other, _ = cut(loaded, scored, TARGET.model_copy(update={"drop_layers": [1]}), calibration_loss=False,
                   correction="lsq", damping=DAMPING)
    assert calls == [[2], [1]]
    # The shared maps give the same weights as a fresh scoring would.
    fresh, _ = cut(loaded, score(loaded, calibration(loaded.cfg.vocab_size), grams=True), TARGET,
                   calibration_loss=False, correction="lsq", damping=DAMPING)
    for key, value in gather_canonical(fresh.model, fresh.cfg).items():
        torch.testing.assert_close(gather_canonical(first.model, first.cfg)[key], value, rtol=0, atol=0)
