"""Distillation losses: FusedLogitKD against a full-softmax reference over materialised logits (loss and the
student's gradients, every divergence, temperatures 1 and 2, top-k, loss mask, padded vocabulary, with and
without CE), chunking, cross-entropy (with and without a teacher), no host synchronisation in the chunk loop,
TP=2 against TP=1 (one spawn for all options, which also checks that unweighted CE is not communicated), and
IntermediateStateLoss / balance_weight by hand.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Optional
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import destroy_state
from nemo_minitron.distill.config import IntermediateConfig, IntermediatePair, LogitKDConfig
from nemo_minitron.distill.intermediate import IntermediateStateLoss, balance_weight
from nemo_minitron.distill.losses import FusedLogitKD

# 10 tokens, 3 of them masked; 16 output-layer rows of which 13 are vocabulary: at TP=2 rank 1 holds 5 real rows
# of its 8 (fewer than top_k=6: padded top-k candidates).
T, H_S, H_T, ROWS, VOCAB = 10, 8, 12, 16, 13
MASKED = [1, 4, 5]
TOL64 = 1e-12
MODEL_INPUTS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
# name -> LogitKDConfig fields; every case runs with and without CE, in chunks of 3 tokens.
CASES = {
    "forward_kl": dict(divergence="forward_kl"),
    "forward_kl_t2": dict(divergence="forward_kl", temperature=2.0),
    "reverse_kl": dict(divergence="reverse_kl"),
    "reverse_kl_t2": dict(divergence="reverse_kl", temperature=2.0),
    "jsd": dict(divergence="jsd", jsd_beta=0.3),
    "jsd_t2": dict(divergence="jsd", jsd_beta=0.3, temperature=2.0),
    "top5": dict(top_k=5),
    "top5_t2": dict(top_k=5, temperature=2.0),
}
# name -> (LogitKDConfig fields, with a teacher)
TP_CASES = {
    "forward_kl_ce": (dict(ce_weight=0.5), True),
    "reverse_kl_t2": (dict(divergence="reverse_kl", temperature=2.0, ce_weight=0.5), True),
    "jsd": (dict(divergence="jsd", jsd_beta=0.3), True),
    "top6_t2_ce": (dict(top_k=6, temperature=2.0, ce_weight=0.5), True),
    "top6": (dict(top_k=6), True),
    "ce_only": (dict(kd_weight=0.0, ce_weight=1.0, temperature=2.0), False),
}


def make_inputs(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hidden states, full output-layer weights (all ROWS), labels and loss mask; logits have std ~2."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    mask = torch.ones(T)
    mask[MASKED] = 0
    return {
        "student_hidden": randn(T, H_S),
        "student_weight": randn(ROWS, H_S, scale=0.8),
        "teacher_hidden": randn(T, H_T),
        "teacher_weight": randn(ROWS, H_T, scale=0.8),
        "labels": torch.randint(0, VOCAB, (T,), generator=g),
        "loss_mask": mask,
    }


def reference_kd(inputs: dict[str, torch.Tensor], cfg: LogitKDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd, ce): full softmax over materialised [T, VOCAB] logits (padding rows cut off), masked token means."""
    zs = (inputs["student_hidden"] @ inputs["student_weight"].T)[:, :VOCAB]
    zt = (inputs["teacher_hidden"] @ inputs["teacher_weight"].T)[:, :VOCAB].detach()
    tau = cfg.temperature
    log_ps, log_pt = F.log_softmax(zs / tau, dim=-1), F.log_softmax(zt / tau, dim=-1)
    if cfg.top_k is not None:
        vals, idx = zt.topk(cfg.top_k, dim=-1)
        log_q = F.log_softmax(vals / tau, dim=-1)
        div = (log_q.exp() * (log_q - log_ps.gather(1, idx))).sum(-1)
    elif cfg.divergence == "forward_kl":
        div = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif cfg.divergence == "reverse_kl":
        div = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        beta = cfg.jsd_beta
        log_m = (beta * log_pt.exp() + (1 - beta) * log_ps.exp()).log()
        div = beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1)
    mask = inputs["loss_mask"].to(zs.dtype)
    ce = F.cross_entropy(zs, inputs["labels"], reduction="none")
    return tau**2 * (div * mask).sum() / mask.sum(), (ce * mask).sum() / mask.sum()


