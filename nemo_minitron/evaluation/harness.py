"""``eval`` with ``backend: lm-eval``: lm-evaluation-harness tasks on a Hugging Face model directory.

Nothing comes from a hub. The local task ``lambada_local`` is LAMBADA (``lambada_openai``'s prompt and
metrics) over passages cut from held-out text: each passage ends in a word that closes a sentence, the model
sees the passage without it and must predict it. ``acc`` is the share of targets that greedy decoding
reproduces token for token, ``perplexity`` is exp of minus the mean target log-likelihood. Standard lm-eval
task names (``lambada_openai``, ``hellaswag``, ...) run on datasets already in the local Hugging Face datasets
cache; one that is not there stops the stage with one line before the model is loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.config import LAMBADA_LOCAL, EvalConfig

LOCAL_TASKS = (LAMBADA_LOCAL,)

# A target: a word (letters, inner apostrophes) right after a single space and right before the end of a
# sentence, as in LAMBADA, where the last word of the passage's last sentence is predicted.
_TARGET = re.compile(r"(?<=\S )([A-Za-z]+(?:['’][A-Za-z]+)*)(?=[.!?])")


@dataclass
class HarnessResult:
    """Per task: lm-eval's metrics (``acc``, ``perplexity``, ``*_stderr``, ...) and its example count."""

    tasks: dict[str, dict[str, Any]]
    examples: dict[str, int]
    num_fewshot: dict[str, int]
    seconds: float


def lambada_passages(text: str, context_words: int) -> list[str]:
    """Non-overlapping LAMBADA-style passages of ``text``, in order: at least ``context_words`` words, then
    one space and the target word, which ends a sentence in ``text`` (its punctuation is left out).

    A passage starts at the start of a line when that does not reach back into the previous passage.
    """
    words = [m.start() for m in re.finditer(r"\S+", text)]
    passages: list[str] = []
    boundary = 0  # passages start at or after the end of the previous one
    for match in _TARGET.finditer(text):
        before = np.searchsorted(words, match.start())  # words wholly before the target
        if before < context_words:
            continue
        first = words[before - context_words]
        if first < boundary:
            continue
        line_start = text.rfind("\n", 0, first) + 1
        start = line_start if line_start >= boundary else first
        passages.append(text[start : match.end()])
        boundary = match.end()
    return passages


def held_out_documents(data: Path, split: str) -> list[str]:
    """The documents of a prepared dataset's ``split`` (decoded with its tokenizer), or a text file."""
    from nemo_minitron.data import TokenDataset, load_tokenizer, read_text
    from nemo_minitron.data.prepare import META_FILE

    if data.is_file():
        return [read_text(data)]
    meta = json.loads((data / META_FILE).read_text(encoding="utf-8"))
    dataset = TokenDataset(str(data / split))  # owns the memory map that ``tokens`` views: keep it alive
    tokens = dataset.tokens
    tokenizer = load_tokenizer(meta["tokenizer"])
    ends = np.flatnonzero(tokens == meta["eos_id"])
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(tokens)]])
    return [tokenizer.decode(tokens[s:e].tolist(), clean_up_tokenization_spaces=False)
            for s, e in zip(starts, ends) if e > s]


def _lambada_local_task(examples: Path, cache: Path) -> dict[str, Any]:
    """lm-eval config of ``lambada_local``: ``lambada_openai``'s prompt and metrics over a local JSON lines
    file of ``{"text": passage}`` (the same schema as the LAMBADA dataset)."""
    return {
        "task": LAMBADA_LOCAL,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(examples)}, "cache_dir": str(cache)},
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def write_lambada_local(cfg: EvalConfig, folder: Path) -> dict[str, Any]:
    """Write ``lambada_local``'s examples under ``folder``; return its lm-eval task config."""
    passages = [p for doc in held_out_documents(Path(cfg.data).expanduser(), cfg.split)
                for p in lambada_passages(doc, cfg.harness.context_words)]
    if not passages:
        raise UserError(f"{cfg.data}: no {LAMBADA_LOCAL} passage of {cfg.harness.context_words} words ending "
                        f"a sentence (lower harness.context_words)")
    examples = folder / f"{LAMBADA_LOCAL}.jsonl"
    examples.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages), encoding="utf-8")
    return _lambada_local_task(examples, folder / "datasets_cache")


