"""The ``generate`` stage: a teacher's sampled answers to prompts, as a prepared chat dataset to blend in.

Each prompt is put in the model tokenizer's chat template (with a generation prompt), decoded in left-padded
batches by transformers, and each (prompt, answer) pair is rendered with the same template into one document
of a prepared dataset: ``train``/``valid`` megatron indexed datasets and ``meta.json``, the format of
``prepare-data``, so it blends with prepared corpora. Prompts are assigned to a split by a stable hash of
their name (``file:line``), as ``prepare-data`` assigns documents.

Resumable: each finished batch is appended to ``.<output_dir name>.answers.jsonl`` beside the output, and a
run with the same config continues after the last complete batch (batch ``b`` is drawn with the seed
``sampling.seed + b``, so a resumed run writes the same dataset as an uninterrupted one). The dataset itself
appears in one step, complete or absent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from nemo_minitron.chat.config import GenerateConfig
from nemo_minitron.data.blend import META_FILE
from nemo_minitron.data.prepare import prepared_meta
from nemo_minitron.embedded import resolve_path
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory, check_can_create

ANSWERS_FILE = "answers.jsonl"  # provenance for people: each prompt, its answer and the answer's token ids


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer files of the HF directory ``model_dir`` hold a chat template."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def model_dir(ref: str) -> Path:
    """The Hugging Face directory of ``ref``; a UserError when it is none or its tokenizer has no chat template."""
    path = resolve_path(ref)
    if not path.is_dir():
        raise UserError(f"model: {path} is not a directory")
    if not (path / "config.json").is_file():
        native = (path / "model_config.json").is_file()
        hint = " (a nemo_minitron checkpoint: export it with export-hf first)" if native else ""
        raise UserError(f"model: {path} is not a Hugging Face model directory (no config.json){hint}")
    if not has_chat_template(path):
        raise UserError(f"model: {path} has no chat template in its tokenizer files")
    return path


def load_prompts(cfg: GenerateConfig) -> list[tuple[str, str]]:
    """``(name, prompt)`` of each prompt (``file:line``), the first ``max_prompts`` of them; a one-line UserError
    naming the file and line for anything unreadable."""
    path = resolve_path(cfg.prompts)
    if not path.is_file():
        raise UserError(f"prompts: {path} is not a file")
    found: list[tuple[str, str]] = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").removeprefix("\ufeff")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno}: not valid UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                value = record.get(cfg.prompt_key) if isinstance(record, dict) else None
                if not isinstance(value, str) or not value.strip():
                    raise UserError(f"{path}:{lineno}: no non-empty string under key '{cfg.prompt_key}'")
                found.append((f"{path.name}:{lineno}", value.strip()))
                if cfg.max_prompts is not None and len(found) == cfg.max_prompts:
                    break
    except OSError as exc:
        raise UserError(f"prompts: cannot read {path} ({exc.strerror})") from None
    if len(found) < 2:
        raise UserError(f"prompts: {path} has {len(found)} prompt(s), too few for a train and a validation split")
    return found


def _existing(out: Path, cfg: GenerateConfig) -> Optional[dict]:
    """The result of a finished ``out`` made with the same config; None when ``out`` is absent or empty."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    meta_path = out / META_FILE
    if not meta_path.is_file():
        raise UserError(f"output_dir: {out} exists and is not prepared data; remove it or choose another")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    old, new = meta.get("config", {}), cfg.model_dump(mode="json")
    differ = sorted(k for k in new if k != "output_dir" and old.get(k) != new[k])
    if differ:
        raise UserError(f"output_dir: {out} was generated with a different config ({', '.join(differ)}); "
                        "remove it or choose another")
    return _result(out, meta)


def validate(cfg: GenerateConfig) -> None:
    """Every check that needs no model: the model directory, the prompt file, the output folder."""
    model_dir(cfg.model)
    load_prompts(cfg)
    out = Path(cfg.output_dir).expanduser()
    if _existing(out, cfg) is None:
        check_can_create(out, "output_dir", directory=True)


def _result(out: Path, meta: dict) -> dict:
    g = meta["generated"]
    return {"output_dir": str(out), "prompts": g["prompts"], "answers": g["answers"],
            "unfinished_answers": g["unfinished_answers"], "answer_tokens": g["answer_tokens"],
            "num_train_tokens": meta["num_train_tokens"], "num_valid_tokens": meta["num_valid_tokens"],
            "seconds": g["seconds"], "tokens_per_second": g["tokens_per_second"]}


def _messages(cfg: GenerateConfig, prompt: str, answer: Optional[str] = None) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": prompt})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def generation_settings(cfg: GenerateConfig, tokenizer: Any) -> Any:
    """transformers' GenerationConfig for ``cfg.sampling``, written out in full so that nothing of a model's own
    ``generation_config.json`` (a default top_k, a repetition penalty) changes what is drawn."""
    from transformers import GenerationConfig

    s = cfg.sampling
    common = dict(max_new_tokens=s.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                  num_return_sequences=s.samples_per_prompt)
    if s.temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None,
                            **common)