def fused_step(
    inputs: dict[str, torch.Tensor], cfg: LogitKDConfig, rank: int = 0, size: int = 1, teacher: bool = True, **overrides
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FusedLogitKD on this rank's shard of the rows, forward and backward: (its output, the leaf inputs)."""
    rows = slice(rank * ROWS // size, (rank + 1) * ROWS // size)
    leaves = {
        "student_hidden": inputs["student_hidden"].clone(),
        "student_weight": inputs["student_weight"][rows].clone(),
        "teacher_hidden": inputs["teacher_hidden"].clone(),
        "teacher_weight": inputs["teacher_weight"][rows].clone(),
    }
    for t in leaves.values():
        t.requires_grad_()
    kwargs = {"labels": inputs["labels"], "loss_mask": inputs["loss_mask"], **overrides}
    if not teacher:
        kwargs.update(teacher_hidden=None, teacher_weight=None)
    out = FusedLogitKD(cfg, VOCAB)(**{**leaves, **kwargs})
    out["loss"].backward()
    return out, leaves


def run_fused(
    inputs: dict[str, torch.Tensor], cfg: LogitKDConfig, rank: int = 0, size: int = 1, teacher: bool = True, **overrides
) -> dict:
    """:func:`fused_step` with numpy results (spawn-safe)."""
    out, leaves = fused_step(inputs, cfg, rank, size, teacher, **overrides)
    assert leaves["teacher_hidden"].grad is None and leaves["teacher_weight"].grad is None
    assert not out["kd"].requires_grad and ("ce" not in out or not out["ce"].requires_grad)
    result = {key: float(value.detach()) for key, value in out.items()}
    for key in ("hidden", "weight"):
        grad = leaves[f"student_{key}"].grad
        assert grad.dtype == leaves[f"student_{key}"].dtype
        result[f"grad_{key}"] = grad.double().numpy()  # numpy has no bf16
    return result


def reference_run(inputs: dict[str, torch.Tensor], cfg: LogitKDConfig) -> dict:
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"].clone().requires_grad_()
    kd, ce = reference_kd({**inputs, "student_hidden": hidden, "student_weight": weight}, cfg)
    loss = cfg.kd_weight * kd + cfg.ce_weight * ce
    loss.backward()
    return {
        "loss": float(loss),
        "kd": float(kd),
        "ce": float(ce),
        "grad_hidden": hidden.grad.numpy(),
        "grad_weight": weight.grad.numpy(),
    }


class _HostSyncError(AssertionError):
    pass


class _NoHostSync(TorchDispatchMode):
    """Raises on every aten op that makes the host wait for a GPU: reading a value (``item``, ``float``,
    ``bool``, ``if tensor``), ``nonzero``, ``masked_select`` and indexing with a boolean mask (which needs
    ``nonzero`` to size its result). The CPU counterpart of ``torch.cuda.set_sync_debug_mode("error")``."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select")
    INDEXING = ("index", "index_put", "index_put_")

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        name = func.overloadpacket.__name__
        boolean_index = name in self.INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if name in self.SYNCING or boolean_index:
            raise _HostSyncError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Fails on a host synchronisation inside the block; ``tolist`` copies without an aten op, so it is patched."""

    def tolist(self: torch.Tensor) -> list:
        raise _HostSyncError("host synchronisation: Tensor.tolist")

    with _NoHostSync(), mock.patch.object(torch.Tensor, "tolist", tolist):
        yield


def assert_runs_close(got: dict, ref: dict, atol: float, what: str) -> None:
    for key in ("loss", "kd") + (("ce",) if "ce" in got else ()):
        assert abs(got[key] - ref[key]) <= atol, f"{what} {key}: {got[key]!r} vs {ref[key]!r}"
    for key in ("grad_hidden", "grad_weight"):
        diff = np.abs(got[key] - ref[key]).max()
        assert diff <= atol, f"{what} {key}: max diff {diff:.3g}"


@pytest.fixture(scope="module")
def tp1():
    """megatron at TP=1 in this process for the whole module."""
    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig())
    try:
        yield
    finally:
        destroy_state()


# ------------------------------------------------------------------------------------------ logit KD


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_full_softmax_reference(tp1, name, ce_weight):
    cfg = LogitKDConfig(**CASES[name], chunk_tokens=3, kd_weight=0.7, ce_weight=ce_weight)
    inputs = make_inputs()
    got, ref = run_fused(inputs, cfg), reference_run(inputs, cfg)
    # Unweighted CE next to a teacher is not computed, so not reported.
    assert ("ce" in got) == (ce_weight > 0)
    assert_runs_close(got, ref, TOL64, name)
    assert ref["kd"] > 0.05 and np.abs(ref["grad_weight"]).max() > 1e-2, "degenerate case proves nothing"
    # Padding rows take no probability, so they get exactly no gradient.
    assert not got["grad_weight"][VOCAB:].any()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "top5"])
