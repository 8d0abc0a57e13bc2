"""Tokenize a text corpus into megatron-core indexed datasets: ``train`` and ``valid`` token streams.

A document is one ``.txt``/``.md`` file or one ``.jsonl`` record. Each is tokenized without special tokens
and followed by the tokenizer's EOS id, so EOS marks document boundaries in the flat stream. Documents are
assigned to a split by a stable hash of their name, so the split does not depend on listing order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.embedded import resolve_path
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory, check_can_create

SUFFIXES = (".txt", ".md", ".jsonl")
SPLITS = ("train", "valid")
META_FILE = "meta.json"


@dataclass(frozen=True)
class PreparedData:
    """A prepared corpus; ``*_prefix`` are megatron indexed-dataset prefixes (``.bin``/``.idx`` beside them)."""

    output_dir: Path
    train_prefix: str
    valid_prefix: str
    vocab_size: int
    eos_id: int
    num_train_tokens: int
    num_valid_tokens: int


def read_text(path: Path) -> str:
    """``path`` decoded as UTF-8; binary, undecodable or blank files are a UserError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(f"{path}: binary file (NUL byte at byte offset {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte offset {exc.start})") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return text.removeprefix("\ufeff")


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer at ``ref`` (a directory or ``embedded:`` reference); it must define EOS."""
    path = resolve_path(ref)
    if not path.is_dir():
        raise UserError(f"tokenizer: {path} is not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer: cannot load {path} ({str(exc).splitlines()[0]})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer: {path} defines no EOS token, needed as the document separator")
    return tokenizer


def list_input_files(ref: str) -> list[tuple[str, Path]]:
    """``(name, path)`` of every corpus file, sorted; names are relative to the input's fixed prefix.

    Folders contribute their ``*.txt``/``*.md``/``*.jsonl`` files; a named or glob-matched file is read
    whatever its suffix (as jsonl when it ends in ``.jsonl``).
    """
    pattern = str(resolve_path(ref))
    if any(c in pattern for c in "*?["):
        # Names are relative to the glob's non-magic leading folders so they survive moving the corpus.
        fixed = Path(pattern).parts[:-1]
        cut = next((i for i, p in enumerate(fixed) if any(c in p for c in "*?[")), len(fixed))
        root = Path(*fixed[:cut]) if cut else Path(".")
        matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
    else:
        path = Path(pattern)
        root = path if path.is_dir() else path.parent
        matches = [path] if path.exists() else []
    files: dict[str, Path] = {}
    for match in matches:
        found = match.rglob("*") if match.is_dir() else [match]
        for f in found:
            if f.is_file() and (f.suffix.lower() in SUFFIXES or f == match):
                files[Path(os.path.relpath(f, root)).as_posix()] = f
    if not files:
        raise UserError(f"input: '{ref}' matches no *.txt, *.md or *.jsonl file")
    return sorted(files.items())


def _iter_documents(files: list[tuple[str, Path]], text_key: str) -> Iterator[tuple[str, str]]:
    """``(name, text)`` per document, validating as it goes; jsonl records are named ``file:line``."""
    for name, path in files:
        text = read_text(path)
        if path.suffix.lower() != ".jsonl":
            yield name, text
            continue
        # split("\n"), not splitlines(): JSON strings may legally hold raw U+2028 and friends.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            value = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{path}:{lineno}: no non-empty string under key '{text_key}'")
            yield f"{name}:{lineno}", value


def _valid_names(names: list[str], fraction: float, seed: int) -> set[str]:
    """Documents for validation: those whose hash of (seed, name), mapped to [0, 1), is below ``fraction``."""
    score = {n: int.from_bytes(hashlib.sha256(f"{seed}\0{n}".encode()).digest()[:8], "big") / 2**64 for n in names}
    valid = {n for n in names if score[n] < fraction}
    # Small corpora can hash entirely to one side; move the document nearest the threshold across.
    if not valid:
        valid = {min(names, key=score.__getitem__)}
    elif len(valid) == len(names):
        valid.remove(max(names, key=score.__getitem__))
    return valid


def _from_meta(out: Path, meta: dict) -> PreparedData:
    return PreparedData(
        output_dir=out,
        train_prefix=str(out / "train"),
        valid_prefix=str(out / "valid"),
        vocab_size=meta["vocab_size"],
        eos_id=meta["eos_id"],
        num_train_tokens=meta["num_train_tokens"],
        num_valid_tokens=meta["num_valid_tokens"],
    )


def _existing(out: Path, cfg: PrepareDataConfig) -> PreparedData | None:
    """The finished output at ``out`` if it was made with the same config; None if ``out`` is an empty folder."""
    meta_path = out / META_FILE
    if not meta_path.is_file():
        if out.is_dir() and not any(out.iterdir()):
            return None
        raise UserError(f"output_dir: {out} exists and is not prepared data; remove it or choose another")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    old, new = meta["config"], cfg.model_dump()
    # output_dir is left out so a prepared folder can be moved and still be reused.
    differ = sorted(k for k in new if k != "output_dir" and old.get(k) != new[k])
    if differ:
        raise UserError(
            f"output_dir: {out} was prepared with a different config ({', '.join(differ)}); "
            "remove it or choose another"
        )
    return _from_meta(out, meta)


def prepare_data(cfg: PrepareDataConfig) -> PreparedData:
    """Tokenize ``cfg.input`` into ``{output_dir}/{train,valid}.bin/.idx`` plus ``meta.json``, atomically.

    Every input problem is raised as a UserError before anything is written; a finished ``output_dir``
    with the same config is returned as it is.
    """
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and (done := _existing(out, cfg)) is not None:
        return done
    check_can_create(out, "output_dir", directory=True)
    files = list_input_files(cfg.input)
    names = [name for name, _ in _iter_documents(files, cfg.jsonl_text_key)]  # validation pass, nothing kept
    if len(names) < 2:
        raise UserError(f"input: '{cfg.input}' has 1 document, too few for a train and a validation split")
    tokenizer = load_tokenizer(cfg.tokenizer)
    valid = _valid_names(names, cfg.valid_fraction, cfg.split_seed)
    vocab_size, eos_id = len(tokenizer), int(tokenizer.eos_token_id)
    dtype = np.uint16 if vocab_size < 65500 else np.int32

    # Only a missing or an empty output folder gets here (see _existing): replacing it loses nothing.
    with atomic_directory(out, overwrite=True) as tmp:
        builders = {s: IndexedDatasetBuilder(str(tmp / f"{s}.bin"), dtype=dtype) for s in SPLITS}
        documents: dict[str, list[str]] = {s: [] for s in SPLITS}
        tokens = dict.fromkeys(SPLITS, 0)
        docs = _iter_documents(files, cfg.jsonl_text_key)
        for name, text in tqdm(docs, total=len(names), desc="tokenizing", unit="doc", file=sys.stderr):
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [eos_id]
            split = "valid" if name in valid else "train"
            builders[split].add_item(torch.tensor(ids, dtype=torch.int64))
            builders[split].end_document()
            documents[split].append(name)
            tokens[split] += len(ids)
        for split, builder in builders.items():
            builder.finalize(str(tmp / f"{split}.idx"))
        meta = {
            "tokenizer": cfg.tokenizer,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "dtype": np.dtype(dtype).name,
            "num_train_tokens": tokens["train"],
            "num_valid_tokens": tokens["valid"],
            "train_documents": documents["train"],
            "valid_documents": documents["valid"],
            "config": cfg.model_dump(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return _from_meta(out, meta)
