"""Logit distillation from a teacher logit cache (:mod:`~nemo_minitron.distill.cache`), fused with the student's
output projection: chunked over tokens and vocabulary-parallel, as :class:`~nemo_minitron.distill.losses.FusedLogitKD`.

Per token the cache holds the teacher's top-k token ids ``I`` [k], their log-probabilities ``l`` [k] (of the
full-vocabulary softmax at temperature 1) and ``log_tail``, the log of the teacher's probability outside them.
Two targets:

- ``bucket``: the teacher's distribution over k + 1 buckets, the k tokens and the rest, ``w = softmax([l,
  log_tail])`` (exactly the teacher's bucket probabilities, renormalised only against rounding of the stored
  values); the student's buckets are ``s_j = p_s[I_j]`` and ``s_tail = 1 - sum_j s_j``, computed as the sum of
  the student's probabilities outside ``I`` (no cancellation). ``D = sum_b w_b (log w_b - log s_b)`` is the
  forward KL of the two bucketed distributions: with k = V it is the full forward KL.
- ``renormalize``: ``q = softmax(l)`` over the k tokens alone, ``D = sum_j q_j (log q_j - log p_s[I_j])`` (what
  ``FusedLogitKD`` computes with ``top_k`` and the teacher online).

With ``z`` the student's logits and ``p = softmax(z)``, ``dD/dz_v = p_v - w_j`` for ``v = I_j`` and
``p_v (1 - w_tail / s_tail)`` for the other tokens (bucket), ``p_v - q_v`` (renormalize, q = 0 outside I).

Under tensor parallelism each rank holds the student's logits of its vocabulary slice; the cached ids are
global. A rank gathers the logits of the ids it owns (0 for the others) and one SUM all-reduce completes them,
with the partition function and the tail sum, after one MAX all-reduce of the row maxima: megatron's
vocabulary-parallel cross-entropy does the same for one label per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from nemo_minitron.distill.config import LogitKDConfig
from nemo_minitron.distill.losses import _chunks, _Grads, _logits, _matmul_operand, _row_dot, saved_input_grads
from nemo_minitron.parallel import state

Tail = Literal["bucket", "renormalize"]


@dataclass(frozen=True)
class _CachePlan:
    tail: Tail
    chunk_tokens: int
    kd_weight: float
    ce_weight: float
    with_ce: bool
    row_start: int
    n_valid: int
    tp_size: int
    group: Optional[dist.ProcessGroup]


def _owned(plan: _CachePlan, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(owned [..] bool, local column [..], 0 where another rank owns the id) of global token ids."""
    local = ids.long() - plan.row_start
    owned = (local >= 0) & (local < plan.n_valid)
    return owned, torch.where(owned, local, 0)