def test_fp32_matches_fp64_reference(tp1, name):
    cfg = LogitKDConfig(**CASES[name], chunk_tokens=3, kd_weight=0.7, ce_weight=0.3)
    inputs32 = make_inputs(torch.float32)
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs32.items()}
    assert_runs_close(run_fused(inputs32, cfg), reference_run(inputs64, cfg), 1e-6, f"{name} fp32")


def test_bf16_inputs_project_in_bf16_and_reduce_in_fp32(tp1):
    """bf16 activations: the vocabulary projections are bf16 GEMMs (what a bf16 output layer computes), the
    softmax statistics and divergences fp32. The loss equals an fp64 reference over those bf16 logits."""
    cfg = LogitKDConfig(chunk_tokens=4, ce_weight=0.3)
    inputs16 = make_inputs(torch.bfloat16)
    got = run_fused(inputs16, cfg)
    zs = (inputs16["student_hidden"] @ inputs16["student_weight"].T)[:, :VOCAB].double()
    zt = (inputs16["teacher_hidden"] @ inputs16["teacher_weight"].T)[:, :VOCAB].double()
    log_ps, log_pt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    mask = inputs16["loss_mask"].double()
    kd = ((log_pt.exp() * (log_pt - log_ps)).sum(-1) * mask).sum() / mask.sum()
    ce = (F.cross_entropy(zs, inputs16["labels"].clamp_min(0), reduction="none") * mask).sum() / mask.sum()
    assert abs(got["kd"] - float(kd)) <= 1e-5 and abs(got["ce"] - float(ce)) <= 1e-5
    assert abs(got["loss"] - float(cfg.kd_weight * kd + cfg.ce_weight * ce)) <= 1e-5
    # Against exact fp64 inputs the difference is the bf16 rounding of the logits and gradients only.
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs16.items()}
    ref = reference_run(inputs64, cfg)
    assert abs(got["loss"] - ref["loss"]) <= 2e-3 * abs(ref["loss"])
    for key in ("grad_hidden", "grad_weight"):
        assert np.abs(got[key] - ref[key]).max() <= 2e-2 * np.abs(ref[key]).max(), key


@pytest.mark.parametrize("name", ["forward_kl_t2", "reverse_kl", "jsd_t2", "top5"])
def test_chunking_does_not_change_the_result(tp1, name):
    inputs = make_inputs()
    runs = [run_fused(inputs, LogitKDConfig(**CASES[name], chunk_tokens=c, ce_weight=0.3)) for c in (3, T, 64)]
    for other in runs[1:]:
        assert_runs_close(runs[0], other, 1e-12, f"{name} chunked vs unchunked")


