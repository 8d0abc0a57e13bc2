"""Logit knowledge distillation fused with the output projection (intermediate states:
:mod:`~nemo_minitron.distill.intermediate`).

Shapes: ``T`` tokens (sequence and batch flattened), ``h_s`` / ``h_t`` student / teacher hidden sizes, ``V`` the
padded vocabulary, ``tp`` the tensor-parallel size; each TP rank holds the output-layer rows
``[rank * V/tp, (rank + 1) * V/tp)`` of both models (megatron's vocabulary-parallel output layer), and the rows
with id >= ``vocab_size`` are padding.

:class:`FusedLogitKD` never materialises the ``[T, V]`` logits: it walks the tokens in chunks, computes each
chunk's logits from the hidden states and the output-layer weights, reduces the softmax statistics over the TP
group, and keeps only per-token statistics. In training it also computes each chunk's gradient right away, from the
logits it has, so no logits are ever recomputed; the extra memory is a few ``[chunk_tokens, V/tp]`` buffers (and
the fp32 gradients of the hidden states and of the output-weight shard) whatever ``T`` is. Nothing in the chunk loop
makes the host wait for the device (no value reads, ``nonzero`` or boolean-mask indexing; the label columns are
found with clamped indices and masks), so on a GPU the host queues every chunk's kernels and collectives ahead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from nemo_minitron.distill.config import LogitKDConfig
from nemo_minitron.parallel import state

# ------------------------------------------------------------------------------------------ logit KD


@dataclass(frozen=True)
class _Plan:
    """What the autograd function needs besides tensors; fixed for one forward call."""

    divergence: str
    temperature: float
    jsd_beta: float
    top_k: Optional[int]
    chunk_tokens: int
    kd_weight: float
    ce_weight: float
    with_kd: bool  # a teacher is given; without one only CE is computed (temperature 1, no top-k)
    with_ce: bool  # labels are given and CE is weighted, or there is no teacher: else no CE statistic exists
    row_start: int  # global vocabulary id of this rank's first output-layer row
    n_valid: int  # rows of this rank's shard that are real vocabulary; the rest is padding
    tp_rank: int
    tp_size: int
    group: Optional[dist.ProcessGroup]


class _TokenStats(NamedTuple):
    """Per-token results of the forward that let the backward rebuild every probability without communication.

    Logs of the partition functions are of the tempered logits ``u = z / temperature`` unless noted.
    """

    logz_s: Tensor  # [T] student log-partition (at temperature 1 without a teacher)
    logz_t: Optional[Tensor]  # [T] teacher log-partition (full-vocabulary divergences)
    logz_1: Optional[Tensor]  # [T] student log-partition at temperature 1 (CE when temperature != 1)
    aux: Optional[Tensor]  # [T] reverse KL: KL(p_s || p_t); JSD: KL(p_s || m)
    top_q: Optional[Tensor]  # [T, k] renormalised teacher top-k probabilities of the tokens this rank owns, else 0
    top_col: Optional[Tensor]  # [T, k] local column of those tokens, else 0

    @classmethod
    def allocate(cls, plan: _Plan, n_tok: int, dtype: torch.dtype, device: torch.device) -> "_TokenStats":
        def vec(needed: bool) -> Optional[Tensor]:
            return torch.empty(n_tok, dtype=dtype, device=device) if needed else None

        top = plan.top_k is not None
        return cls(
            logz_s=vec(True),
            logz_t=vec(plan.with_kd and not top),
            logz_1=vec(plan.with_ce and plan.temperature != 1),
            aux=vec(plan.with_kd and plan.divergence in ("reverse_kl", "jsd")),
            top_q=torch.empty(n_tok, plan.top_k, dtype=dtype, device=device) if top else None,
            top_col=torch.empty(n_tok, plan.top_k, dtype=torch.long, device=device) if top else None,
        )


def saved_input_grads(ctx, grad_loss: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Backward of a fused loss that computed its gradients in forward (``ctx.grads``, a :class:`_Grads`): the
    gradients of the hidden states and of the output weight, scaled by ``grad_loss``, in the inputs' dtypes."""
    grads: _Grads = ctx.grads
    ctx.grads = None
    hidden_dtype, weight_dtype = ctx.input_dtypes
    scale = grad_loss.to(grads.dtype)
    grad_hidden = None if grads.hidden is None else grads.hidden.mul_(scale).to(hidden_dtype)
    grad_weight = None if grads.weight is None else grads.weight.mul_(scale).to(weight_dtype)
    return grad_hidden, grad_weight


