"""Tiny random Llama / Mistral checkpoints in Hugging Face format, written by transformers itself."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_minitron import embedded


def write_tiny_hf(
    path: Path,
    *,
    tied: bool = False,
    model_type: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    rope_scaling: bool = False,
    seed: int = 0,
    with_tokenizer: bool = False,
) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        rope_parameters=rope,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init has tiny weights; larger norms make layer-by-layer mistakes visible in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    if with_tokenizer:
        from nemo_minitron.checkpoint.hf import copy_tokenizer_files

        copy_tokenizer_files(embedded.teacher_dir(), path)
    return path


def prepare_tiny_corpus(root: Path, tokenizer_dir: Path, parts: int = 8, chars: int = 2500) -> Path:
    """``parts`` pieces of ``chars`` characters of Hamlet (the embedded corpus), prepared with the tokenizer of
    ``tokenizer_dir`` into ``root / "data"`` (a quarter held out); the prepared directory."""
    from nemo_minitron.data import PrepareDataConfig, prepare_data

    play = next(embedded.corpus_dir().glob("tragedies/*hamlet*.md")).read_text(encoding="utf-8")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(parts):
        (corpus / f"part{i}.md").write_text(play[i * chars : (i + 1) * chars], encoding="utf-8")
    prepare_data(PrepareDataConfig(input=str(corpus), tokenizer=str(tokenizer_dir), output_dir=str(root / "data"),
                                   valid_fraction=0.25))
    return root / "data"