def test_cross_entropy_equals_torch(tp1):
    inputs = make_inputs()
    logits = (inputs["student_hidden"] @ inputs["student_weight"].T)[:, :VOCAB]
    cfg = LogitKDConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=4)
    # No mask: the plain mean.
    got = run_fused(inputs, cfg, loss_mask=None)
    assert abs(got["ce"] - float(F.cross_entropy(logits, inputs["labels"]))) <= TOL64
    # Masked tokens may carry any label (-100 here): the masked mean is cross_entropy's ignore_index mean.
    ignored = torch.where(inputs["loss_mask"].bool(), inputs["labels"], -100)
    expected = float(F.cross_entropy(logits, ignored, ignore_index=-100))
    for temperature in (1.0, 2.0):  # CE is always at temperature 1
        got = run_fused({**inputs, "labels": ignored}, cfg.model_copy(update={"temperature": temperature}))
        assert abs(got["ce"] - expected) <= TOL64 and abs(got["loss"] - expected) <= TOL64
    # Without a teacher: CE alone, with the gradients of torch's cross_entropy (top_k and temperature unused).
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"].clone().requires_grad_()
    F.cross_entropy((hidden @ weight.T)[:, :VOCAB], ignored, ignore_index=-100).backward()
    for update in ({}, {"temperature": 2.0, "top_k": 5}):
        got = run_fused({**inputs, "labels": ignored}, cfg.model_copy(update=update), teacher=False)
        assert got["kd"] == 0.0 and abs(got["ce"] - expected) <= TOL64 and abs(got["loss"] - expected) <= TOL64
        assert np.abs(got["grad_hidden"] - hidden.grad.numpy()).max() <= TOL64
        assert np.abs(got["grad_weight"] - weight.grad.numpy()).max() <= TOL64


def test_without_labels_and_without_grad(tp1):
    inputs = make_inputs()
    cfg = LogitKDConfig(chunk_tokens=4)
    got = run_fused(inputs, cfg, labels=None)
    assert "ce" not in got
    assert abs(got["kd"] - float(reference_kd(inputs, cfg)[0])) <= TOL64
    with torch.no_grad():
        out = FusedLogitKD(cfg, VOCAB)(*(inputs[k] for k in MODEL_INPUTS))
    assert out["loss"].grad_fn is None
    # No mask: every token counts.
    mask_free = reference_kd({**inputs, "loss_mask": torch.ones(T)}, cfg)[0]
    assert abs(float(out["kd"]) - float(mask_free)) <= TOL64


@pytest.mark.parametrize("name", [*CASES, "ce_only"])
def test_no_host_sync_in_the_chunk_loop(tp1, name):
    """Forward and backward over 10 one-token chunks (training quarters chunk_tokens) with a loss mask, with and
    without CE, and the statistics-only forward: nothing in them waits for the device."""
    inputs = make_inputs()
    teacher = name != "ce_only"
    for ce_weight in (0.0, 0.3) if teacher else (1.0,):
        fields = CASES[name] if teacher else dict(kd_weight=0.0, temperature=2.0)
        cfg = LogitKDConfig(**fields, chunk_tokens=4, ce_weight=ce_weight)
        with no_host_sync():
            _, leaves = fused_step(inputs, cfg, teacher=teacher)
            with torch.no_grad():
                FusedLogitKD(cfg, VOCAB)(*(inputs[k] for k in MODEL_INPUTS), inputs["labels"], inputs["loss_mask"])
        assert leaves["student_weight"].grad.abs().max() > 0
    # The guard catches what it is meant to.
    for sync in (lambda t: t.nonzero(), lambda t: float(t.sum()), lambda t: t[t > 0], lambda t: t.tolist()):
        with pytest.raises(_HostSyncError), no_host_sync():
            sync(inputs["student_hidden"])