class _Resume:
    """The answers of finished batches, one JSON line per batch after a first line holding the config."""

    def __init__(self, out: Path, cfg: GenerateConfig) -> None:
        self.path = out.with_name(f".{out.name}.answers.jsonl")
        header = json.dumps({"config": cfg.model_dump(mode="json")})
        self.batches: dict[int, list[dict]] = {}
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").split("\n")
            if lines[0] == header:
                for line in lines[1:]:
                    try:  # a line cut short by a kill is dropped: that batch is drawn again
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    self.batches[record["batch"]] = record["answers"]
        # Rewritten from what was kept, so a cut line never sits before new ones.
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(header + "\n")
            for b, answers in sorted(self.batches.items()):
                f.write(json.dumps({"batch": b, "answers": answers}) + "\n")

    def add(self, batch: int, answers: list[dict]) -> None:
        self.batches[batch] = answers
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"batch": batch, "answers": answers}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def sample_answers(model: Any, tokenizer: Any, prompt_texts: list[str], settings: Any, seed: int) -> list[dict]:
    """``settings.num_return_sequences`` answers to each chat-rendered prompt of ``prompt_texts`` (decoded
    together, left-padded, with the torch seed ``seed``): ``{"ids", "finished"}`` per answer, prompt by prompt,
    ids cut before the first EOS (``finished``) or at ``max_new_tokens``."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, generation_config=settings)
    answers = []
    eos = settings.eos_token_id
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        finished = eos in row
        answers.append({"ids": row[: row.index(eos)] if finished else row, "finished": finished})
    return answers


def generate(cfg: GenerateConfig) -> dict:
    """Sample ``cfg.model``'s answers to the prompts and write them, chat-rendered, as a prepared dataset at
    ``cfg.output_dir``; a finished output with the same config is returned as it is."""
    out = Path(cfg.output_dir).expanduser()
    if (done := _existing(out, cfg)) is not None:
        return done
    check_can_create(out, "output_dir", directory=True)
    path = model_dir(cfg.model)
    prompts = load_prompts(cfg)

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_minitron.data.prepare import SPLITS, documents_file, split_rule
    from nemo_minitron.data.tokenize import tokenize_chunk

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise UserError(f"model: {path}: the tokenizer defines no EOS token, needed to end answers and documents")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype)).eval()
    settings = generation_settings(cfg, tokenizer)
    rendered = [tokenizer.apply_chat_template(_messages(cfg, p), tokenize=False, add_generation_prompt=True)
                for _, p in prompts]

    out.parent.mkdir(parents=True, exist_ok=True)
    resume = _Resume(out, cfg)
    batches = range(0, len(prompts), cfg.batch_size)
    start, drawn = time.perf_counter(), 0
    for b, first in enumerate(tqdm(batches, desc="generating", unit="batch", file=sys.stderr)):
        if b in resume.batches:
            continue
        answers = sample_answers(model, tokenizer, rendered[first: first + cfg.batch_size], settings,
                                 cfg.sampling.seed + b)
        drawn += sum(len(a["ids"]) for a in answers)
        resume.add(b, answers)
    seconds = time.perf_counter() - start
    per_prompt = cfg.sampling.samples_per_prompt
    answers = [a for b in range(len(batches)) for a in resume.batches[b]]

    _, is_valid = split_rule((name for name, _ in prompts), cfg.valid_fraction, cfg.split_seed)
    vocab_size, eos_id = len(tokenizer), int(tokenizer.eos_token_id)
    dtype = np.dtype(np.uint16 if vocab_size < 65500 else np.int32)
    with atomic_directory(out, overwrite=True) as tmp:
        builders = {s: IndexedDatasetBuilder(str(tmp / f"{s}.bin"), dtype=dtype.type) for s in SPLITS}
        tokens, documents = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
        with open(tmp / ANSWERS_FILE, "w", encoding="utf-8") as provenance, \
                open(tmp / documents_file("train"), "w", encoding="utf-8") as train_list, \
                open(tmp / documents_file("valid"), "w", encoding="utf-8") as valid_list:
            listings = {"train": train_list, "valid": valid_list}
            for i, answer in enumerate(answers):
                name, prompt = prompts[i // per_prompt]
                text = tokenizer.decode(answer["ids"], skip_special_tokens=True).strip()
                document = tokenizer.apply_chat_template(_messages(cfg, prompt, text), tokenize=False)
                ids = tokenize_chunk(tokenizer, eos_id, dtype, [document])[0]
                split = "valid" if is_valid(name) else "train"
                builders[split].add_item(torch.from_numpy(ids))
                builders[split].end_document()
                listings[split].write(json.dumps(f"{name}#{i % per_prompt}") + "\n")
                tokens[split] += len(ids)
                documents[split] += 1
                provenance.write(json.dumps({"name": name, "sample": i % per_prompt, "split": split, "prompt": prompt,
                                             "answer": text, "answer_ids": answer["ids"],
                                             "finished": answer["finished"]}) + "\n")
        for split, builder in builders.items():
            builder.finalize(str(tmp / f"{split}.idx"))
        answer_tokens = sum(len(a["ids"]) for a in answers)
        meta = {
            **prepared_meta(cfg.model, vocab_size, eos_id, dtype, tokens, documents, cfg.model_dump(mode="json")),
            # Speed covers the batches drawn by this invocation (a resumed one draws only the rest).
            "generated": {"prompts": len(prompts), "answers": len(answers), "answer_tokens": answer_tokens,
                          "unfinished_answers": sum(not a["finished"] for a in answers), "seconds": seconds,
                          "tokens_per_second": drawn / seconds if drawn else None},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    resume.remove()
    return _result(out, meta)
