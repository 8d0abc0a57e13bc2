"""Build a megatron-core ``GPTModel`` from a :class:`ModelConfig` — the one place that makes a
``TransformerConfig``.

The Transformer Engine layer spec is used when TE imports and CUDA is present (BF16, optionally FP8);
otherwise megatron-core's local spec (``torch.nn.RMSNorm``) with PyTorch's fused attention
(:mod:`nemo_minitron.models.attention`), which runs on CPU.

Sequence parallelism (TP > 1) splits the sequence over the TP ranks in the norms and residuals between the
tensor-parallel GEMMs; the local spec then normalises with :class:`~nemo_minitron.models.norm.SequenceParallelRMSNorm`
(TE's norms support it themselves). Activation recomputation is megatron's ``recompute_granularity``:
``selective`` recomputes core attention in backward, ``full`` every transformer layer from its input.

FP8 (``fp8="hybrid"``: E4M3 forward, E5M2 gradients; ``"e4m3"``: E4M3 both ways) uses TE's delayed scaling.
megatron-core's ``TransformerBlock`` enters TE's ``fp8_autocast`` around its layers itself when the config
sets ``fp8``, so the forward needs no wrapping here; the embedding and the output projection keep the model dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

import torch
import torch.nn.functional as F

from nemo_minitron.dtypes import Fp8
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel import state
from nemo_minitron.parallel.cpu import cuda_available

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

# Transformer Engine's FP8 GEMMs need every matrix dimension to be a multiple of 16.
FP8_MULTIPLE = 16

# megatron's recompute_granularity.
Recompute = Literal["selective", "full"]


def te_available() -> bool:
    if not cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _leave_unset(tensor: torch.Tensor) -> torch.Tensor:
    """An init method that initialises nothing (the weights are loaded next)."""
    return tensor


def transformer_config(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    fp8: Optional[Fp8] = None,
    init: bool = True,
    use_te: bool = False,
    sequence_parallel: bool = False,
    recompute: Optional[Recompute] = None,
    on_gpu: Optional[bool] = None,
):
    """megatron's ``TransformerConfig`` for ``cfg`` at the current TP/PP sizes; ``init`` False skips the random
    initialisation of the weights (for a model whose every weight is loaded next); ``use_te`` for the
    Transformer Engine layer spec. ``on_gpu`` (default: whether CUDA is present) picks the GPU-only flags, so a
    CPU test can build what a GPU builds."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = cuda_available() if on_gpu is None else on_gpu
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        init_method_std=0.02,
        # Without init, megatron still runs its initialisation (which also marks the tensor-parallel weights
        # for the gradient norm) but with a method that leaves the memory as it is: no random draws.
        **({} if init else {"init_method": _leave_unset, "output_layer_init_method": _leave_unset}),
        # Mistral's window counts the token itself: it sees the W - 1 tokens before it.
        window_size=(cfg.sliding_window - 1, 0) if cfg.sliding_window else None,
        tensor_model_parallel_size=state.tp_size(),
        pipeline_model_parallel_size=state.pp_size(),
        sequence_parallel=sequence_parallel,
        recompute_granularity=recompute,
        # Full recomputation keeps each layer's input only (one layer per checkpointed chunk).
        **({"recompute_method": "uniform", "recompute_num_layers": 1} if recompute == "full" else {}),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=fp8,
        fp8_recipe="delayed" if fp8 else None,
        # Fused kernels and CUDA-side initialisation exist only on GPUs.
        use_cpu_initialization=not on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # A TE norm option: megatron's wrapper of the torch norms of the local spec refuses it.
        persist_layer_norm=use_te,
        masked_softmax_fusion=on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        # gloo gives silently wrong results with batched p2p under interleaved schedules.
        batch_p2p_comm=on_gpu,
    )


def check_fp8_shapes(cfg: ModelConfig, tp: int, model: str = "") -> None:
    """One-line error (starting with ``model``, when given, e.g. "teacher") unless every GEMM dimension of a
    layer of ``cfg`` on one of ``tp`` tensor-parallel ranks is a multiple of 16."""
    d = cfg.kv_channels
    for name, value in (
        ("hidden_size", cfg.hidden_size),
        ("ffn_hidden_size / TP", cfg.ffn_hidden_size // tp),
        ("num_attention_heads x head_dim / TP", cfg.num_attention_heads * d // tp),
        ("num_query_groups x head_dim / TP", cfg.num_query_groups * d // tp),
    ):
        if value % FP8_MULTIPLE:
            raise UserError(f"{model + ': ' if model else ''}fp8 needs GEMM dimensions that are multiples of "
                            f"{FP8_MULTIPLE}: {name} is {value}")


def layer_spec(use_te: bool, sequence_parallel: bool = False):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from nemo_minitron.models.attention import SDPACoreAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if sequence_parallel:
        from nemo_minitron.models.norm import SequenceParallelRMSNorm

        spec.submodules.input_layernorm = SequenceParallelRMSNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return spec


def block_spec(config: TransformerConfig, use_te: bool):
    """The decoder spec of this pipeline stage: megatron's layer spec, and with the local spec under sequence
    parallelism a block spec whose final norm allows it (from a layer spec, megatron picks a final norm that
    refuses it)."""
    spec = layer_spec(use_te, config.sequence_parallel)
    if use_te or not config.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from nemo_minitron.models.norm import SequenceParallelRMSNorm

    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    use_te: Optional[bool] = None,
    fp8: Optional[Fp8] = None,
    init: bool = True,
    sequence_parallel: bool = False,
    recompute: Optional[Recompute] = None,
    on_gpu: Optional[bool] = None,
):
    """This rank's part (its pipeline stage, its tensor shard) of the model. Needs :func:`state.initialize`.

    ``use_te`` None picks the TE spec when TE and CUDA are present; ``fp8`` needs the TE spec. ``init`` False
    leaves the weights unset (uninitialised memory) for :func:`~nemo_minitron.parallel.sharding.load_canonical`
    to fill. ``sequence_parallel`` needs TP > 1 and inputs whose length is a multiple of TP; ``recompute``
    (selective or full) takes effect in training mode. ``on_gpu`` as in :func:`transformer_config`."""
    from megatron.core.models.gpt import GPTModel

    use_te = te_available() if use_te is None else use_te
    if fp8 is not None:
        if not use_te:
            raise UserError("fp8 needs the Transformer Engine layer spec (CUDA and transformer_engine)")
        check_fp8_shapes(cfg, state.tp_size())
    if sequence_parallel and state.tp_size() == 1:
        raise UserError("sequence parallelism needs tensor_model_parallel_size > 1")
    config = transformer_config(cfg, dtype, fp8, init, use_te, sequence_parallel, recompute, on_gpu)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, use_te),
        vocab_size=cfg.padded_vocab_size(state.tp_size()),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=state.is_first_stage(),
        post_process=state.is_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        parallel_output=True,
    )
    # megatron's built-in Llama-3 scaling fixes low/high factors and the original context; ours does not.
    model.rotary_pos_emb.inv_freq = cfg.rope_inv_freq().to(model.rotary_pos_emb.inv_freq.device)
    if cuda_available():
        model.cuda()
    return model


def compile_layers(model) -> None:
    """``torch.compile`` each transformer layer of ``model`` in place: the element-wise work around the GEMMs
    (norms, rotary embeddings, SwiGLU, residuals) is fused into a few generated kernels
    (``benchmarks/kd_throughput.py`` measures the effect). Layers of one shape share one compiled graph; the
    first calls compile it."""
    for layer in model.decoder.layers:
        layer.compile()