def test_config_and_input_checks(tp1):
    from pydantic import ValidationError

    for divergence in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match="top_k is only defined for divergence 'forward_kl'"):
            LogitKDConfig(divergence=divergence, top_k=5)
    with pytest.raises(ValidationError, match="extra"):
        LogitKDConfig(temprature=2.0)
    with pytest.raises(ValidationError):
        LogitKDConfig(jsd_beta=1.0)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        FusedLogitKD(LogitKDConfig(top_k=VOCAB + 1), VOCAB)
    inputs = make_inputs()
    tensors = [inputs[k] for k in MODEL_INPUTS]
    with pytest.raises(ValueError, match="needs labels"):
        FusedLogitKD(LogitKDConfig(ce_weight=1.0), VOCAB)(*tensors)
    with pytest.raises(ValueError, match="needs labels"):
        FusedLogitKD(LogitKDConfig(kd_weight=0.0), VOCAB)(tensors[0], tensors[1], None, None)
    with pytest.raises(ValueError, match="kd_weight > 0 needs the teacher"):
        FusedLogitKD(LogitKDConfig(), VOCAB)(tensors[0], tensors[1], None, None, inputs["labels"])
    with pytest.raises(ValueError, match="both teacher_hidden and teacher_weight, or neither"):
        FusedLogitKD(LogitKDConfig(), VOCAB)(tensors[0], tensors[1], tensors[2], None)
    with pytest.raises(ValueError, match="exceeds the 16 output-layer rows"):
        FusedLogitKD(LogitKDConfig(), ROWS + 1)(*tensors)
    with pytest.raises(ValueError, match="teacher hidden states must be"):
        FusedLogitKD(LogitKDConfig(), VOCAB)(tensors[0], tensors[1], tensors[2], tensors[3][:-1])


# ------------------------------------------------------------------------------ TP=2 (one spawn)


def _reduced_shapes(inputs: dict[str, torch.Tensor], cfg: LogitKDConfig, **overrides) -> list[tuple[int, ...]]:
    """Shapes of the tensors that a forward and backward at TP=2 all-reduce, in order."""
    from nemo_minitron.parallel import state

    shapes = []
    all_reduce = torch.distributed.all_reduce

    def record(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    with mock.patch.object(torch.distributed, "all_reduce", record):
        fused_step(inputs, cfg, state.tp_rank(), 2, **overrides)
    return shapes


def _tp2_worker() -> dict:
    """Every TP_CASES run on this rank's vocabulary shard (fp64), then again without host synchronisation; the
    all-reduced shapes of forward KL at temperature 2 without labels, with unweighted CE and with CE."""
    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig(tensor_model_parallel_size=2))
    try:
        inputs = make_inputs()
        cfgs = {name: (LogitKDConfig(**kw, chunk_tokens=3), teacher) for name, (kw, teacher) in TP_CASES.items()}
        runs = {name: run_fused(inputs, cfg, state.tp_rank(), 2, teacher) for name, (cfg, teacher) in cfgs.items()}
        with no_host_sync():
            for cfg, teacher in cfgs.values():
                fused_step(inputs, cfg, state.tp_rank(), 2, teacher)
        cfg = LogitKDConfig(temperature=2.0, chunk_tokens=3)
        reduced = {
            "no_labels": _reduced_shapes(inputs, cfg, labels=None),
            "ce_weight_0": _reduced_shapes(inputs, cfg),
            "ce_weight_0.5": _reduced_shapes(inputs, cfg.model_copy(update={"ce_weight": 0.5})),
        }
        return {"rank": state.tp_rank(), "runs": runs, "reduced": reduced}
    finally:
        state.destroy()


def test_tp2_matches_tp1(tp1):
    from nemo_minitron.parallel import state

    reports = state.spawn(_tp2_worker, 2)
    assert [r["rank"] for r in reports] == [0, 1]
    inputs = make_inputs()
    for name, (kw, teacher) in TP_CASES.items():
        ref = run_fused(inputs, LogitKDConfig(**kw, chunk_tokens=3), teacher=teacher)
        for r in reports:
            got = r["runs"][name]
            for key in ("loss", "kd") + (("ce",) if "ce" in ref else ()):
                assert abs(got[key] - ref[key]) <= 1e-12, f"{name} rank {r['rank']} {key}"
            # copy_to_tensor_model_parallel_region completes the hidden gradient on every rank.
            diff = np.abs(got["grad_hidden"] - ref["grad_hidden"]).max()
            assert diff <= 1e-12, f"{name} rank {r['rank']} grad_hidden: max diff {diff:.3g}"
        grad_weight = np.concatenate([r["runs"][name]["grad_weight"] for r in reports])
        assert np.abs(grad_weight - ref["grad_weight"]).max() <= 1e-12, f"{name} grad_weight"
    # Unweighted CE is not communicated: the loss all-reduces exactly what it does without labels. Weighted CE
    # adds two rows per token to a SUM (the label logit, and the partition sum at temperature 1).
    for r in reports:
        reduced = {key: (len(shapes), sum(math.prod(s) for s in shapes)) for key, shapes in r["reduced"].items()}
        assert r["reduced"]["ce_weight_0"] == r["reduced"]["no_labels"], reduced
        calls, elements = reduced["no_labels"]
        assert reduced["ce_weight_0.5"] == (calls, elements + 2 * T), reduced


