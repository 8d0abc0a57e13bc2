"""Tokenize a text corpus into megatron-core indexed datasets: ``train`` and ``valid`` token streams.

A document is one ``.txt``/``.md`` file or one ``.jsonl`` record; each of these may be gzip-compressed
(``.txt.gz``, ``.md.gz``, ``.jsonl.gz``). Each is tokenized without special tokens and followed by the
tokenizer's EOS id, so EOS marks document boundaries in the flat stream (and the ``.idx`` file records them).
Documents are assigned to a split by a stable hash of their name, so the split does not depend on listing
order.

Input files are streamed: a ``.jsonl`` file is read one record at a time, and at most a bounded chunk of
documents is in memory at once. ``num_workers`` processes tokenize chunks in parallel; chunks are written
back in input order, so the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import collections
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nemo_minitron.data.blend import META_FILE
from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.data.tokenize import init_worker, tokenize_chunk, worker_tokenize
from nemo_minitron.embedded import resolve_path
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory, check_can_create

SUFFIXES = (".txt", ".md", ".jsonl")
SPLITS = ("train", "valid")
# Documents are sent to the tokenizing workers in chunks of at most this many characters (or one document).
CHUNK_CHARS = 1 << 20


def documents_file(split: str) -> str:
    """Name of the file listing the documents of ``split`` in stream order: one JSON string per line.

    It is provenance for people; nothing that trains or evaluates reads it (the ``.idx`` file holds the
    document boundaries)."""
    return f"{split}_documents.jsonl"


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


def _base_suffix(path: Path) -> str:
    """``path``'s suffix, looking through a ``.gz``: ``a.jsonl.gz`` -> ``.jsonl``."""
    name = path.name.lower()
    return Path(name.removesuffix(".gz")).suffix


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _open(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _decode(path: Path, data: bytes, offset: int = 0) -> str:
    """``data`` (found at byte ``offset`` of ``path``'s content) as UTF-8; NUL bytes and bad UTF-8 are errors."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(f"{path}: binary file (NUL byte at byte offset {offset + nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte offset {offset + exc.start})") from None


def _read_errors(path: Path) -> tuple[type[BaseException], ...]:
    return (OSError, EOFError, zlib.error) if _is_gzip(path) else (OSError,)


def _gzip_error(path: Path, exc: BaseException) -> UserError:
    if isinstance(exc, OSError) and not _is_gzip(path):
        return UserError(f"{path}: cannot read ({exc.strerror})")
    return UserError(f"{path}: not a valid gzip file ({exc})")


def read_text(path: Path) -> str:
    """``path`` (gzip-compressed when it ends in ``.gz``) decoded as UTF-8; binary, undecodable or blank files
    are a UserError naming the file."""
    try:
        with _open(path) as f:
            data = f.read()
    except _read_errors(path) as exc:
        raise _gzip_error(path, exc) from None
    text = _decode(path, data)
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return text.removeprefix("\ufeff")


def _jsonl_records(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each record of the JSON lines file ``path``, read one line at a time."""
    offset, found = 0, False
    try:
        with _open(path) as f:
            # Lines end at b"\n" only: JSON strings may legally hold raw U+2028 and friends.
            for lineno, raw in enumerate(f, 1):
                line = _decode(path, raw, offset)
                offset += len(raw)
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                value = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(value, str) or not value.strip():
                    raise UserError(f"{path}:{lineno}: no non-empty string under key '{text_key}'")
                found = True
                yield lineno, value
    except _read_errors(path) as exc:
        raise _gzip_error(path, exc) from None
    if not found:
        raise UserError(f"{path}: file is empty")


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

    Folders contribute their ``*.txt``/``*.md``/``*.jsonl`` files and the ``.gz`` of each; a named or
    glob-matched file is read whatever its suffix (as jsonl when it ends in ``.jsonl`` or ``.jsonl.gz``,
    decompressed when it ends in ``.gz``).
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
            if f.is_file() and (_base_suffix(f) in SUFFIXES or f == match):
                files[Path(os.path.relpath(f, root)).as_posix()] = f
    if not files:
        raise UserError(f"input: '{ref}' matches no *.txt, *.md or *.jsonl file (or .gz of one)")
    return sorted(files.items())


def _iter_documents(files: list[tuple[str, Path]], text_key: str) -> Iterator[tuple[str, str]]:
    """``(name, text)`` per document, validating as it goes; jsonl records are named ``file:line``."""
    for name, path in files:
        if _base_suffix(path) == ".jsonl":
            for lineno, text in _jsonl_records(path, text_key):
                yield f"{name}:{lineno}", text
        else:
            yield name, read_text(path)


def _score(name: str, seed: int) -> float:
    """The stable hash of (seed, name), mapped to [0, 1)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "big") / 2**64


def split_rule(names: Iterator[str], fraction: float, seed: int) -> tuple[int, Callable[[str], bool]]:
    """One pass over ``names``: their count and the rule ``is_valid(name)``.

    A document is for validation when its score (:func:`_score`) is below ``fraction``. Small corpora can
    hash entirely to one side: then the document nearest the threshold moves across, so both splits have
    one. Only counts and two names are kept, whatever the size of the corpus.
    """
    count = valid = 0
    lowest: tuple[float, str] | None = None
    highest: tuple[float, str] | None = None
    for name in names:
        s = _score(name, seed)
        count += 1
        valid += s < fraction
        lowest = min(lowest, (s, name)) if lowest else (s, name)
        highest = max(highest, (s, name)) if highest else (s, name)
    flip = None
    if count and valid == 0:
        flip = lowest[1]
    elif count and valid == count:
        flip = highest[1]

    def is_valid(name: str) -> bool:
        return (_score(name, seed) < fraction) != (name == flip)

    return count, is_valid


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


def _chunks(docs: Iterator[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    """``(names, texts)`` of consecutive documents, at most :data:`CHUNK_CHARS` characters (or one document)."""
    names: list[str] = []
    texts: list[str] = []
    size = 0
    for name, text in docs:
        if names and size + len(text) > CHUNK_CHARS:
            yield names, texts
            names, texts, size = [], [], 0
        names.append(name)
        texts.append(text)
        size += len(text)
    if names:
        yield names, texts


def _tokenized(chunks: Iterator[tuple[list[str], list[str]]], tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path,
               eos_id: int, dtype: np.dtype, num_workers: int) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, ids)`` per document, in input order, tokenized here or by ``num_workers`` worker processes."""
    if num_workers == 1:
        for names, texts in chunks:
            yield from zip(names, tokenize_chunk(tokenizer, eos_id, dtype, texts))
        return
    # The names stay here; only texts travel. A chunk's names wait in `pending` until its ids come back.
    # Pool.imap would read its whole input ahead: `slots` bounds the chunks in flight, so memory stays bounded.
    pending: collections.deque[list[str]] = collections.deque()
    slots, stop = threading.Semaphore(4 * num_workers), threading.Event()

    def texts_of(source):
        for names, texts in source:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():  # the consumer is gone: let the pool shut down
                    return
            pending.append(names)
            yield texts

    # fork where there is one, as Megatron's preprocess_data does: a spawned worker would import this module's
    # torch and megatron-core again before its first chunk. A worker runs only the tokenizer (its own, loaded
    # by init_worker) and numpy, nothing of the threads or process groups the parent may hold.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(num_workers, initializer=init_worker, initargs=(str(tokenizer_dir), eos_id, dtype.name)) as pool:
        try:
            for ids in pool.imap(worker_tokenize, texts_of(chunks)):  # in input order
                slots.release()
                yield from zip(pending.popleft(), ids)
        finally:
            stop.set()


def prepare_data(cfg: PrepareDataConfig) -> PreparedData:
    """Tokenize ``cfg.input`` into ``{output_dir}/{train,valid}.bin/.idx`` plus ``meta.json``, atomically.

    A first streaming pass checks every document and counts them, so every input problem is raised as a
    UserError before anything is written; the second pass tokenizes. A finished ``output_dir`` with the same
    config is returned as it is.
    """
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and (done := _existing(out, cfg)) is not None:
        return done
    check_can_create(out, "output_dir", directory=True)
    files = list_input_files(cfg.input)
    names = (name for name, _ in _iter_documents(files, cfg.jsonl_text_key))  # validation pass, nothing kept
    count, is_valid = split_rule(names, cfg.valid_fraction, cfg.split_seed)
    if count < 2:
        raise UserError(f"input: '{cfg.input}' has 1 document, too few for a train and a validation split")
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab_size, eos_id = len(tokenizer), int(tokenizer.eos_token_id)
    dtype = np.dtype(np.uint16 if vocab_size < 65500 else np.int32)

    # Only a missing or an empty output folder gets here (see _existing): replacing it loses nothing.
    with atomic_directory(out, overwrite=True) as tmp:
        builders = {s: IndexedDatasetBuilder(str(tmp / f"{s}.bin"), dtype=dtype.type) for s in SPLITS}
        listings = {s: open(tmp / documents_file(s), "w", encoding="utf-8") for s in SPLITS}
        documents = dict.fromkeys(SPLITS, 0)
        tokens = dict.fromkeys(SPLITS, 0)
        try:
            chunks = _chunks(_iter_documents(files, cfg.jsonl_text_key))
            tokenized = _tokenized(chunks, tokenizer, resolve_path(cfg.tokenizer), eos_id, dtype, cfg.num_workers)
            for name, ids in tqdm(tokenized, total=count, desc="tokenizing", unit="doc", file=sys.stderr):
                split = "valid" if is_valid(name) else "train"
                builders[split].add_item(torch.from_numpy(ids))
                builders[split].end_document()
                listings[split].write(json.dumps(name) + "\n")
                documents[split] += 1
                tokens[split] += len(ids)
        finally:
            for listing in listings.values():
                listing.close()
        for split, builder in builders.items():
            builder.finalize(str(tmp / f"{split}.idx"))
        meta = prepared_meta(cfg.tokenizer, vocab_size, eos_id, dtype, tokens, documents, cfg.model_dump())
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return _from_meta(out, meta)


def prepared_meta(tokenizer: str, vocab_size: int, eos_id, dtype, tokens: dict[str, int], documents: dict[str, int],
                  config: dict) -> dict:
    """The ``meta.json`` of a prepared dataset (what training and the blend checks read): its tokenizer, token
    id range and type, and the tokens and documents of each split."""
    return {
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "dtype": dtype.name,
        "num_train_tokens": tokens["train"],
        "num_valid_tokens": tokens["valid"],
        "num_train_documents": documents["train"],
        "num_valid_documents": documents["valid"],
        "config": config,
    }
