"""Per-rank memory arithmetic of megatron-core training and inference, without building anything.

Static terms are what megatron-core 0.16 allocates, computed by the same rules it uses:

- a trained model's parameters live in ``DistributedDataParallel``'s contiguous buffers (with the distributed
  optimizer: a parameter buffer in the model dtype and an fp32 gradient buffer, ``grad_reduce_in_fp32``). Each
  parameter starts at a multiple of 64 elements, the buffer is cut into buckets of about ``bucket_size``
  elements (``max(4e7, 1e6 x DP)``, no bucketing on pipeline stages after the first), each bucket padded to a
  multiple of ``lcm(DP, 128)``; with tied embeddings and PP > 1 the shared embedding gets a bucket of its own.
  :func:`ddp_buffer` replays this;
- the distributed optimizer gives data-parallel rank ``r`` the ``r``-th of DP equal slices of every bucket and
  keeps, for the parameter elements in it, fp32 master copies (16-bit models only) and Adam's two fp32 moments,
  plus one fp32 step counter per parameter slice (:func:`optimizer_shard`);
- a frozen model (the teacher) holds its parameters in its own dtype, nothing else.

Activations are what autograd keeps for backward in a transformer layer of megatron-core's local spec with
PyTorch's fused attention (:func:`layer_saved_bytes`), times the layers of a pipeline stage and the
micro-batches 1F1B keeps in flight there, plus the working set of one layer and the fused KD loss's buffers
(:func:`kd_loss_bytes`). ``benchmarks/plan_check.py`` compares both against measured ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from nemo_minitron.models.config import ModelConfig

# Element sizes of the dtypes a config names.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
PARAM_ALIGN = 64  # elements: megatron starts every parameter at a 128-byte boundary of 16-bit values
BUCKET_ALIGN = 128


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shared_embedding: bool = False
    norm: bool = False


def stage_layers(cfg: ModelConfig, pp: int) -> int:
    return cfg.num_layers // pp


def rank_params(cfg: ModelConfig, tp: int, pp: int, pp_rank: int) -> list[Param]:
    """The parameters of one rank of ``cfg`` at TP x PP, in ``GPTModel.named_parameters()`` order."""
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    n, g = cfg.num_attention_heads, cfg.num_query_groups
    rows = cfg.padded_vocab_size(tp) // tp
    first, last, tied = pp_rank == 0, pp_rank == pp - 1, cfg.tie_word_embeddings
    params = []
    if first:
        params.append(Param("embedding.word_embeddings.weight", rows * h, shared_embedding=tied and pp > 1))
    for i in range(stage_layers(cfg, pp)):
        p = f"decoder.layers.{i}."
        params += [
            Param(p + "input_layernorm.weight", h, norm=True),
            # Attention builds linear_proj before SelfAttention adds linear_qkv.
            Param(p + "self_attention.linear_proj.weight", h * n * d // tp),
            Param(p + "self_attention.linear_qkv.weight", (n + 2 * g) * d // tp * h),
            Param(p + "pre_mlp_layernorm.weight", h, norm=True),
            Param(p + "mlp.linear_fc1.weight", 2 * f // tp * h),
            Param(p + "mlp.linear_fc2.weight", h * f // tp),
        ]
    if last:
        params.append(Param("decoder.final_layernorm.weight", h, norm=True))
        if not tied:
            params.append(Param("output_layer.weight", rows * h))
        elif not first:  # the last stage's copy of the tied embedding
            params.append(Param("output_layer.weight", rows * h, shared_embedding=True))
    return params


def default_bucket_size(dp: int, pp_rank: int) -> Optional[int]:
    """megatron's DDP bucket size with ``overlap_grad_reduce`` (elements; None: one bucket)."""
    return None if pp_rank > 0 else max(40_000_000, 1_000_000 * dp)