# ------------------------------------------------------------------------------ intermediate states


def _pairs(*pairs: tuple[int, int]) -> list[IntermediatePair]:
    return [IntermediatePair(student_layer=s, teacher_layer=t) for s, t in pairs]


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_intermediate_loss_by_hand(kind):
    torch.manual_seed(0)
    module = IntermediateStateLoss(IntermediateConfig(pairs=_pairs((0, 1), (2, 3)), loss=kind), 4, 6)
    # One state per pair, in the pairs' order.
    student = [torch.randn(3, 2, 4, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(3, 2, 6, requires_grad=True) for _ in range(2)]
    loss = module(student, teacher)

    expected = []
    for proj, s, t in zip(module.projections, student, teacher):
        a, b = s.detach() @ proj.weight.detach().T, t.detach()
        if kind == "cosine":
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            expected.append(1 - cos.mean())
        else:
            expected.append(((a - b) ** 2).mean())
    assert abs(float(loss) - float(sum(expected) / 2)) <= 1e-6

    loss.backward()
    for proj in module.projections:
        assert proj.weight.shape == (6, 4) and proj.weight.grad is not None and proj.weight.grad.abs().max() > 0
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in student)


def test_intermediate_identity_when_widths_match():
    module = IntermediateStateLoss(IntermediateConfig(pairs=_pairs((0, 0), (1, 1))), 6, 6)
    assert list(module.parameters()) == []
    states = [torch.randn(3, 2, 6) for _ in range(2)]
    assert abs(float(module(states, states))) <= 1e-6
    mse = IntermediateStateLoss(IntermediateConfig(pairs=_pairs((0, 1)), loss="mse"), 6, 6)
    assert abs(float(mse(states[:1], states[1:])) - float(((states[0] - states[1]) ** 2).mean())) <= 1e-6


def test_intermediate_checks():
    # A stage without paired layers holds an empty module, which has nothing to compute.
    empty = IntermediateStateLoss(IntermediateConfig(), 4, 8)
    assert list(empty.parameters()) == []
    with pytest.raises(ValueError, match="one student and one teacher state per pair"):
        empty([], [])
    module = IntermediateStateLoss(IntermediateConfig(pairs=_pairs((0, 2))), 4, 4)
    with pytest.raises(ValueError, match="one student and one teacher state per pair"):
        module([torch.randn(1, 1, 4)], [torch.randn(1, 1, 4)] * 2)


def test_balance_weight_fixed_and_dynamic():
    fixed = IntermediateConfig(weight=2.0)
    assert balance_weight(fixed, 3.0, 0.5) == 2.0
    dynamic = IntermediateConfig(weight=2.0, balancing="dynamic")
    # weight * L_is then has the magnitude of the previous step's logit loss (times the weight).
    assert balance_weight(dynamic, 3.0, 0.5) * 0.5 == pytest.approx(6.0)
    # The first step has no previous logit loss: the fixed weight.
    assert balance_weight(dynamic, None, 0.5) == 2.0
    # An intermediate loss of exactly 0 keeps the factor finite (and the term 0).
    factor = balance_weight(dynamic, 3.0, 0.0)
    assert math.isfinite(factor) and factor * 0.0 == 0.0
