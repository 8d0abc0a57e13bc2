"""Weight correction (``correction: lsq``) against a dense reference: the activations that ``linear_fc2`` and
``linear_proj`` read, captured from transformers' model of the same checkpoint, and numpy's float64 least squares
on them; ``correction: none`` is the plain slice; TP=2, PP=2 and DP=2 re-fit what TP=1 does."""

from __future__ import annotations

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
from nemo_minitron.prune.stage import cut, score

# 4 heads in 2 groups -> 2 groups of 1 head, 96 -> 64 neurons, 64 -> 48 channels, 4 -> 3 layers.
TARGET = PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=2, drop_layers=[2])
DAMPING = 0.01


def calibration(vocab: int, n: int = 4, b: int = 4, s: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, s + 1), generator=gen) for _ in range(n)]


def hf_inputs(path, batches: list[torch.Tensor]) -> dict[tuple[int, str], np.ndarray]:
    """float64 [tokens, n] inputs of every layer's down_proj (fc2) and o_proj (proj), from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen: dict[tuple[int, str], list] = {}
    for i, layer in enumerate(model.model.layers):
        for kind, module in (("fc2", layer.mlp.down_proj), ("proj", layer.self_attn.o_proj)):
            module.register_forward_pre_hook(
                lambda _m, args, key=(i, kind): seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            )
    with torch.no_grad():
        for batch in batches:
            model(batch[:, :-1])
    return {k: torch.cat(v).double().numpy() for k, v in seen.items()}


def kept_columns(sel: dict, layer: int, kind: str, hpg: int, d: int) -> np.ndarray:
    if kind == "fc2":
        return np.array(sel["neurons"][str(layer)])
    heads = [g * hpg + j for g, js in zip(sel["query_groups"][str(layer)], sel["heads"][str(layer)]) for j in js]
    return np.array([h * d + k for h in heads for k in range(d)])


def reference_refit(x: np.ndarray, w: np.ndarray, keep: np.ndarray, damping: float) -> np.ndarray:
    """argmin ||X W^T - X_K V^T||^2 + lam ||V - W_K||^2 as one stacked least-squares problem (numpy lstsq)."""
    lam = damping * (x**2).sum(0).mean()
    a = np.vstack([x[:, keep], np.sqrt(lam) * np.eye(len(keep))])
    b = np.vstack([x @ w.T, np.sqrt(lam) * w[:, keep].T])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


HF_NAMES = {"fc2": "mlp.down_proj.weight", "proj": "self_attn.o_proj.weight"}
LINEAR = {"fc2": "mlp.linear_fc2.weight", "proj": "self_attention.linear_proj.weight"}


def test_corrected_weights_equal_a_dense_least_squares_solve(tiny_hf_dirs, single_rank):
    src = tiny_hf_dirs["untied"]
    loaded = io.load_model(str(src))
    batches = calibration(loaded.cfg.vocab_size)
    hpg, d = loaded.cfg.heads_per_group, loaded.cfg.kv_channels
    lsq, report = prune(loaded, TARGET, batches, correction="lsq", damping=DAMPING)
    plain, plain_report = prune(io.load_model(str(src)), TARGET, batches)
    assert report["selection"] == plain_report["selection"]
    assert (report["correction"], report["correction_damping"]) == ("lsq", DAMPING)
    sel = report["selection"]
    ch = np.array(sel["channels"])
    x = hf_inputs(src, batches)
    hf = {k: v.double().numpy() for k, v in load_file(src / "model.safetensors").items()}
    got, sliced = gather_canonical(lsq.model, lsq.cfg), gather_canonical(plain.model, plain.cfg)
    for new, old in enumerate(sel["layers"]):
        for kind in ("fc2", "proj"):
            w = hf[f"model.layers.{old}.{HF_NAMES[kind]}"][ch]
            keep = kept_columns(sel, old, kind, hpg, d)
            key = f"decoder.layers.{new}.{LINEAR[kind]}"
            # none: the teacher's weight sliced, bit for bit.
            np.testing.assert_array_equal(sliced[key].double().numpy(), w[:, keep])
            ref = reference_refit(x[(old, kind)], w, keep, DAMPING)
            np.testing.assert_allclose(got[key].double().numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            # The re-fit moved the weights by much more than that tolerance.
            assert np.abs(ref - w[:, keep]).max() > 100 * 1e-4 * np.abs(ref).max()
            # It reconstructs the unpruned layer's output on the calibration inputs better than the slice.
            target = x[(old, kind)] @ w.T
            err_lsq = np.linalg.norm(target - x[(old, kind)][:, keep] @ got[key].double().numpy().T)
            err_none = np.linalg.norm(target - x[(old, kind)][:, keep] @ w[:, keep].T)
            assert err_lsq < err_none, (key, err_lsq, err_none)
    # Every other tensor is the plain slice.
    for key, value in sliced.items():
        if not key.endswith((LINEAR["fc2"], LINEAR["proj"])):
            assert torch.equal(got[key], value), key
    # And the whole pruned model's logits are closer to the teacher's on the calibration tokens.
    ids = torch.cat(batches)[:, :-1]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)

    def kl_to_teacher(model) -> float:
        with torch.no_grad():
            t = torch.log_softmax(loaded.model(ids, pos, None)[..., :256].float(), -1)
            s = torch.log_softmax(model(ids, pos, None)[..., :256].float(), -1)
        return (t.exp() * (t - s)).sum(-1).mean().item()

    assert kl_to_teacher(lsq.model) < kl_to_teacher(plain.model)


def test_a_layer_that_loses_no_unit_keeps_its_weights(tiny_hf_dirs, single_rank):
    """All heads kept: linear_proj is only sliced by channel, with or without correction."""
    src = tiny_hf_dirs["tied"]
    loaded = io.load_model(str(src))
    target = PruneTarget(hidden_size=56, ffn_hidden_size=80)
    lsq, report = prune(loaded, target, calibration(loaded.cfg.vocab_size), correction="lsq", damping=DAMPING)
    hf = load_file(src / "model.safetensors")
    got = gather_canonical(lsq.model, lsq.cfg)
    ch = torch.tensor(report["selection"]["channels"])
    for i in range(4):
        assert torch.equal(got[f"decoder.layers.{i}.{LINEAR['proj']}"], hf[f"model.layers.{i}.{HF_NAMES['proj']}"][ch])
        assert not torch.equal(got[f"decoder.layers.{i}.{LINEAR['fc2']}"],
                               hf[f"model.layers.{i}.{HF_NAMES['fc2']}"][ch][:, report["selection"]["neurons"][str(i)]])


def test_large_damping_gives_back_the_plain_slice(tiny_hf_dirs, single_rank):
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    scored = score(loaded, calibration(loaded.cfg.vocab_size), grams=True)
    plain, _ = cut(loaded, scored, TARGET, calibration_loss=False)
    damped, _ = cut(loaded, scored, TARGET, calibration_loss=False, correction="lsq", damping=1e9)
    for key, value in gather_canonical(plain.model, plain.cfg).items():
        torch.testing.assert_close(gather_canonical(damped.model, damped.cfg)[key], value, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"score\(\.\.\., grams=True\)"):
        cut(loaded, score(loaded, calibration(loaded.cfg.vocab_size, n=1)), TARGET, correction="lsq")


def test_grams_that_cannot_fit_are_refused_before_the_pass(tiny_hf_dirs, single_rank, monkeypatch):
    loaded = io.load_model(str(tiny_hf_dirs["untied"]))
    need = corr_lib.gram_bytes(loaded.cfg, 1, 1, 1)
    # 4 layers x (96^2 + 64^2) float64 row blocks, 8 owned Grams and 2 in flight of at most 96^2.
    assert need == 8 * (4 * (96**2 + 64**2) + 8 * 96**2 + 2 * 96**2)
    assert corr_lib.gram_bytes(loaded.cfg, 2, 2, 1) == 8 * (2 * (96**2 + 64**2) / 2 + 2 * 96**2 + 2 * 96**2)
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
