"""llama.cpp itself reads the exported GGUF files (through llama-cpp-python: `make install-llama-cpp`).

Its logits are compared with our megatron-core model on the same token ids, its perplexity with our `eval`
on the same windows (NLL computed here from ``logits_all``), its tokenizer with transformers' on the same
text, and its greedy generation with transformers'. Skipped when llama-cpp-python is not installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exports import held_out_ids, megatron_window_logits, run_export
from nemo_minitron import embedded
from nemo_minitron.checkpoint.gguf_export import LLAMA3_SPLIT_REGEX
from nemo_minitron.evaluation.config import EvalConfig
from nemo_minitron.evaluation.stage import eval_tokens, evaluate

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llama-cpp)")

pytestmark = pytest.mark.llamacpp
THREADS = 2


def load(path: Path, n_ctx: int = 512, **kw) -> "llama_cpp.Llama":
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=THREADS, verbose=False, **kw)


def llamacpp_logits(llm: "llama_cpp.Llama", ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits [L, V] for one window of token ids (the model needs ``logits_all=True``)."""
    llm.reset()
    llm.eval(ids.tolist())
    return torch.from_numpy(np.array(llm.scores[: ids.numel()], dtype=np.float32))


def llamacpp_perplexity(llm: "llama_cpp.Llama", windows: list[torch.Tensor]) -> float:
    """exp of the mean NLL of tokens 2..L over all windows, as our `eval` scores them."""
    total, count = 0.0, 0
    for ids in windows:
        logits = llamacpp_logits(llm, ids).double()
        total += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return math.exp(total / count)


def play_file(tmp_path: Path, play: str) -> Path:
    text = next(embedded.corpus_dir().glob(f"*/*{play}*.md")).read_text(encoding="utf-8")
    out = tmp_path / f"{play}.txt"
    out.write_text(text, encoding="utf-8")
    return out


def ppl_ours_and_llamacpp(model: str, gguf_file: Path, text: Path, seq: int, windows: int) -> tuple[float, float]:
    """Our `eval` perplexity and llama.cpp's on exactly the same windows of ``text``."""
    cfg = EvalConfig(model=model, data=str(text), seq_length=seq, max_windows=windows)
    ours = evaluate(cfg).perplexity
    theirs = llamacpp_perplexity(load(gguf_file, n_ctx=seq, logits_all=True), eval_tokens(cfg, Path(model)))
    return ours, theirs


# ----------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", ["untied", "tied_padded", "rope"])
def test_llamacpp_logits_match_the_source(gguf_checkpoints, destroy_after, tmp_path, name) -> None:
    """F32 files, with an F32 KV cache (llama.cpp's default F16 cache rounds k and v): llama.cpp computes our
    model. 160 tokens pass the rope model's original context (64), where Llama-3.1 scaling (rope_freqs)
    changes the result."""
    out = run_export(gguf_checkpoints[name], tmp_path / f"{name}.gguf", "gguf", "float32")
    ids = held_out_ids(160)
    ours = megatron_window_logits(gguf_checkpoints[name], ids)
    f32 = llama_cpp.GGML_TYPE_F32
    theirs = llamacpp_logits(load(out, logits_all=True, type_k=f32, type_v=f32), ids)
    assert theirs.shape == ours.shape
    diff = (theirs - ours).abs().max().item()
    print(f"{name}: max |llama.cpp - ours| = {diff:.3g} (logits up to {ours.abs().max():.1f})")
    assert diff <= 2e-4
    assert ours.abs().max() > 1.0


@pytest.mark.parametrize("dtype", ["float16", "q8_0"])
def test_llamacpp_perplexity_within_2_percent_of_ours(gguf_checkpoints, destroy_after, tmp_path, dtype) -> None:
    ckpt = gguf_checkpoints["untied"]
    out = run_export(ckpt, tmp_path / f"{dtype}.gguf", "gguf", dtype)
    ours, theirs = ppl_ours_and_llamacpp(str(ckpt), out, play_file(tmp_path, "hamlet"), seq=128, windows=4)
    print(f"tiny {dtype}: ppl ours {ours:.2f}, llama.cpp {theirs:.2f}, ratio {theirs / ours:.4f}")
    assert abs(theirs / ours - 1) <= 0.02


def test_llamacpp_greedy_generation_matches_transformers(gguf_checkpoints, destroy_after, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = gguf_checkpoints["untied"]
    out = run_export(ckpt, tmp_path / "g.gguf", "gguf", "float32")
    hf_dir = run_export(ckpt, tmp_path / "hf", "hf", "float32")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt = "Friends, Romans, countrymen, lend me your ears;"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    llm = load(out)
    assert llm.tokenize(prompt.encode(), add_bos=False) == prompt_ids
    generated = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        generated.append(token)
        if len(generated) == 16:
            break
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    reference = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(prompt_ids):].tolist()
    assert generated == reference
    assert llm.detokenize(generated).decode("utf-8", errors="replace") == tokenizer.decode(reference)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template


def _with_pre_tokenizer(ckpt: Path, dst: Path, pre_tokenizer: dict) -> Path:
    """A copy of ``ckpt`` (weights linked) whose tokenizer.json splits text with ``pre_tokenizer``."""
    dst.mkdir()
    for f in ckpt.iterdir():
        if f.name != "tokenizer.json":
            (dst / f.name).symlink_to(f)
    data = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = pre_tokenizer
    (dst / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return dst


PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]},
}


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_llamacpp_tokenizes_like_transformers(gguf_checkpoints, destroy_after, tmp_path, pre) -> None:
    """Each supported pre-tokenizer: llama.cpp splits and merges a play (with numbers, contractions,
    runs of spaces and newlines) into exactly the ids transformers produces."""
    from transformers import PreTrainedTokenizerFast

    src = _with_pre_tokenizer(gguf_checkpoints["untied"], tmp_path / "src", PRE_TOKENIZERS[pre])
    out = run_export(src, tmp_path / "t.gguf", "gguf", "float32")
    text = play_file(tmp_path, "tempest").read_text(encoding="utf-8")[:20000]
    text += "\nIn 1611, 'twas   played\t\ttwice; they'll say 12345 times.\r\n\n  Exeunt."
    expected = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))(text, add_special_tokens=False)
    llm = load(out, vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    assert llm.tokenize(text.encode(), add_bos=False) == expected["input_ids"]


# ---------------------------------------------------------------------------------- the embedded teacher


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "q8_0"])
def test_teacher_in_llamacpp(destroy_after, tmp_path, dtype) -> None:
    """The real teacher in llama.cpp: held-out perplexity within 2% of our eval on the same 4 x 512 tokens
    of Macbeth, and a greedy chat answer that starts like transformers' fp32 one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_export(embedded.TEACHER, tmp_path / f"teacher-{dtype}.gguf", "gguf", dtype)
    teacher = str(embedded.teacher_dir())
    ours, theirs = ppl_ours_and_llamacpp(teacher, out, play_file(tmp_path, "macbeth"), seq=512, windows=4)
    print(f"teacher {dtype}: ppl ours {ours:.3f}, llama.cpp {theirs:.3f}, ratio {theirs / ours:.4f}")
    assert abs(theirs / ours - 1) <= 0.02

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    messages = [{"role": "user", "content": "Who wrote Macbeth?"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    llm = load(out)
    generated = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(generated) == 24:
            break
        generated.append(token)
    answer = llm.detokenize(generated).decode("utf-8", errors="replace")
    print(f"teacher {dtype} in llama.cpp: {answer!r}")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    reference = model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False)[0, len(prompt_ids):]
    assert generated[:4] == reference.tolist()
    assert answer.strip()