def validate(cfg: EvalConfig) -> None:
    """Checks that need neither lm-eval's task index nor the model's weights."""
    import torch

    from nemo_minitron.checkpoint.io import NATIVE_CONFIG, resolve_model_dir
    from nemo_minitron.data import load_tokenizer

    if cfg.parallel.model_parallel_size > 1:
        raise UserError("backend=lm-eval runs on one process: set parallel sizes to 1")
    if len(set(cfg.harness.tasks)) < len(cfg.harness.tasks):
        raise UserError(f"harness.tasks: a task is listed twice: {cfg.harness.tasks}")
    if LAMBADA_LOCAL in cfg.harness.tasks and cfg.data is None:
        raise UserError(f"data: {LAMBADA_LOCAL} needs held-out text (a prepared dataset or a text file)")
    if isinstance(cfg.data, list):
        raise UserError("data: backend=lm-eval reads one prepared dataset or a text file, not a blend")
    if cfg.harness.device == "cuda" and not torch.cuda.is_available():
        raise UserError("harness.device: cuda is not available on this machine")
    model_dir = resolve_model_dir(cfg.model)
    if (model_dir / NATIVE_CONFIG).is_file():
        raise UserError(f"{cfg.model}: backend=lm-eval needs a Hugging Face directory (export-hf the checkpoint)")
    load_tokenizer(str(model_dir))
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("backend=lm-eval needs lm-eval: pip install -c requirements/constraints.txt lm-eval")


def _offline() -> None:
    """Before datasets and lm-eval are imported: datasets and models come from local files only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def _load_task(manager, name: str) -> list:
    """The lm-eval Task or Group object(s) of the standard task, group or tag ``name``, with their datasets
    loaded; a dataset that is not available locally is a UserError naming the task."""
    from datasets.exceptions import DatasetsError

    try:
        loaded = manager.load(name)
    except (OSError, DatasetsError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"lm-eval task {name}: dataset not available locally ({reason}); put it in the "
                        f"Hugging Face datasets cache (HF_DATASETS_CACHE) first") from None
    return [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())


def _metrics(values: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``"acc,none": 0.5`` as ``"acc": 0.5`` (other filters keep their suffix); "N/A" as None."""
    out = {}
    for key, value in values.items():
        if key in ("alias", "name", "sample_len"):  # the task's names and its example count (``examples``)
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = None if value == "N/A" else value
    return out


def run_harness(cfg: EvalConfig) -> HarnessResult:
    """Run ``cfg.harness.tasks`` with lm-eval's Hugging Face model class on ``cfg.model``."""
    from nemo_minitron.checkpoint.io import resolve_model_dir

    _offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model_dir = resolve_model_dir(cfg.model)
    standard = [t for t in cfg.harness.tasks if t not in LOCAL_TASKS]
    with tempfile.TemporaryDirectory(prefix="nemo_minitron_harness_") as tmp:
        # Indexing lm-eval's own task folder takes seconds: only when a standard task is asked for.
        manager = TaskManager(include_defaults=bool(standard))
        unknown = [name for name in standard if name not in manager.all_tasks]
        if unknown:
            raise UserError(f"harness.tasks: unknown lm-eval task {unknown[0]!r} (local: {', '.join(LOCAL_TASKS)})")
        tasks = []
        for name in cfg.harness.tasks:
            if name == LAMBADA_LOCAL:
                tasks += manager.load(write_lambada_local(cfg, Path(tmp)))["tasks"].values()
            else:
                tasks += _load_task(manager, name)
        start = time.perf_counter()
        # lm-eval prints progress to stdout, which carries the stage's result: send it to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            out = simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_dir), "dtype": cfg.dtype, "device": cfg.harness.device},
                tasks=tasks,
                task_manager=manager,
                num_fewshot=cfg.harness.num_fewshot,
                batch_size=cfg.harness.batch_size,
                limit=cfg.harness.limit,
                bootstrap_iters=cfg.harness.bootstrap_iters,
                log_samples=False,
                random_seed=cfg.seed,
                numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed,
            )
        seconds = time.perf_counter() - start
    return HarnessResult(
        tasks={name: _metrics(values) for name, values in out["results"].items()},
        examples={name: int(n["effective"]) for name, n in out["n-samples"].items()},
        num_fewshot={name: int(n) for name, n in out["n-shot"].items()},
        seconds=seconds,
    )
