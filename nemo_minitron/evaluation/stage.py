"""The ``eval`` stage: held-out loss and perplexity over non-overlapping windows, at any TP/PP/DP.

Each window of ``seq_length`` tokens is scored as :mod:`nemo_minitron.evaluation.loss` describes (the same
windows and the same tokens that ``transformers``' ``model(ids, labels=ids)`` scores), and the perplexity is
exp of the mean loss over all scored tokens.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron.checkpoint.integrity import check_model
from nemo_minitron.checkpoint.io import load_model, read_model_config, resolve_model_dir
from nemo_minitron.data import TokenDataset, eval_windows, load_tokenizer, text_file_tokens
from nemo_minitron.data.prepare import META_FILE
from nemo_minitron.dtypes import torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.config import EvalConfig
from nemo_minitron.evaluation.harness import HarnessResult, run_harness
from nemo_minitron.evaluation.harness import validate as validate_harness
from nemo_minitron.evaluation.loss import windows_loss_sums
from nemo_minitron.fsutil import check_can_create
from nemo_minitron.parallel import state
from nemo_minitron.parallel.sharding import check_divisible


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    windows: int
    seconds: float
    tokens_per_second: float


def eval_tokens(cfg: EvalConfig, tokenizer_dir: Path) -> list[torch.Tensor]:
    """The evaluation windows [seq_length] of ``cfg.data``, identical on every rank."""
    data = Path(cfg.data).expanduser()
    if data.is_dir():
        if not (data / META_FILE).is_file():
            raise UserError(f"{data}: not a prepared dataset (no {META_FILE}); run prepare-data first")
        source: TokenDataset | torch.Tensor = TokenDataset(str(data / cfg.split))
    elif data.is_file():
        source = text_file_tokens(data, load_tokenizer(str(tokenizer_dir)))
        if len(source) < cfg.seq_length:
            raise UserError(f"{data}: {len(source)} tokens, not enough for one eval window of {cfg.seq_length}")
    else:
        raise UserError(f"eval data not found: {data}")
    return list(eval_windows(source, cfg.seq_length, cfg.max_windows))


def _hf_loss_sums(cfg: EvalConfig, model, windows: list[torch.Tensor]) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), cfg.micro_batch_size):
            batch = torch.stack(windows[i : i + cfg.micro_batch_size])
            logits = model(batch).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += losses.item()
            count += batch[:, 1:].numel()
    return total, count


def validate(cfg: EvalConfig) -> None:
    """Checks that need no compute: model and data exist, the model splits into the requested TP/PP."""
    if cfg.backend != "lm-eval" and "harness" in cfg.model_fields_set:
        raise UserError("harness: only used with backend=lm-eval")
    if cfg.backend == "lm-eval":
        validate_harness(cfg)
    elif cfg.data is None:
        raise UserError("data: required (a prepared dataset directory or a text file)")
    model_cfg = read_model_config(resolve_model_dir(cfg.model))
    check_divisible(model_cfg, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    data = Path(cfg.data).expanduser() if cfg.data is not None else None
    if data is not None and not data.exists():
        raise UserError(f"eval data not found: {data}")
    if data is not None and data.is_dir() and not (data / META_FILE).is_file():
        raise UserError(f"{data}: not a prepared dataset (no {META_FILE}); run prepare-data first")
    if cfg.output is not None:
        check_can_create(cfg.output, "output", directory=False)
    check_model(cfg.model)


def evaluate(cfg: EvalConfig) -> EvalResult | HarnessResult:
    """Held-out loss and perplexity of ``cfg.model`` on ``cfg.data`` (lm-eval's metrics with backend=lm-eval)."""
    if cfg.backend == "lm-eval":
        return _write_output(cfg, run_harness(cfg))
    model_dir = resolve_model_dir(cfg.model)
    windows = eval_tokens(cfg, model_dir)
    if cfg.backend == "hf":
        if cfg.parallel.model_parallel_size > 1:
            raise UserError("backend=hf runs on one process: set parallel sizes to 1")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.dtype)).eval()
        start = time.perf_counter()
        total, count = _hf_loss_sums(cfg, model, windows)
    else:
        state.initialize(cfg.parallel, cfg.seed)
        loaded = load_model(cfg.model, dtype=torch_dtype(cfg.dtype))
        start = time.perf_counter()
        total, count = windows_loss_sums(loaded.model, loaded.cfg.vocab_size, windows, cfg.micro_batch_size)
    seconds = time.perf_counter() - start
    loss = total / count
    result = EvalResult(
        loss=loss,
        perplexity=math.exp(loss),
        tokens=count,
        windows=len(windows),
        seconds=seconds,
        tokens_per_second=len(windows) * cfg.seq_length / seconds,
    )
    return _write_output(cfg, result)


def _write_output(cfg: EvalConfig, result):
    if cfg.output and (not dist.is_initialized() or dist.get_rank() == 0):
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result
