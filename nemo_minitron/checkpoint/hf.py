"""Hugging Face Llama / Mistral directories <-> canonical megatron-core tensors.

Only the mapping lives here; the TP/PP split is :mod:`nemo_minitron.parallel.sharding`'s job, so an HF
checkpoint loads at any parallel size. Weights are read lazily, one tensor at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Tokenizer and generation files travel with the weights so an exported student is usable as it is.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)

_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "model_config.json").is_file()


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our :class:`ModelConfig` from a Hugging Face ``config.json`` dict (one-line error if unsupported)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{source}: unsupported model_type '{model_type}' "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise UserError(f"{source}: {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: unsupported hidden_act '{hf['hidden_act']}' (supported: silu)")
    # transformers >= 5 writes rope settings as `rope_parameters`; older files use rope_theta/rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{source}: unsupported rope type '{rope_type}' (supported: default, llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    eos = hf.get("eos_token_id")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 0,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        sliding_window=hf.get("sliding_window"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def check_exportable(cfg: ModelConfig) -> None:
    """transformers' Llama/Mistral configs refuse a hidden size that is not a multiple of the head count
    (even with an explicit head_dim): such a model cannot be exported for transformers / vLLM."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(
            f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_attention_heads}: "
            "transformers cannot load such a Llama/Mistral config (prune hidden_size to a multiple)"
        )


def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """A ``config.json`` dict that transformers loads as ``LlamaConfig`` / ``MistralConfig``."""
    from transformers import AutoConfig

    check_exportable(cfg)
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **cfg.rope_scaling.model_dump()}
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        architectures=["MistralForCausalLM" if cfg.model_type == "mistral" else "LlamaForCausalLM"],
        dtype="float32",
    )
    if cfg.model_type == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    return AutoConfig.for_model(cfg.model_type, **kwargs).to_dict()


def read_hf_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{file}: cannot read ({exc})") from None
    return model_config_from_hf(hf, str(file))


class HFTensors:
    """Lazy access to the tensors of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.path = path
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise UserError(f"{self.path}: tensor '{name}' is missing")
        file = self.weight_map[name]
        if file not in self._handles:
            if not (self.path / file).is_file():
                raise UserError(f"{self.path}: shard '{file}' is missing")
            self._handles[file] = safe_open(self.path / file, "pt")
        tensor = self._handles[file].get_tensor(name)
        # Checked as it is read, so no load pays a second pass over the files: a NaN or inf in the weights
        # would otherwise surface much later, as a NaN loss or a diverged distillation.
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{self.path / file}: tensor '{name}' holds {bad} non-finite values (NaN or inf)")
        return tensor


def canonical_getter(tensors: HFTensors, cfg: ModelConfig) -> Callable[[str], torch.Tensor]:
    """``get(canonical_name)`` over an HF checkpoint: fuses q/k/v into megatron's grouped QKV and
    gate/up into ``linear_fc1``."""
    g, hpg, d = cfg.num_query_groups, cfg.heads_per_group, cfg.kv_channels

    def get(key: str) -> torch.Tensor:
        if key in _TOP_MAP:
            return tensors.get(_TOP_MAP[key])
        layer, rest = key.split(".", 3)[2], key.split(".", 3)[3]
        pre = f"model.layers.{layer}."
        if rest == "self_attention.linear_qkv.weight":
            q = tensors.get(pre + "self_attn.q_proj.weight")
            k = tensors.get(pre + "self_attn.k_proj.weight")
            v = tensors.get(pre + "self_attn.v_proj.weight")
            h = q.shape[1]
            qkv = torch.cat([q.view(g, hpg, d, h), k.view(g, 1, d, h), v.view(g, 1, d, h)], dim=1)
            return qkv.reshape(-1, h)
        if rest == "mlp.linear_fc1.weight":
            return torch.cat([tensors.get(pre + "mlp.gate_proj.weight"), tensors.get(pre + "mlp.up_proj.weight")])
        return tensors.get(pre + _LAYER_MAP[rest])

    return get


def hf_state_dict(canonical: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensor names and values from a canonical state dict (inverse of :func:`canonical_getter`)."""
    g, hpg, d = cfg.num_query_groups, cfg.heads_per_group, cfg.kv_channels
    for key, value in canonical.items():
        if key in _TOP_MAP:
            if key == "output_layer.weight" and cfg.tie_word_embeddings:
                continue
            yield _TOP_MAP[key], value
            continue
        layer, rest = key.split(".", 3)[2], key.split(".", 3)[3]
        pre = f"model.layers.{layer}."
        if rest == "self_attention.linear_qkv.weight":
            h = value.shape[1]
            qkv = value.view(g, hpg + 2, d, h)
            yield pre + "self_attn.q_proj.weight", qkv[:, :hpg].reshape(-1, h).clone()
            yield pre + "self_attn.k_proj.weight", qkv[:, hpg].reshape(-1, h).clone()
            yield pre + "self_attn.v_proj.weight", qkv[:, hpg + 1].reshape(-1, h).clone()
        elif rest == "mlp.linear_fc1.weight":
            gate, up = value.chunk(2, 0)
            yield pre + "mlp.gate_proj.weight", gate.clone()
            yield pre + "mlp.up_proj.weight", up.clone()
        else:
            yield pre + _LAYER_MAP[rest], value


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
