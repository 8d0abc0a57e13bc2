"""Canonical megatron-core tensors -> one GGUF file for llama.cpp (architecture ``llama``).

What llama.cpp expects, and how it differs from the Hugging Face layout that :mod:`.hf` produces:

- tensor names: ``token_embd``, ``blk.N.attn_q`` ... (``gguf``'s own name map translates HF names);
- q and k rows in llama.cpp's rotary layout: inside each head, HF rotates the first half of the rows against
  the second half, llama.cpp rotates adjacent pairs (rows 2i, 2i+1); :func:`to_rotary_layout` interleaves the
  halves (the inverse of the un-permutation in DESIGN.md section 5);
- Llama-3.1 RoPE scaling as a ``rope_freqs`` tensor of per-frequency divisors;
- the tokenizer as metadata: byte-level BPE tokens, types and merges, special token ids, the pre-tokenizer
  name that selects llama.cpp's splitting regex, and the chat template;
- no ``output.weight`` when the embeddings are tied.

Tensor types: F32, F16, BF16 or Q8_0 for 2-D weights (norms and ``rope_freqs`` always F32). Q8_0 quantizes
blocks of 32 values along a row; a weight whose rows are not a multiple of 32 long is stored as F16 instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
import torch

from nemo_minitron.checkpoint.hf import hf_state_dict
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel.sharding import canonical_meta

# dtype name in configs -> (type of 2-D weights, general.file_type)
GGUF_DTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "float32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "float16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bfloat16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# The Split regex of Llama-3's tokenizer.json; llama.cpp implements it as pre-tokenizer "llama-bpe".
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class GGUFTokenizer:
    """The tokenizer of a model directory in the form GGUF stores it (``tokenizer.ggml.*``)."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when llama.cpp has no equivalent."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds[-1:] != ["ByteLevel"] or steps[-1].get("add_prefix_space", False):
        return None
    byte_level_splits = steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_level_splits:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_splits:
        return "smollm"
    if (
        kinds == ["Split", "ByteLevel"]
        and not byte_level_splits
        and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT_REGEX
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert", False)
    ):
        return "llama-bpe"
    return None


def read_tokenizer(tokenizer_dir: Path, vocab_size: int) -> GGUFTokenizer:
    """Read ``tokenizer.json`` (and its config files) of a model directory for GGUF (one-line errors).

    Token ids the tokenizer does not use, up to the model's ``vocab_size``, become unused ``[PADn]`` tokens.
    """
    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{tokenizer_dir}: no tokenizer.json (GGUF export needs the model's byte-level BPE tokenizer)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{file}: cannot read ({exc})") from None
    model = data.get("model", {})
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise UserError(f"{file}: GGUF export supports byte-level BPE tokenizers only (GPT-2 / Llama-3 style)")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    if pre is None:
        described = json.dumps(data.get("pre_tokenizer"))[:120]
        raise UserError(f"{file}: pre-tokenizer {described} has no llama.cpp equivalent")

    id_to_token: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in id_to_token}
    for added in data.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    largest = max(id_to_token)
    if largest >= vocab_size:
        raise UserError(f"{file}: token id {largest} does not fit the model's vocab_size {vocab_size}")
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]

    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError(f"{file}: the BPE model has no merges")
    # Written explicitly: llama.cpp's defaults for a missing flag differ between versions.
    for flag in ("bos", "eos"):
        special.add_special_token.setdefault(flag, False)
    return GGUFTokenizer(tokens=tokens, token_types=token_types, pre=pre, special=special)


def to_rotary_layout(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF q/k rows (per head: first half, then second half of the rotary pairs) -> llama.cpp's layout
    (per head: the pairs interleaved, row 2i holding HF row i and row 2i+1 HF row i + head_dim/2)."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors llama.cpp applies to the unscaled RoPE frequencies (``rope_freqs.weight``)."""
    unscaled = cfg.model_copy(update={"rope_scaling": None}).rope_inv_freq()
    return unscaled / cfg.rope_inv_freq()


def gguf_tensors(canonical: Iterable[tuple[str, torch.Tensor]],
                 cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF tensor names and fp32 values, in llama.cpp's layouts, from canonical ``(name, tensor)`` pairs (one at
    a time: each is converted as it comes)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    heads = {"self_attn.q_proj.weight": cfg.num_attention_heads, "self_attn.k_proj.weight": cfg.num_query_groups}
    for key, canonical_value in canonical:
        for hf_name, value in hf_state_dict({key: canonical_value}, cfg):
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if name is None:
                raise UserError(f"no GGUF name for tensor '{hf_name}'")
            value = value.float()
            for suffix, num_heads in heads.items():
                if hf_name.endswith(suffix):
                    value = to_rotary_layout(value, num_heads)
            yield name, value
    if cfg.rope_scaling is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg)


def tensor_type(value: torch.Tensor, dtype: str) -> gguf.GGMLQuantizationType:
    """The GGUF type a tensor is stored in for the file dtype ``dtype``."""
    wanted = GGUF_DTYPES[dtype][0]
    if value.dim() < 2:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if value.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


def write_gguf(
    canonical: Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    tokenizer: GGUFTokenizer,
    path: Path,
    dtype: str,
    name: str,
) -> None:
    """Write the model as a GGUF file at ``path`` (architecture metadata, tokenizer, tensors) from its canonical
    ``(name, tensor)`` pairs in the order of :func:`~nemo_minitron.parallel.sharding.canonical_meta`, one
    tensor at a time: the tensor infos are planned from ``cfg``'s shapes, then each tensor is written as it
    comes."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(GGUF_DTYPES[dtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # A llama-architecture GGUF has no sliding window: a Mistral model is exact up to its window.
    context = cfg.max_position_embeddings
    if cfg.sliding_window is not None:
        context = min(context, cfg.sliding_window)
    writer.add_context_length(context)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_query_groups)
    writer.add_key_length(cfg.kv_channels)
    writer.add_value_length(cfg.kv_channels)
    writer.add_rope_dimension_count(cfg.kv_channels)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    tokenizer.special.add_to_gguf(writer, quiet=True)

    # The shapes, types and sizes of every tensor come first in the file: the same conversion on meta tensors.
    for tensor_name, value in gguf_tensors(canonical_meta(cfg).items(), cfg):
        qtype = tensor_type(value, dtype)
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(tuple(value.shape), qtype))
        writer.add_tensor_info(tensor_name, tuple(value.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, value in gguf_tensors(canonical, cfg):
        writer.write_tensor_data(gguf.quants.quantize(value.numpy(), tensor_type(value, dtype)))
    writer.close()
