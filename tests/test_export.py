"""The `export` stage: HF directories and GGUF files, checked by loading them in transformers.

GGUF files are read back with transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``), which
undoes llama.cpp's rotary q/k layout and builds the tokenizer from the GGUF metadata: logits and tokens must
match the source. llama.cpp itself reads them in tests/test_llamacpp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from exports import TEACHER_VOCAB, held_out_ids, hf_window_logits, megatron_window_logits, perplexity, run_export
from nemo_minitron import embedded
from nemo_minitron.checkpoint import io
from nemo_minitron.checkpoint.gguf_export import llama3_rope_factors, tensor_type, to_rotary_layout
from nemo_minitron.cli import main
from nemo_minitron.models.config import ModelConfig

Q = gguf.GGMLQuantizationType
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest logit error against the fp32 source: 1e-4 (fp32 noise) plus, relative to the largest logit, about
# the relative rounding of the storage type (fp16 keeps 11 significant bits, bf16 8) with margin for its
# growth over the layers.
SOURCE_TOL = {"float32": 0.0, "float16": 2e-2, "bfloat16": 1.5e-1}


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------- layouts


def test_rotary_layout_is_the_inverse_of_the_gguf_unpermutation() -> None:
    """DESIGN.md section 5 un-permutes llama.cpp's q/k rows with
    ``w.reshape(n, rows//n//2, 2, cols).swapaxes(1, 2)``; exporting must be its exact inverse, and pair row i
    of each HF head with row i + head_dim/2 as adjacent rows."""
    heads, head_dim, cols = 3, 8, 5
    w = torch.randn(heads * head_dim, cols)
    rotary = to_rotary_layout(w, heads)
    rows = w.shape[0]
    back = rotary.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert torch.equal(back, w)
    for h in range(heads):
        for i in range(head_dim // 2):
            assert torch.equal(rotary[h * head_dim + 2 * i], w[h * head_dim + i])
            assert torch.equal(rotary[h * head_dim + 2 * i + 1], w[h * head_dim + head_dim // 2 + i])


def test_llama3_rope_factors_match_transformers() -> None:
    """``rope_freqs`` holds unscaled / scaled frequency, with transformers' llama3 frequencies as truth."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nemo_minitron.checkpoint.hf import hf_config_from_model_config

    cfg = ModelConfig(
        vocab_size=64, hidden_size=512, ffn_hidden_size=64, num_layers=1, num_attention_heads=4,
        num_query_groups=2, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    hf_cfg = LlamaConfig.from_dict(hf_config_from_model_config(cfg))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    unscaled = 1.0 / (cfg.rope_theta ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = llama3_rope_factors(cfg)
    torch.testing.assert_close(factors, unscaled / scaled, rtol=1e-5, atol=0)
    # High frequencies stay, low ones are divided by the full factor, the band between is smoothed.
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert ((factors > 1.0) & (factors < 8.0)).any()


def test_tensor_types_per_dtype() -> None:
    matrix, odd, norm = torch.zeros(8, 64), torch.zeros(8, 450), torch.zeros(64)
    types = [tensor_type(matrix, d) for d in ("float32", "float16", "bfloat16", "q8_0")]
    assert types == [Q.F32, Q.F16, Q.BF16, Q.Q8_0]
    assert tensor_type(norm, "q8_0") == Q.F32 and tensor_type(norm, "float16") == Q.F32
    # Q8_0 blocks are 32 values of a row: a 450-long row cannot be cut into them.
    assert tensor_type(odd, "q8_0") == Q.F16 and tensor_type(odd, "bfloat16") == Q.BF16


# ------------------------------------------------------------------------------- GGUF via transformers


@pytest.mark.parametrize(
    "name, dtype",
    [("untied", "float32"), ("untied", "float16"), ("tied_padded", "float16"), ("tied_padded", "bfloat16")],
)
def test_gguf_logits_match_the_source(gguf_checkpoints, destroy_after, tmp_path, name, dtype) -> None:
    """Exact up to the storage type: the GGUF model equals our model with its matrices rounded to ``dtype``
    (norms stay fp32 in both), and stays close to the fp32 source."""
    out = run_export(gguf_checkpoints[name], tmp_path / f"{name}.gguf", "gguf", dtype)
    ids = held_out_ids(96)
    theirs = hf_window_logits(gguf_model(out), ids)
    loaded = io.load_model(str(gguf_checkpoints[name]))
    source = megatron_window_logits(loaded, ids)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.copy_(p.to(DTYPES[dtype]).float())
    rounded = megatron_window_logits(loaded, ids)
    assert theirs.shape == source.shape
    exact = (theirs - rounded).abs().max().item()
    diff = (theirs - source).abs().max().item()
    scale = source.abs().max().item()
    print(f"{name} {dtype}: max |gguf - source| = {diff:.3g}, vs rounded source {exact:.3g}, logits up to {scale:.1f}")
    assert exact <= 1e-4
    assert diff <= 1e-4 + SOURCE_TOL[dtype] * scale
    # Weights have std 0.2: a wrong layout or a missing layer would be far above the tolerances.
    assert scale > 1.0


def test_gguf_q8_0_perplexity_within_2_percent(gguf_checkpoints, destroy_after, tmp_path) -> None:
    out = run_export(gguf_checkpoints["untied"], tmp_path / "q8.gguf", "gguf", "q8_0")
    ids = held_out_ids(256)
    source_ppl = perplexity(megatron_window_logits(gguf_checkpoints["untied"], ids), ids)
    q8_logits = hf_window_logits(gguf_model(out), ids)
    q8_ppl = perplexity(q8_logits, ids)
    assert abs(q8_ppl / source_ppl - 1) <= 0.02, f"Q8_0 ppl {q8_ppl:.2f} vs source {source_ppl:.2f}"
    # Quantized for real: the logits moved.
    assert (q8_logits - megatron_window_logits(gguf_checkpoints["untied"], ids)).abs().max() > 1e-4


def test_gguf_metadata_and_tokenizer(gguf_checkpoints, destroy_after, tmp_path) -> None:
    from transformers import AutoTokenizer

    out = run_export(gguf_checkpoints["tied_padded"], tmp_path / "m.gguf", "gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    cfg = io.read_model_config(gguf_checkpoints["tied_padded"])
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_layers,
        "llama.feed_forward_length": cfg.ffn_hidden_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_query_groups,
        "llama.attention.key_length": cfg.kv_channels,
        "llama.rope.dimension_count": cfg.kv_channels,
        "llama.vocab_size": cfg.vocab_size,
    }
    assert {k: field(k) for k in expected} == expected
    assert field("llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)

    hf_tok = AutoTokenizer.from_pretrained(embedded.teacher_dir())
    tokens = field("tokenizer.ggml.tokens")
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == cfg.vocab_size == TEACHER_VOCAB + 40
    assert tokens[:TEACHER_VOCAB] == hf_tok.convert_ids_to_tokens(list(range(TEACHER_VOCAB)))
    assert tokens[TEACHER_VOCAB:] == [f"[PAD{i}]" for i in range(TEACHER_VOCAB, cfg.vocab_size)]
    types = field("tokenizer.ggml.token_type")
    assert set(types[TEACHER_VOCAB:]) == {gguf.TokenType.UNUSED}
    assert {types[i] for i in hf_tok.all_special_ids} == {gguf.TokenType.CONTROL}
    merges = json.loads((embedded.teacher_dir() / "tokenizer.json").read_text())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert field("tokenizer.ggml.bos_token_id") == hf_tok.bos_token_id
    assert field("tokenizer.ggml.eos_token_id") == hf_tok.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == hf_tok.pad_token_id
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == hf_tok.chat_template

    types_by_name = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types_by_name  # tied: llama.cpp reuses token_embd
    assert types_by_name["token_embd.weight"] == Q.Q8_0 and types_by_name["blk.0.attn_q.weight"] == Q.Q8_0
    assert types_by_name["blk.0.attn_norm.weight"] == Q.F32 and types_by_name["output_norm.weight"] == Q.F32
    assert len(types_by_name) == 2 + 9 * cfg.num_layers

    # transformers builds the same tokenizer from the GGUF metadata alone.
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind 1601"
    gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert gguf_tok(text)["input_ids"] == hf_tok(text)["input_ids"]


def test_untied_gguf_has_output_and_rope_model_has_rope_freqs(gguf_checkpoints, destroy_after, tmp_path) -> None:
    untied = gguf.GGUFReader(run_export(gguf_checkpoints["untied"], tmp_path / "u.gguf", "gguf", "float32"))
    assert "output.weight" in {t.name for t in untied.tensors}
    rope_file = run_export(gguf_checkpoints["rope"], tmp_path / "r.gguf", "gguf", "float32")
    rope = {t.name: t for t in gguf.GGUFReader(rope_file).tensors}
    cfg = io.read_model_config(gguf_checkpoints["rope"])
    np.testing.assert_array_equal(rope["rope_freqs.weight"].data, llama3_rope_factors(cfg).numpy())


# ------------------------------------------------------------------------------------------ HF export


def test_hf_export_stage_reloads_with_the_same_logits(gguf_checkpoints, destroy_after, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    out = run_export(gguf_checkpoints["untied"], tmp_path / "hf", "hf", "float32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = held_out_ids(64)
    diff = (hf_window_logits(model, ids) - megatron_window_logits(gguf_checkpoints["untied"], ids)).abs().max().item()
    assert diff <= 1e-4
    assert (out / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------- user errors


def test_export_configs_are_checked_before_any_work(gguf_checkpoints, tmp_path, capsys) -> None:
    ckpt = gguf_checkpoints["untied"]
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"keep me")
    no_tokenizer = tmp_path / "no_tok"
    no_tokenizer.mkdir()
    for f in ckpt.iterdir():
        if not f.name.startswith("tokenizer") and f.name != "chat_template.jinja":
            (no_tokenizer / f.name).symlink_to(f)
    cases = [
        ([f"source={ckpt}", "format=onnx", f"output={tmp_path / 'a'}"], "format: Input should be 'hf' or 'gguf'"),
        ([f"source={ckpt}", f"output={tmp_path / 'a.gguf'}"], "format: Field required"),
        ([f"source={tmp_path / 'missing'}", "format=gguf", f"output={tmp_path / 'a.gguf'}"],
         "model directory not found"),
        ([f"source={ckpt}", "format=gguf", "dtype=int4", f"output={tmp_path / 'a.gguf'}"], "dtype: Input should be"),
        ([f"source={ckpt}", "format=hf", "dtype=q8_0", f"output={tmp_path / 'a'}"], "dtype: q8_0 is a GGUF type"),
        ([f"source={ckpt}", "format=gguf", f"output={tmp_path / 'a.bin'}"], "named *.gguf"),
        ([f"source={ckpt}", "format=gguf", f"output={existing}"], "output already exists"),
        ([f"source={no_tokenizer}", "format=gguf", f"output={tmp_path / 'a.gguf'}"], "no tokenizer.json"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_tok", "there.gguf"]


def test_unsupported_tokenizers_are_one_line_errors(gguf_checkpoints, tmp_path, capsys) -> None:
    """A pre-tokenizer llama.cpp cannot reproduce is refused rather than exported with a wrong split."""
    src = tmp_path / "ckpt"
    src.mkdir()
    for f in gguf_checkpoints["untied"].iterdir():
        if f.name != "tokenizer.json":
            (src / f.name).symlink_to(f)
    data = json.loads((gguf_checkpoints["untied"] / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(data))
    assert main(["export", f"source={src}", "format=gguf", f"output={tmp_path / 'x.gguf'}"]) == 2
    assert "has no llama.cpp equivalent" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------- the embedded teacher


@pytest.mark.slow
def test_teacher_gguf_f16_and_q8_0_via_transformers(destroy_after, tmp_path) -> None:
    """The real 30-layer teacher: F16 logits close to the source, Q8_0 held-out perplexity within 2%."""
    f16 = run_export(embedded.TEACHER, tmp_path / "f16.gguf", "gguf", "float16")
    q8 = run_export(embedded.TEACHER, tmp_path / "q8.gguf", "gguf", "q8_0")
    ids = held_out_ids(512, play="macbeth")
    source = megatron_window_logits(embedded.teacher_dir(), ids)
    f16_logits = hf_window_logits(gguf_model(f16), ids)
    diff = (f16_logits - source).abs().max().item()
    print(f"teacher F16 max |gguf - source| = {diff:.4f} (logits up to {source.abs().max():.1f})")
    # fp16 weights over 30 layers: the largest logit error stays a small fraction of a logit unit.
    assert diff <= 0.1
    source_ppl, q8_ppl = perplexity(source, ids), perplexity(hf_window_logits(gguf_model(q8), ids), ids)
    print(f"teacher ppl: source {source_ppl:.3f}, Q8_0 {q8_ppl:.3f}, ratio {q8_ppl / source_ppl:.4f}")
    assert abs(q8_ppl / source_ppl - 1) <= 0.02