def _chunks(n_tok: int, chunk_tokens: int) -> list[slice]:
    return [slice(start, min(start + chunk_tokens, n_tok)) for start in range(0, n_tok, chunk_tokens)]


def _all_reduce(plan: _Plan, x: Tensor, op: dist.ReduceOp) -> Tensor:
    if plan.tp_size > 1:
        dist.all_reduce(x, op=op, group=plan.group)
    return x


def _all_gather(plan: _Plan, x: Tensor) -> Tensor:
    """[tp, *x.shape]: every rank's ``x``, by rank."""
    if plan.tp_size == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(plan.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=plan.group)
    return torch.stack(parts)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """[n]: sum_v a[i, v] * b[i, v] of two [n, v] tensors, without an [n, v] temporary (a batched GEMV)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _label_columns(plan: _Plan, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(owned [n] bool, local column [n]) of each label on this rank; labels of other ranks point at column 0."""
    local = labels.long() - plan.row_start
    owned = (local >= 0) & (local < plan.n_valid)
    return owned, torch.where(owned, local, 0)


def _label_logit(plan: _Plan, zs: Tensor, labels: Tensor) -> Tensor:
    """[n]: the label's logit where this rank owns the label, else 0 (an all-reduced sum gives the logit)."""
    owned, col = _label_columns(plan, labels)
    return torch.where(owned, zs.gather(1, col[:, None])[:, 0], 0.0)