def _pad(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


@dataclass(frozen=True)
class Buffer:
    """A DDP parameter-and-gradient buffer: its padded size, its buckets [start, end) and where each parameter
    lies (start, end) in it."""

    numel: int
    buckets: tuple[tuple[int, int], ...]
    ranges: tuple[tuple[int, int], ...]


def ddp_buffer(params: list[Param], dp: int, bucket_size: Optional[int]) -> Buffer:
    """megatron's ``_ParamAndGradBuffer`` layout with the distributed optimizer (parameters in reverse order)."""
    divisor = math.lcm(dp, BUCKET_ALIGN)
    buckets: list[tuple[int, int]] = []
    ranges: list[tuple[int, int]] = []
    bucket_start = param_start = param_end = 0
    open_params = 0
    for param in reversed(params):
        param_start = _pad(param_start, PARAM_ALIGN)
        if param.shared_embedding and open_params:
            end = _pad(param_start, divisor)
            buckets.append((bucket_start, end))
            bucket_start = param_start = end
            open_params = 0
        param_end = param_start + param.numel
        ranges.append((param_start, param_end))
        open_params += 1
        if (bucket_size is not None and param_end - bucket_start >= bucket_size) or param.shared_embedding:
            end = _pad(param_end, divisor)
            buckets.append((bucket_start, end))
            bucket_start = param_start = end
            open_params = 0
        else:
            param_start = param_end
    if open_params:
        buckets.append((bucket_start, _pad(param_end, divisor)))
    return Buffer(numel=buckets[-1][1] if buckets else 0, buckets=tuple(buckets), ranges=tuple(ranges))


def optimizer_shard(buffer: Buffer, dp: int, dp_rank: int) -> tuple[int, int]:
    """(parameter elements, parameter slices) that data-parallel rank ``dp_rank`` owns in the distributed
    optimizer: its slice of every bucket, intersected with the parameters (padding owns no state)."""
    elements = slices = 0
    for start, end in buffer.buckets:
        size = (end - start) // dp
        lo, hi = start + dp_rank * size, start + (dp_rank + 1) * size
        for p_start, p_end in buffer.ranges:
            overlap = min(hi, p_end) - max(lo, p_start)
            if overlap > 0:
                elements += overlap
                slices += 1
    return elements, slices


@dataclass(frozen=True)
class TrainedState:
    """Bytes of one rank's trained model: parameters, fp32 gradients and distributed-optimizer state."""

    weights: int
    gradients: int
    optimizer: int


def trained_state(cfg: ModelConfig, dtype_bytes: int, tp: int, pp: int, dp: int, pp_rank: int, dp_rank: int,
                  fp32_norms: bool = False) -> TrainedState:
    """``fp32_norms``: the norms' weights are fp32 whatever the model dtype (the local spec builds
    ``torch.nn.RMSNorm`` in the default dtype; Transformer Engine builds them in the model dtype). DDP keeps one
    buffer per parameter dtype."""
    params = rank_params(cfg, tp, pp, pp_rank)
    groups = [(dtype_bytes, params)]
    if fp32_norms and dtype_bytes != 4:
        groups = [(dtype_bytes, [p for p in params if not p.norm]), (4, [p for p in params if p.norm])]
    weights = gradients = optimizer = 0
    for size, group in groups:
        buffer = ddp_buffer(group, dp, default_bucket_size(dp, pp_rank))
        elements, slices = optimizer_shard(buffer, dp, dp_rank)
        # Adam's exp_avg and exp_avg_sq, fp32 master copies of 16-bit weights (fp32 weights are their own),
        # and a 0-dim fp32 step per slice (torch's fused AdamW).
        per_element = 8 + (4 if size < 4 else 0)
        weights += buffer.numel * size
        gradients += buffer.numel * 4
        optimizer += elements * per_element + 4 * slices
    return TrainedState(weights=weights, gradients=gradients, optimizer=optimizer)


def frozen_weights(cfg: ModelConfig, dtype_bytes: int, tp: int, pp: int, pp_rank: int,
                   fp32_norms: bool = False) -> int:
    return sum(p.numel * (4 if fp32_norms and p.norm else dtype_bytes) for p in rank_params(cfg, tp, pp, pp_rank))


# ---------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Batch:
    """One micro-batch's shape and how the layers hold it."""

    seq_length: int
    micro_batch_size: int
    dtype_bytes: int
    tp: int
    sequence_parallel: bool

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch_size

    @property
    def sp(self) -> int:
        return self.tp if self.sequence_parallel else 1


def layer_saved_bytes(cfg: ModelConfig, b: Batch, recompute: Optional[str], fp32_norms: bool = False) -> int:
    """Bytes a transformer layer keeps for backward per micro-batch.

    Without recomputation, in tokens T and the model dtype (counted on CPU with autograd's saved-tensor hooks):
    each RMSNorm's input, its normalised copy before the weight (fp32 with ``fp32_norms``, the local spec's
    fp32 norm weights) and fp32 statistics, [T/sp, h]; the inputs of linear_qkv and linear_fc1 [T/sp, h]
    (under sequence parallelism a GEMM keeps its local slice and gathers again in backward); the fused qkv
    output [T, (n + 2g) d / tp] (value is a view of it); query and key after RoPE; the attention output, which
    linear_proj keeps as its input [T, n d / tp]; fp32 log-sum-exp [T, n / tp]; RoPE's cosines and sines for
    query and key [s, d]; linear_fc1's output [T, 2 f / tp] and three [T, f / tp] tensors of SwiGLU (SiLU's
    output, the product that linear_fc2 keeps, one more). ``selective`` recomputes core attention: its
    log-sum-exp goes (its inputs and output are kept by their neighbours). ``full`` keeps the layer's input
    [T/sp, h] only.
    """
    t, e, tp, sp = b.tokens, b.dtype_bytes, b.tp, b.sp
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    n, g = cfg.num_attention_heads, cfg.num_query_groups
    if recompute == "full":
        return t * h // sp * e
    norms = 2 * t * h // sp * (e + (4 if fp32_norms else e)) + 2 * t // sp * 4
    gemm_inputs = 2 * t * h // sp * e
    attention = t * ((n + 2 * g) * d + (n + g) * d + n * d) // tp * e
    rope = 4 * b.seq_length * d * e
    mlp = t * 5 * f // tp * e
    saved = norms + gemm_inputs + attention + rope + mlp
    if recompute != "selective":
        saved += t * n // tp * 4
    return saved


def layer_working_bytes(cfg: ModelConfig, b: Batch) -> int:
    """Transient bytes of one layer's backward beyond what it saved: the gradients flowing through the MLP
    (of linear_fc1's output and of its two halves) and the hidden-state gradient [T, h] on either side, in the
    model dtype."""
    t, e = b.tokens, b.dtype_bytes
    return t * (4 * cfg.ffn_hidden_size // b.tp + 2 * cfg.hidden_size) * e


def in_flight(pp: int, pp_rank: int, num_micro: int) -> int:
    """Micro-batches whose activations 1F1B keeps at once on pipeline rank ``pp_rank``."""
    return min(pp - pp_rank, num_micro)


def kd_loss_bytes(vocab_rows: int, hidden: int, tokens: int, chunk_tokens: int, dtype_bytes: int,
                  with_teacher: bool) -> int:
    """Peak bytes of the fused chunked KD loss (``distill.losses.FusedLogitKD``) with gradients.

    It runs chunks of ``chunk_tokens / 4`` tokens, each holding the student's and the teacher's fp32 logits
    [chunk, V/tp] and a copy of each (two buffers without a teacher), plus the 16-bit GEMM output of a chunk
    before its cast to fp32; it keeps the fp32 gradients of the student's hidden states [T, h] and of its
    output-weight shard [V/tp, h] until the backward, and a few fp32 statistics per token.
    """
    chunk = max(1, chunk_tokens // 4)
    buffers = 4 if with_teacher else 2
    logits = buffers * chunk * vocab_rows * 4 + (chunk * vocab_rows * dtype_bytes if dtype_bytes < 4 else 0)
    grads = tokens * hidden * 4 + vocab_rows * hidden * 4
    stats = 8 * tokens * 4
    return logits + grads + stats


def forward_working_bytes(cfg: ModelConfig, b: Batch) -> int:
    """Transient bytes of one layer's forward without gradients (evaluation, calibration, the frozen teacher):
    the residual and the gathered input [T, h], the MLP's fc1 output, SiLU and product [T, 4 f / tp]."""
    t, e = b.tokens, b.dtype_bytes
    return t * (cfg.hidden_size // b.sp + cfg.hidden_size + 4 * cfg.ffn_hidden_size // b.tp) * e


def logits_bytes(vocab_rows: int, tokens: int, dtype_bytes: int) -> int:
    """Cross entropy over full logits (evaluation): the logits [T, V/tp] in the model dtype, an fp32 copy
    and one fp32 temporary."""
    return tokens * vocab_rows * (dtype_bytes + 8)