def _sum_over_tp(plan: _CachePlan, x: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    if plan.tp_size > 1:
        dist.all_reduce(x, op=op, group=plan.group)
    return x


def _teacher_log_targets(plan: _CachePlan, logprobs: Tensor, log_tail: Tensor) -> Tensor:
    """[n, k + 1] log w (bucket; last column the tail) or [n, k] log q (renormalize)."""
    if plan.tail == "bucket":
        return torch.log_softmax(torch.cat([logprobs, log_tail[:, None]], dim=1), dim=1)
    return torch.log_softmax(logprobs, dim=1)


def _xlogy_diff(w_log: Tensor, s_log: Tensor) -> Tensor:
    """[n]: sum_b w_b (log w_b - log s_b), a bucket of zero teacher mass adding 0 (whatever s_b)."""
    w = w_log.exp()
    return torch.where(w > 0, w * (w_log - s_log), 0.0).sum(-1)


def _chunk(plan: _CachePlan, zs: Tensor, logprobs: Tensor, ids: Tensor, log_tail: Tensor,
           labels: Optional[Tensor], need_grad: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(D [n], CE [n] or None, dLoss/dz [n, v] or None) of one chunk; ``zs`` [n, v] (this rank's valid columns)
    is overwritten. Buffers: zs and one more of its size."""
    n, k = ids.shape
    owned, cols = _owned(plan, ids)
    owned_f = owned.to(zs.dtype)
    z_sel = zs.gather(1, cols) * owned_f  # [n, k]: completed by the SUM all-reduce
    parts = [z_sel]
    if plan.with_ce:
        own_l, col_l = _owned(plan, labels)
        parts.append((zs.gather(1, col_l[:, None])[:, 0] * own_l.to(zs.dtype))[:, None])
    max_z = _sum_over_tp(plan, zs.amax(-1), dist.ReduceOp.MAX)
    e = zs.sub_(max_z[:, None]).exp_()  # exp(z - max): the student's unnormalised probabilities
    keep = torch.ones_like(e).scatter_add_(1, cols, -owned_f)  # 1 outside the cached ids, 0 on them
    parts += [e.sum(-1)[:, None], _row_dot(e, keep)[:, None]]
    summed = _sum_over_tp(plan, torch.cat(parts, dim=1))
    z_sel = summed[:, :k]
    z_label = summed[:, k] if plan.with_ce else None
    sum_e, tail_e = summed[:, -2], summed[:, -1]
    log_z = max_z + sum_e.log()
    log_s = z_sel - log_z[:, None]  # [n, k] log p_s at the cached ids
    log_t = _teacher_log_targets(plan, logprobs, log_tail)
    if plan.tail == "bucket":
        w_tail = log_t[:, k].exp()
        # The student's tail is clamped away from 0 only where the teacher's is not 0 (where it counts).
        tail_e = torch.where(w_tail > 0, tail_e.clamp_min(torch.finfo(tail_e.dtype).tiny), tail_e)
        log_s_tail = tail_e.log() - sum_e.log()
        div = _xlogy_diff(log_t, torch.cat([log_s, log_s_tail[:, None]], dim=1))
    else:
        div = _xlogy_diff(log_t, log_s)
    ce = log_z - z_label if plan.with_ce else None
    if not need_grad:
        return div, ce, None
    p = e.div_(sum_e[:, None])  # softmax(z)
    kd, cew = plan.kd_weight, (plan.ce_weight if plan.with_ce else 0.0)
    if plan.tail == "bucket":
        ratio = torch.where(w_tail > 0, w_tail / tail_e * sum_e, 0.0)  # w_tail / s_tail
        # kd * p (1 - ratio) outside I, kd * p on I; then + ce * p
        g = keep.mul_((-kd * ratio)[:, None]).add_(kd + cew).mul_(p)
        w_top = log_t[:, :k].exp()
    else:
        g = keep.copy_(p).mul_(kd + cew)
        w_top = log_t.exp()
    g.scatter_add_(1, cols, -kd * w_top * owned_f)
    if plan.with_ce:
        g.scatter_add_(1, col_l[:, None], (-cew * own_l.to(g.dtype))[:, None])
    return div, ce, g


class _CachedKDFunction(torch.autograd.Function):
    """loss, kd, ce = f(student_hidden, student_weight, logprobs, ids, log_tail, labels, loss_mask, plan); the
    gradient is computed in the forward, chunk by chunk (as in losses._FusedLogitKDFunction)."""

    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, logprobs: Tensor, ids: Tensor,
                log_tail: Tensor, labels: Optional[Tensor], loss_mask: Tensor,
                plan: _CachePlan) -> tuple[Tensor, Tensor, Tensor]:
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        device = student_hidden.device
        ws = _matmul_operand(student_weight[: plan.n_valid], student_hidden.dtype)
        mask = loss_mask.to(dtype)
        count = mask.sum().clamp_min(1.0)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grads = _Grads.allocate(student_hidden, student_weight, dtype, need_hidden, need_weight)
        # With gradients a chunk holds the two logits-sized buffers plus the gradient's conversion and product:
        # half chunks keep the peak near the statistics-only forward's.
        chunk = plan.chunk_tokens if grads is None else max(1, plan.chunk_tokens // 2)
        kd_sum = torch.zeros((), dtype=dtype, device=device)
        ce_sum = torch.zeros_like(kd_sum)
        for sl in _chunks(student_hidden.shape[0], chunk):
            hs = _matmul_operand(student_hidden[sl], ws.dtype)
            zs = _logits(hs, ws, dtype)
            div, ce, g = _chunk(plan, zs, logprobs[sl].to(dtype), ids[sl], log_tail[sl].to(dtype),
                                None if labels is None else labels[sl], grads is not None)
            if g is not None:
                grads.add_chunk(g.mul_((mask[sl] / count)[:, None]), hs, ws, sl, plan.n_valid)
            kd_sum += (div * mask[sl]).sum()
            if ce is not None:
                ce_sum += (ce * mask[sl]).sum()
        kd, ce = kd_sum / count, ce_sum / count
        loss = plan.kd_weight * kd + plan.ce_weight * ce
        ctx.grads = grads
        ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_kd: Tensor, _grad_ce: Tensor) -> tuple[Optional[Tensor], ...]:
        return (*saved_input_grads(ctx, grad_loss), None, None, None, None, None, None)


class CachedLogitKD(nn.Module):
    """Forward KL from cached teacher top-k targets, fused with the student's output projection.

    ``forward(student_hidden [T, h], student_weight [V/tp, h], logprobs [T, k], ids [T, k], log_tail [T],
    labels [T] | None, loss_mask [T] | None) -> {"loss", "kd"[, "ce"]}``: ``kd`` the mean of D (module
    docstring) over the unmasked tokens, ``ce`` the student's token cross-entropy (present when ``ce_weight >
    0``), ``loss = kd_weight * kd + ce_weight * ce``, differentiable w.r.t. the student's hidden states and
    output weight. ``cfg``'s divergence must be forward KL at temperature 1 (checked by ``DistillConfig``) and its
    ``top_k`` unset: the cache decides k.
    """

    def __init__(self, cfg: LogitKDConfig, vocab_size: int, tail: Tail) -> None:
        super().__init__()
        if cfg.divergence != "forward_kl" or cfg.temperature != 1 or cfg.top_k is not None:
            raise ValueError("a teacher cache needs forward_kl at temperature 1 and no loss top_k")
        self.cfg, self.vocab_size, self.tail = cfg, vocab_size, tail

    def forward(self, student_hidden: Tensor, student_weight: Tensor, logprobs: Tensor, ids: Tensor,
                log_tail: Tensor, labels: Optional[Tensor] = None,
                loss_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        from megatron.core import tensor_parallel

        n_tok, rows = student_hidden.shape[0], student_weight.shape[0]
        if logprobs.shape != ids.shape or logprobs.shape[0] != n_tok or log_tail.shape != (n_tok,):
            raise ValueError(f"cached targets must be logprobs/ids [{n_tok}, k] and log_tail [{n_tok}], got "
                             f"{tuple(logprobs.shape)}, {tuple(ids.shape)}, {tuple(log_tail.shape)}")
        with_ce = self.cfg.ce_weight > 0
        if with_ce and labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        rank, size = state.tp_rank(), state.tp_size()
        n_valid = min(rows, self.vocab_size - rank * rows)
        if n_valid <= 0:
            raise ValueError(f"TP rank {rank} holds only padding rows (vocab_size {self.vocab_size})")
        if loss_mask is None:
            loss_mask = torch.ones(n_tok, device=student_hidden.device)
        plan = _CachePlan(tail=self.tail, chunk_tokens=self.cfg.chunk_tokens, kd_weight=self.cfg.kd_weight,
                          ce_weight=self.cfg.ce_weight, with_ce=with_ce, row_start=rank * rows, n_valid=n_valid,
                          tp_size=size, group=state.tp_group() if size > 1 else None)
        # Each rank's gradient of the replicated hidden states covers its vocabulary rows only: the
        # all-reduce in backward completes it (as in FusedLogitKD).
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(student_hidden, group=state.tp_group())
        loss, kd, ce = _CachedKDFunction.apply(hidden, student_weight, logprobs, ids, log_tail,
                                               labels if with_ce else None, loss_mask.detach(), plan)
        out = {"loss": loss, "kd": kd}
        if with_ce:
            out["ce"] = ce
        return out
