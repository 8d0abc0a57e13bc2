"""Tokenization of document chunks, in the preparing process or in its worker processes.

Kept apart from :mod:`nemo_minitron.data.prepare` so that a worker process imports transformers and numpy
only (neither torch nor megatron-core). Every process runs the same function on the same chunks, so the
token ids do not depend on how many workers share the work.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

_worker: Optional[tuple[PreTrainedTokenizerBase, int, np.dtype]] = None


def tokenize_chunk(tokenizer: PreTrainedTokenizerBase, eos_id: int, dtype: np.dtype,
                   texts: list[str]) -> list[np.ndarray]:
    """Each text's ids, without special tokens, followed by ``eos_id``: 1-D arrays of ``dtype``."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids.append(eos_id)
        out.append(np.asarray(ids, dtype=dtype))
    return out


def init_worker(tokenizer_dir: str, eos_id: int, dtype: str) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _worker
    _worker = (AutoTokenizer.from_pretrained(tokenizer_dir), eos_id, np.dtype(dtype))


def worker_tokenize(texts: list[str]) -> list[np.ndarray]:
    """:func:`tokenize_chunk` with the tokenizer :func:`init_worker` loaded in this worker."""
    assert _worker is not None, "init_worker was not run in this process"
    return tokenize_chunk(*_worker, texts)