def _teacher_top_k(plan: _Plan, zt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's global top-k tokens of a chunk, from each rank's local top-k candidates.

    zt: [n, v] teacher logits (unscaled) of this rank's valid columns. Only ``k`` values per token and rank are
    all-gathered, never the vocabulary. Every rank selects from the same gathered tensor, so all agree on the
    winners (ties included). Returns ``log_q`` [n, k] (log of the renormalised tempered teacher probabilities,
    identical on every rank), and ``q_own``, ``cols`` [n, k]: q and the local column for the winners this rank
    owns, 0 and column 0 for the others.
    """
    k = plan.top_k
    vals, idx = zt.topk(min(k, zt.shape[1]), dim=-1)
    if vals.shape[1] < k:
        # This shard has fewer than k real rows: pad with candidates that never win (vocab_size >= k is checked).
        vals = F.pad(vals, (0, k - vals.shape[1]), value=float("-inf"))
        idx = F.pad(idx, (0, k - idx.shape[1]))
    candidates = _all_gather(plan, vals).permute(1, 0, 2).reshape(zt.shape[0], plan.tp_size * k)
    top_vals, pos = candidates.topk(k, dim=-1)
    log_q = torch.log_softmax(top_vals / plan.temperature, dim=-1)
    own = pos.div(k, rounding_mode="floor") == plan.tp_rank
    cols = torch.where(own, idx.gather(1, pos.remainder(k)), 0)
    return log_q, torch.where(own, log_q.exp(), 0.0), cols


def _forward_chunk(
    plan: _Plan, zs: Tensor, zt: Optional[Tensor], labels: Optional[Tensor], st: _TokenStats, sl: slice
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token divergence (before the temperature**2 factor) and CE, both [n], of one chunk; fills ``st[sl]``.

    zs, zt: [n, v] student / teacher logits of this rank's valid columns (zt None without a teacher),
    overwritten here. Buffers: forward KL (full or top-k) works in these two; CE at temperature != 1, reverse KL
    and JSD add one more [n, v] temporary. Collectives: one MAX all-reduce of the row maxima (plus the top-k
    all-gather), one SUM all-reduce of every per-token partial sum, and for JSD a second SUM once the
    log-partitions are known.
    """
    if not plan.with_kd:
        return _ce_only_forward_chunk(plan, zs, labels, st, sl)
    tau = plan.temperature
    if plan.top_k is not None:
        log_q, q_own, cols = _teacher_top_k(plan, zt)
        maxima = zs.amax(-1)[None]
    else:
        maxima = torch.stack([zs.amax(-1), zt.amax(-1)])
    _all_reduce(plan, maxima, dist.ReduceOp.MAX)
    # Maxima of the tempered logits u = z / tau (tau > 0 keeps the arg-max): the softmax shifts.
    max_s = (maxima[0] / tau)[:, None]
    max_t = (maxima[1] / tau)[:, None] if plan.top_k is None else None

    partial: list[Tensor] = []  # per-token sums over this rank's columns, all-reduced together
    if plan.with_ce:
        partial.append(_label_logit(plan, zs, labels))
    # CE at temperature != 1 needs its own sum of exp(z - max). Forward KL and top-k keep u_s and free zt, and
    # compute it there at the end; reverse KL and JSD overwrite zs before a buffer frees up: a temporary here.
    ce_untempered = plan.with_ce and tau != 1
    if ce_untempered and plan.divergence != "forward_kl":
        partial.append((zs - maxima[0][:, None]).exp_().sum(-1))
    if tau != 1:
        zs.div_(tau)
        if plan.top_k is None:
            zt.div_(tau)

    if plan.top_k is not None:
        # zt is free: it is the scratch buffer. Only the student's own columns see the teacher's winners.
        partial.append(torch.sub(zs, max_s, out=zt).exp_().sum(-1))
        partial.append((q_own * zs.gather(1, cols)).sum(-1))
    elif plan.divergence == "forward_kl":
        et = zt.sub_(max_t).exp_()
        partial.append(et.sum(-1))
        partial.append(_row_dot(et, zs))  # sum e_t u_s
        partial.append(et.xlogy_(et).sum(-1))  # sum e_t log e_t (0 log 0 = 0): u_t is gone, e_t suffices
        partial.append(torch.sub(zs, max_s, out=zt).exp_().sum(-1))
    elif plan.divergence == "reverse_kl":
        es = zs.sub_(max_s).exp_()
        partial.append(es.sum(-1))
        partial.append(_row_dot(es, zt))  # sum e_s u_t
        partial.append(es.xlogy_(es).sum(-1))
        partial.append(torch.sub(zt, max_t, out=zs).exp_().sum(-1))
    else:
        partial.append((zs - max_s).exp_().sum(-1))
        partial.append((zt - max_t).exp_().sum(-1))
    if ce_untempered and plan.divergence == "forward_kl":
        # zs still holds u_s, zt is scratch; z = tau * u.
        partial.append(torch.mul(zs, tau, out=zt).sub_(maxima[0][:, None]).exp_().sum(-1))

    sums = list(_all_reduce(plan, torch.stack(partial), dist.ReduceOp.SUM).unbind(0))
    z_label = sums.pop(0) if plan.with_ce else None
    sum_1 = None
    if plan.with_ce and tau != 1:
        # The sum of exp(z - max) at temperature 1: appended last for forward KL and top-k, first otherwise.
        sum_1 = sums.pop() if plan.divergence == "forward_kl" else sums.pop(0)

    if plan.top_k is not None:
        sum_s, picked = sums
        logz_s = max_s[:, 0] + sum_s.log()
        st.top_q[sl], st.top_col[sl] = q_own, cols
        # sum_k q (log q - log p_s) with log p_s = u_s - logZ_s and sum_k q = 1.
        div = (log_q.exp() * log_q).sum(-1) - picked + logz_s
    elif plan.divergence == "forward_kl":
        sum_t, dot, ent, sum_s = sums
        logz_s = max_s[:, 0] + sum_s.log()
        st.logz_t[sl] = max_t[:, 0] + sum_t.log()
        # log p_t = log e_t - log S_t, log p_s = u_s - logZ_s.
        div = (ent - dot) / sum_t - sum_t.log() + logz_s
    elif plan.divergence == "reverse_kl":
        sum_s, dot, ent, sum_t = sums
        logz_s = max_s[:, 0] + sum_s.log()
        st.logz_t[sl] = max_t[:, 0] + sum_t.log()
        div = (ent - dot) / sum_s - sum_s.log() + st.logz_t[sl]
        st.aux[sl] = div
    else:
        sum_s, sum_t = sums
        logz_s = max_s[:, 0] + sum_s.log()
        st.logz_t[sl] = max_t[:, 0] + sum_t.log()
        log_ps, log_pt = zs.sub_(logz_s[:, None]), zt.sub_(st.logz_t[sl][:, None])
        log_m = _jsd_log_m(plan, log_ps, log_pt)
        ps, pt = log_ps.exp_(), log_pt.exp_()
        # KL(p || m) = sum p log p - sum p log m; the row dots come first, xlogy_ then overwrites p.
        kl_parts = [-_row_dot(pt, log_m), -_row_dot(ps, log_m)]
        kl_parts[0] += pt.xlogy_(pt).sum(-1)
        kl_parts[1] += ps.xlogy_(ps).sum(-1)
        kl_t, kl_s = _all_reduce(plan, torch.stack(kl_parts), dist.ReduceOp.SUM).unbind(0)
        st.aux[sl] = kl_s
        div = plan.jsd_beta * kl_t + (1 - plan.jsd_beta) * kl_s
    st.logz_s[sl] = logz_s
    ce_tok = None
    if plan.with_ce:
        # At temperature 1 the student's log-partition is logZ_s itself.
        logz_1 = logz_s if sum_1 is None else maxima[0] + sum_1.log()
        if sum_1 is not None:
            st.logz_1[sl] = logz_1
        ce_tok = logz_1 - z_label
    return div, ce_tok


def _ce_only_forward_chunk(
    plan: _Plan, zs: Tensor, labels: Tensor, st: _TokenStats, sl: slice
) -> tuple[Tensor, Tensor]:
    """(zeros [n], CE [n]) of a chunk without a teacher; zs [n, v] is overwritten (no other buffer)."""
    max_s = _all_reduce(plan, zs.amax(-1), dist.ReduceOp.MAX)
    z_label = _label_logit(plan, zs, labels)
    sum_s = zs.sub_(max_s[:, None]).exp_().sum(-1)
    z_label, sum_s = _all_reduce(plan, torch.stack([z_label, sum_s]), dist.ReduceOp.SUM).unbind(0)
    st.logz_s[sl] = max_s + sum_s.log()
    return torch.zeros_like(z_label), st.logz_s[sl] - z_label


def _jsd_log_m(plan: _Plan, log_ps: Tensor, log_pt: Tensor) -> Tensor:
    """[n, v] log m, m = beta p_t + (1 - beta) p_s, in the log domain (p underflows where log p does not).

    log m = log_pt + log beta + softplus(log_ps + log(1 - beta) - log_pt - log beta), in one new buffer.
    """
    beta = plan.jsd_beta
    log_m = torch.sub(log_ps, log_pt).add_(math.log1p(-beta) - math.log(beta))
    torch.logaddexp(log_m, log_m.new_zeros(()), out=log_m)
    return log_m.add_(log_pt).add_(math.log(beta))


def _backward_chunk(
    plan: _Plan, zs: Tensor, zt: Optional[Tensor], labels: Optional[Tensor], st: _TokenStats, sl: slice
) -> Tensor:
    """[n, v]: d(kd_weight * temperature**2 * D + ce_weight * CE) / dz_s per token of a chunk (in zs's or zt's buffer).

    zs: [n, v] student logits; zt: the teacher's (None without a teacher; top-k needs only the saved q). Both
    are overwritten. CE's gradient is softmax(z) - onehot(label).
    """
    if plan.with_kd:
        g = _kd_grad(plan, zs, zt, st, sl)
    else:
        g = zs.sub_(st.logz_s[sl][:, None]).exp_().mul_(plan.ce_weight)
    if plan.with_ce:
        # Every token adds at its label's column, 0 where another rank owns the label: no nonzero() to find the
        # owned tokens, whose count the host would have to wait for.
        owned, col = _label_columns(plan, labels)
        g.scatter_add_(1, col[:, None], owned.to(g.dtype).mul_(-plan.ce_weight)[:, None])
    return g


def _kd_grad(plan: _Plan, zs: Tensor, zt: Optional[Tensor], st: _TokenStats, sl: slice) -> Tensor:
    """[n, v]: d(kd_weight * temperature**2 * D) / dz_s plus CE's ce_weight * softmax(z) term.

    With u = z / tau the divergences' gradients w.r.t. u are: forward KL p_s - p_t (p_s - q for top-k),
    reverse KL p_s (log p_s - log p_t - KL), JSD p_s (c - sum p_s c) with c = (1 - beta)(log p_s - log m); the
    chain rule through u and the tau**2 factor leave tau * that.
    """
    tau = plan.temperature
    kd = plan.kd_weight * tau
    p_1 = None
    if plan.with_ce and tau != 1:
        p_1 = (zs - st.logz_1[sl][:, None]).exp_()  # softmax at temperature 1: its own buffer
    # At temperature 1 softmax(z) is p_s: the CE term folds into it without a buffer.
    ce_fold = plan.ce_weight if plan.with_ce and tau == 1 else 0.0
    if tau != 1:
        zs.div_(tau)
        if zt is not None:
            zt.div_(tau)
    log_ps = zs.sub_(st.logz_s[sl][:, None])

    if plan.top_k is not None:
        g = log_ps.exp_().mul_(kd + ce_fold)
        g.scatter_add_(1, st.top_col[sl], st.top_q[sl] * -kd)
    elif plan.divergence == "forward_kl":
        g = log_ps.exp_().mul_(kd + ce_fold)
        g.sub_(zt.sub_(st.logz_t[sl][:, None]).exp_(), alpha=kd)
    elif plan.divergence == "reverse_kl":
        log_ratio = zt.sub_(st.logz_t[sl][:, None]).neg_().add_(log_ps)  # log p_s - log p_t
        ps = log_ps.exp_()
        g = log_ratio.sub_(st.aux[sl][:, None]).mul_(ps).mul_(kd)
        g.add_(ps, alpha=ce_fold)
    else:
        log_m = _jsd_log_m(plan, log_ps, zt.sub_(st.logz_t[sl][:, None]))
        # c - sum_v p_s c = (1 - beta)(log p_s - log m - KL(p_s || m))
        g = log_m.neg_().add_(log_ps).sub_(st.aux[sl][:, None]).mul_((1 - plan.jsd_beta) * kd)
        ps = log_ps.exp_()
        g.mul_(ps).add_(ps, alpha=ce_fold)

    if p_1 is not None:
        g.add_(p_1, alpha=plan.ce_weight)
    return g


def _matmul_operand(x: Tensor, activation_dtype: torch.dtype) -> Tensor:
    """``x`` in the precision the projections run in: the activations' own when they are 16-bit (as a bf16
    model's output layer computes its logits, at the 16-bit GEMM rate), fp32 or fp64 otherwise."""
    if activation_dtype in (torch.bfloat16, torch.float16):
        return x.to(activation_dtype)
    return x.to(torch.promote_types(activation_dtype, torch.float32))


def _logits(hidden: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """[n, v] logits of a chunk in ``dtype`` (fp32 or fp64): the softmax statistics never run in 16 bits."""
    return (_matmul_operand(hidden, weight.dtype) @ weight.T).to(dtype)


class _FusedLogitKDFunction(torch.autograd.Function):
    """loss, kd, ce = f(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss_mask, plan).

    When gradients are needed, the forward computes them too, chunk by chunk, from the logits it already has
    (the loss is a scalar at the end of the graph, so d loss / d inputs is known up to the incoming scalar
    gradient): the backward only scales them. The chunk's logits are copied before the statistics overwrite
    them, and the chunks are a quarter as long so that the peak stays below that of two full-size buffers. Without
    gradients (evaluation) the forward keeps only per-token statistics (:class:`_TokenStats`). The student
    hidden gradient is this rank's share only (its vocabulary rows): the caller all-reduces it over TP.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Optional[Tensor],
        loss_mask: Tensor,
        plan: _Plan,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        device = student_hidden.device
        ws = _matmul_operand(student_weight[: plan.n_valid], student_hidden.dtype)
        wt = _matmul_operand(teacher_weight[: plan.n_valid], teacher_hidden.dtype) if plan.with_kd else None
        mask = loss_mask.to(dtype)
        # Normalise by the unmasked tokens of the whole input, so chunking does not change the value.
        count = mask.sum().clamp_min(1.0)
        n_tok = student_hidden.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grads = _Grads.allocate(student_hidden, student_weight, dtype, need_hidden, need_weight)
        # With gradients a chunk holds four logits-sized buffers (the logits, their copies, then the gradient's
        # temporaries) instead of two: quarter chunks keep the peak at or below the statistics-only forward's.
        chunk = plan.chunk_tokens if grads is None else max(1, plan.chunk_tokens // 4)
        st = _TokenStats.allocate(plan, n_tok, dtype, device)
        kd_sum = torch.zeros((), dtype=dtype, device=device)
        ce_sum = torch.zeros_like(kd_sum)
        for sl in _chunks(n_tok, chunk):
            hs = _matmul_operand(student_hidden[sl], ws.dtype)
            zs = _logits(hs, ws, dtype)
            zt = _logits(teacher_hidden[sl], wt, dtype) if plan.with_kd else None
            chunk_labels = None if labels is None else labels[sl]
            if grads is None:
                div, ce_tok = _forward_chunk(plan, zs, zt, chunk_labels, st, sl)
            else:
                div, ce_tok = _forward_chunk(plan, zs.clone(), None if zt is None else zt.clone(), chunk_labels, st, sl)
                g = _backward_chunk(plan, zs, zt, chunk_labels, st, sl)
                del zs, zt
                grads.add_chunk(g.mul_((mask[sl] / count)[:, None]), hs, ws, sl, plan.n_valid)
            kd_sum += (div * mask[sl]).sum()
            if ce_tok is not None:
                ce_sum += (ce_tok * mask[sl]).sum()
        kd = kd_sum * plan.temperature**2 / count
        ce = ce_sum / count
        loss = plan.kd_weight * kd + plan.ce_weight * ce
        ctx.grads = grads
        ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_kd: Tensor, _grad_ce: Tensor) -> tuple[Optional[Tensor], ...]:
        return (*saved_input_grads(ctx, grad_loss), None, None, None, None, None)


@dataclass
class _Grads:
    """Gradients of the loss (for an incoming gradient of 1) w.r.t. the student hidden states [T, h] and this
    rank's output-weight shard [V/tp, h], accumulated chunk by chunk in fp32 (fp64 for fp64 inputs)."""

    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    dtype: torch.dtype

    @staticmethod
    def allocate(student_hidden: Tensor, student_weight: Tensor, dtype: torch.dtype, need_hidden: bool,
                 need_weight: bool) -> Optional["_Grads"]:
        if not (need_hidden or need_weight):
            return None
        device = student_hidden.device
        return _Grads(
            hidden=torch.empty(student_hidden.shape, dtype=dtype, device=device) if need_hidden else None,
            # Padding rows get exactly zero gradient.
            weight=torch.zeros(student_weight.shape, dtype=dtype, device=device) if need_weight else None,
            dtype=dtype,
        )

    def add_chunk(self, g: Tensor, hs: Tensor, ws: Tensor, sl: slice, n_valid: int) -> None:
        """Add one chunk's share: ``g`` [n, v] is d loss / d logits of the chunk's tokens, ``hs`` [n, h] their
        hidden states and ``ws`` [v, h] the weight's valid rows, both as the projection multiplies them."""
        g_mm = g.to(ws.dtype)
        if self.hidden is not None:
            self.hidden[sl] = g_mm @ ws
        if self.weight is not None:
            if g_mm.dtype == self.dtype:
                self.weight[:n_valid].addmm_(g_mm.T, hs)
            else:
                self.weight[:n_valid] += g_mm.T @ hs


class FusedLogitKD(nn.Module):
    """Logit distillation loss fused with the output projection: chunked over tokens, vocabulary-parallel.

    ``forward(student_hidden [T, h_s], student_weight [V/tp, h_s], teacher_hidden [T, h_t] | None,
    teacher_weight [V/tp, h_t] | None, labels [T] | None, loss_mask [T] | None) -> {"loss", "kd", "ce"}``, all
    scalars:

    - ``kd = temperature**2 * mean_t D_t`` over the unmasked tokens, with ``p = softmax(z / temperature)`` and
      ``D`` one of: ``forward_kl`` KL(p_t || p_s); ``reverse_kl`` KL(p_s || p_t); ``jsd``
      beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s (beta = ``jsd_beta``).
      The temperature**2 factor is Hinton et al.'s: gradients of the softened divergence shrink as
      1/temperature**2, so the factor keeps the KD gradient's scale (and the right ``kd_weight``) independent of
      the temperature. At Minitron's temperature 1 it is a no-op.
    - ``top_k``: the teacher distribution is restricted to its global top-k tokens and renormalised (q); forward
      KL becomes sum_k q_k (log q_k - log p_s[k]) with p_s the student's full-vocabulary softmax. Only forward
      KL takes ``top_k`` (:class:`LogitKDConfig` rejects the others: reverse KL and JSD are infinite or
      ill-defined against a teacher with zero mass outside its top-k).
    - ``ce``: token cross-entropy of the student logits (temperature 1) against ``labels``; computed and present
      only when ``labels`` are given and ``ce_weight > 0`` or there is no teacher (with a teacher and
      ``ce_weight`` 0 the labels are not read). Labels of masked tokens are ignored (any value, e.g. -100).
    - ``loss = kd_weight * kd + ce_weight * ce``, differentiable w.r.t. ``student_hidden`` and
      ``student_weight``; ``kd`` and ``ce`` are detached. The teacher inputs never receive gradients.
    - Without a teacher (both teacher inputs None; e.g. training or evaluating on the LM loss alone) only CE is
      computed: ``kd`` is 0, ``kd_weight`` must be 0 and ``labels`` are required.

    Means divide by the number of unmasked tokens of the whole input (an all-masked input gives 0), so the value
    does not depend on ``chunk_tokens``. Rows with id >= ``vocab_size`` are padding: zero probability and zero
    gradient. The projections run in the hidden states' precision when it is 16-bit (bf16 training: the GEMM
    rate of bf16, the logits a bf16 output layer would give) and in fp32 (fp64 for fp64 inputs) otherwise; the
    softmax statistics, divergences and their gradients are always fp32 or wider.

    Memory: without gradients the forward holds two ``[chunk_tokens, V/tp]`` buffers at a time for forward KL
    (full or top-k; one more for CE at temperature != 1, reverse KL and JSD), freed chunk by chunk. With
    gradients it holds four (the logits and their copies) over chunks of ``chunk_tokens / 4`` tokens, and keeps
    the fp32 gradients of the student's hidden states and output-weight shard until the backward.
    """

    def __init__(self, cfg: LogitKDConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if cfg.top_k is not None and cfg.top_k > vocab_size:
            raise ValueError(f"top_k={cfg.top_k} exceeds the vocabulary ({vocab_size} tokens)")
        self.cfg = cfg
        self.vocab_size = vocab_size

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Optional[Tensor],
        teacher_weight: Optional[Tensor],
        labels: Optional[Tensor] = None,
        loss_mask: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """See the class docstring. ``labels`` [T] int64 (global ids); ``loss_mask`` [T], 1 = counted, 0 = not."""
        from megatron.core import tensor_parallel

        cfg = self.cfg
        with_kd = teacher_hidden is not None
        if (teacher_weight is not None) != with_kd:
            raise ValueError("give both teacher_hidden and teacher_weight, or neither")
        n_tok = student_hidden.shape[0]
        rows = student_weight.shape[0]
        if student_hidden.dim() != 2 or student_weight.shape[1:] != student_hidden.shape[1:]:
            raise ValueError(
                f"student hidden states must be [T, h] and its output weight [V/tp, h], got "
                f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}"
            )
        if with_kd and (
            teacher_hidden.dim() != 2
            or teacher_hidden.shape[0] != n_tok
            or teacher_weight.shape != (rows, teacher_hidden.shape[1])
        ):
            raise ValueError(
                f"teacher hidden states must be [{n_tok}, h_t] and its output weight [{rows}, h_t], got "
                f"{tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}"
            )
        if not with_kd and cfg.kd_weight > 0:
            raise ValueError("kd_weight > 0 needs the teacher's hidden states and output weight")
        for name, t in (("labels", labels), ("loss_mask", loss_mask)):
            if t is not None and t.shape != (n_tok,):
                raise ValueError(f"{name} must be [{n_tok}], got {tuple(t.shape)}")
        if labels is None and (cfg.ce_weight > 0 or not with_kd):
            raise ValueError("ce_weight > 0, or a loss without a teacher, needs labels")
        rank, size = state.tp_rank(), state.tp_size()
        if self.vocab_size > rows * size:
            raise ValueError(f"vocab_size {self.vocab_size} exceeds the {rows * size} output-layer rows")
        n_valid = min(rows, self.vocab_size - rank * rows)
        if n_valid <= 0:
            # megatron pads by fewer than 128 * tp rows, so only a toy vocabulary leaves a rank pure padding.
            raise ValueError(
                f"TP rank {rank} holds only padding rows (vocab_size {self.vocab_size}, {rows} rows per rank)"
            )
        if loss_mask is None:
            loss_mask = torch.ones(n_tok, device=student_hidden.device)
        plan = _Plan(
            divergence=cfg.divergence,
            # Without a teacher the student's statistics are only needed for CE, at temperature 1.
            temperature=cfg.temperature if with_kd else 1.0,
            jsd_beta=cfg.jsd_beta,
            top_k=cfg.top_k if with_kd else None,
            chunk_tokens=cfg.chunk_tokens,
            kd_weight=cfg.kd_weight,
            ce_weight=cfg.ce_weight,
            with_kd=with_kd,
            # Unweighted CE next to a teacher would only cost: a label gather, a row in every SUM all-reduce and,
            # at temperature != 1, a [chunk, V/tp] buffer and pass of its own.
            with_ce=labels is not None and (cfg.ce_weight > 0 or not with_kd),
            row_start=rank * rows,
            n_valid=n_valid,
            tp_rank=rank,
            tp_size=size,
            group=state.tp_group() if size > 1 else None,
        )
        # The hidden state is replicated on every TP rank, but each rank computes logits (and so dL/dlogits) for
        # its own vocabulary rows only: its dL/dh = g_r W_r is one term of sum_r g_r W_r. This identity-forward /
        # all-reduce-backward op (what ColumnParallelLinear applies to its input) completes the sum, so every
        # rank sends the full gradient into the replicated layers below; without it the ranks would backpropagate
        # different partial gradients and their "replicated" weights would drift apart.
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(student_hidden, group=state.tp_group())
        if with_kd:
            teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        loss, kd, ce = _FusedLogitKDFunction.apply(
            hidden, student_weight, teacher_hidden, teacher_weight, labels if plan.with_ce else None,
            loss_mask.detach(), plan,
        )
        out = {"loss": loss, "kd": kd}
        if plan.with_ce:
            out["ce"] = ce
        return out
