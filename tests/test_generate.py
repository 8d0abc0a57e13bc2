"""The ``generate`` stage on a tiny model with the real SmolLM2 tokenizer (and its chat template): the dataset's
documents are the chat-rendered prompts and answers, greedy answers equal transformers' own ``generate`` on each
prompt alone, sampling is fixed by the seed, an interrupted run resumes to the same bytes, the output blends
with a prepared corpus, bad input is one line before any compute; and side-by-side chat answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_minitron.chat import GenerateConfig
from nemo_minitron.errors import UserError
from nemo_minitron.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Who wrote Macbeth?", "What is the capital of France?", "Write a haiku about the sea.",
           "Give me two tips for sleeping better.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from tiny import write_tiny_hf

    root = tmp_path_factory.mktemp("generate")
    model = write_tiny_hf(root / "tiny", vocab_size=49152, with_tokenizer=True, seed=7)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    return {"root": root, "model": model, "prompts": prompts}


def config(inputs: dict[str, Path], output: Path, **changes) -> GenerateConfig:
    sampling = {"temperature": 0.0, "max_new_tokens": 10, **changes.pop("sampling", {})}
    return GenerateConfig.model_validate({"model": str(inputs["model"]), "prompts": str(inputs["prompts"]),
                                          "output_dir": str(output), "batch_size": 2, "valid_fraction": 0.3,
                                          "sampling": sampling, **changes})


def documents(prefix: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the views die with ds's memory map


def reference_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy answer to ``prompt`` alone (no padding), cut before the first EOS."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


def test_greedy_dataset_holds_the_chat_rendered_prompts_and_transformers_answers(inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "chat"
    result = run_stage("generate", config(inputs, out))
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    model = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32).eval()
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (len(tokenizer), tokenizer.eos_token_id, "uint16")
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert result["answers"] == result["prompts"] == len(PROMPTS)
    assert result["answer_tokens"] == sum(len(r["answer_ids"]) for r in records) > len(PROMPTS)

    docs = {"train": documents(out / "train"), "valid": documents(out / "valid")}
    assert len(docs["train"]) >= 1 and len(docs["valid"]) >= 1
    assert meta["num_train_tokens"] == sum(len(d) for d in docs["train"])
    seen = {"train": 0, "valid": 0}
    for r in records:
        assert r["answer_ids"] == reference_answer(model, tokenizer, r["prompt"], 10)
        answer = tokenizer.decode(r["answer_ids"], skip_special_tokens=True).strip()
        assert r["answer"] == answer
        doc = docs[r["split"]][seen[r["split"]]]
        seen[r["split"]] += 1
        assert doc[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(doc[:-1].tolist())
        assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        f"<|im_end|>\n<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{answer}"
                        "<|im_end|>\n")
    assert seen == {s: len(d) for s, d in docs.items()}
    # A finished output with the same config is returned as it is; another config is refused.
    assert run_stage("generate", config(inputs, out)) == result
    with pytest.raises(UserError, match="different config.*sampling"):
        run_stage("generate", config(inputs, out, sampling={"max_new_tokens": 11}))


def test_a_system_prompt_replaces_the_templates_own(inputs, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "chat"
    run_stage("generate", config(inputs, out, system_prompt="Answer briefly.", max_prompts=2,
                                 sampling={"max_new_tokens": 3}))
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    texts = [tokenizer.decode(d.tolist()) for s in ("train", "valid") for d in documents(out / s)]
    assert len(texts) == 2
    assert all(t.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n") for t in texts)


def _bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.bin", "train.idx", "valid.bin", "valid.idx",
                                                          "answers.jsonl")}


SAMPLED = {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "samples_per_prompt": 2, "max_new_tokens": 8}


def test_sampling_is_fixed_by_the_seed_and_an_interrupted_run_resumes_to_the_same_bytes(inputs, tmp_path,
                                                                                     monkeypatch):
    from nemo_minitron.chat import generate as stage

    first = run_stage("generate", config(inputs, tmp_path / "a", sampling=SAMPLED))
    assert first["answers"] == 2 * len(PROMPTS)
    run_stage("generate", config(inputs, tmp_path / "b", sampling=SAMPLED))
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    run_stage("generate", config(inputs, tmp_path / "c", sampling={**SAMPLED, "seed": 99}))
    assert _bytes(tmp_path / "a")["answers.jsonl"] != _bytes(tmp_path / "c")["answers.jsonl"]
    records = [json.loads(line) for line in (tmp_path / "a" / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p for p in PROMPTS for _ in range(2)]
    assert any(records[i]["answer_ids"] != records[i + 1]["answer_ids"] for i in range(0, len(records), 2))

    # Killed after its second batch: no output, and the next run draws only the batches still missing.
    real, calls = stage.sample_answers, []

    def dies_after_two(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "sample_answers", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_stage("generate", config(inputs, tmp_path / "d", sampling=SAMPLED))
    assert not (tmp_path / "d").exists()
    assert (tmp_path / ".d.answers.jsonl").is_file()
    calls.clear()
    run_stage("generate", config(inputs, tmp_path / "d", sampling=SAMPLED))
    assert calls == [SAMPLED.get("seed", 1234) + 2]  # 5 prompts in batches of 2: only batch 2 was left
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "d")
    assert not (tmp_path / ".d.answers.jsonl").exists()


def test_cli_end_to_end_and_the_output_blends_with_a_prepared_corpus(inputs, tmp_path):
    from nemo_minitron.data import train_sampler
    from tiny import prepare_tiny_corpus

    out = tmp_path / "chat"
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "generate", "conf/generate/smollm2_chat.yaml",
                           f"model={inputs['model']}", f"prompts={inputs['prompts']}", f"output_dir={out}",
                           "sampling.max_new_tokens=6", "batch_size=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["output_dir"] == str(out) and result["answers"] == len(PROMPTS)
    corpus = prepare_tiny_corpus(tmp_path, inputs["model"])
    sampler = train_sampler(_blend(corpus, out), seq_length=8, batch_size=4)
    streams = {p: np.concatenate(documents(p / "train")).astype(np.uint16).tobytes() for p in (corpus, out)}
    drawn = [np.asarray(sampler.sample(i), dtype=np.uint16).tobytes() for i in range(16)]
    assert any(s in streams[out] for s in drawn) and any(s in streams[corpus] for s in drawn)


def _blend(*paths: Path) -> list:
    from nemo_minitron.data import BlendComponent

    return [BlendComponent(weight=1.0, path=str(p)) for p in paths]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_bad_input_is_one_line_before_any_compute(inputs, tmp_path):
    from tiny import write_tiny_hf

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "fine too"}\n{"prompt": 3}\n', encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": \n', encoding="utf-8")
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "alone"}\n', encoding="utf-8")
    plain = write_tiny_hf(tmp_path / "no_template", vocab_size=49152)  # no tokenizer files, no chat template
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        ({"prompts": str(bad)}, f"{bad}:3: no non-empty string under key 'prompt'"),
        ({"prompts": str(broken)}, f"{broken}:2: not valid JSON"),
        ({"prompts": str(one)}, "has 1 prompt(s), too few"),
        ({"prompts": str(tmp_path / "missing.jsonl")}, "is not a file"),
        ({"prompts": "embedded:nothing"}, "unknown embedded resource"),
        ({"model": str(plain)}, "has no chat template"),
        ({"model": str(tmp_path / "nowhere")}, "is not a directory"),
        ({"output_dir": str(taken)}, "exists and is not prepared data"),
    ]
    for change, message in cases:
        with pytest.raises(UserError) as err:
            run_stage("generate", config(inputs, tmp_path / "out", **change))
        assert message in str(err.value), (change, str(err.value))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.answers.jsonl").exists()

    for args, message in [(["sampling.temperature=-1"], "sampling.temperature: Input should be greater than or "
                                                         "equal to 0"),
                          (["sampling.top_p=0"], "sampling.top_p: Input should be greater than 0"),
                          (["sampling.temperature=0", "sampling.samples_per_prompt=2"], "greedy decoding"),
                          (["valid_fraction=1"], "valid_fraction: Input should be less than 1"),
                          (["sampling.seed_value=3"], "sampling.seed_value: unknown key"),
                          ([f"prompts={bad}"], f"{bad}:3: no non-empty string")]:
        proc = _cli("conf/generate/smollm2_chat.yaml", f"model={inputs['model']}",
                    f"output_dir={tmp_path / 'cli_out'}", *args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "cli_out").exists()


def test_chat_answers_are_each_models_greedy_answer(inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_minitron.chat.answers import answers_markdown, chat_answers, teacher_and_student_answers
    from tiny import write_tiny_hf

    other = write_tiny_hf(tmp_path / "other", vocab_size=49152, with_tokenizer=True, seed=8)
    rows = chat_answers({"teacher": inputs["model"], "student": other}, PROMPTS[:2], max_new_tokens=6)
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    for name, path in (("teacher", inputs["model"]), ("student", other)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for row in rows:
            expected = tokenizer.decode(reference_answer(model, tokenizer, row["prompt"], 6), skip_special_tokens=True)
            assert row["answers"][name] == expected.strip()
    assert rows[0]["answers"]["teacher"] != rows[0]["answers"]["student"]
    table = answers_markdown(rows).splitlines()
    assert table[0] == "| prompt | teacher | student |" and len(table) == 2 + len(rows)
    assert table[2].startswith(f"| {PROMPTS[0]} | ")
    # A base teacher (no chat template) has no chat ability to compare: no answers, no model loaded.
    base = write_tiny_hf(tmp_path / "base", vocab_size=49152)
    assert teacher_and_student_answers(base, other, PROMPTS[:1], 6) == []
    assert teacher_and_student_answers(inputs["model"], other, PROMPTS[:2], 6) == rows
