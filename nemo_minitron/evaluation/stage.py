"""The ``eval`` stage: held-out loss and perplexity over non-overlapping windows, at any TP/PP/DP.

Each window of ``seq_length`` tokens is scored as :mod:`nemo_minitron.evaluation.loss` describes (the same
windows and the same tokens that ``transformers``' ``model(ids, labels=ids)`` scores), and the perplexity is
exp of the mean loss over all scored tokens.

A blend of prepared datasets (``data: [{weight, path}, ...]``) is never mixed for evaluation: each component's
held-out split is scored on its own (``components`` of the result), and the headline loss is the components'
losses weighted as the blend.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron.checkpoint.integrity import check_model
from nemo_minitron.checkpoint.io import load_model, read_model_config, resolve_model_dir
from nemo_minitron.data import (
    HeldOut,
    TokenDataset,
    eval_windows,
    heldout_sets,
    load_tokenizer,
    prepared_components,
    text_file_tokens,
)
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
    # A blend's components, each scored on its own held-out windows (empty for one dataset or a text file).
    components: list[ComponentLoss] = field(default_factory=list)


@dataclass
class ComponentLoss:
    path: str
    weight: float
    loss: float
    perplexity: float
    tokens: int
    windows: int


def eval_sets(cfg: EvalConfig, tokenizer_dir: Path) -> list[HeldOut]:
    """The held-out windows of each component of ``cfg.data`` (one set for a dataset or a text file)."""
    if isinstance(cfg.data, list):
        return heldout_sets(cfg.data, cfg.seq_length, cfg.max_windows, cfg.split)
    return [HeldOut(Path(cfg.data).expanduser(), 1.0, eval_tokens(cfg, tokenizer_dir))]


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
    if isinstance(cfg.data, list):
        prepared_components(cfg.data, "data")
    data = Path(cfg.data).expanduser() if isinstance(cfg.data, str) else None
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
    sets = eval_sets(cfg, model_dir)
    if cfg.backend == "hf":
        if cfg.parallel.model_parallel_size > 1:
            raise UserError("backend=hf runs on one process: set parallel sizes to 1")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.dtype)).eval()

        def loss_sums(windows):
            return _hf_loss_sums(cfg, model, windows)
    else:
        state.initialize(cfg.parallel, cfg.seed)
        loaded = load_model(cfg.model, dtype=torch_dtype(cfg.dtype))

        def loss_sums(windows):
            return windows_loss_sums(loaded.model, loaded.cfg.vocab_size, windows, cfg.micro_batch_size)
    start = time.perf_counter()
    components = []
    for heldout in sets:
        total, count = loss_sums(heldout.windows)
        components.append(ComponentLoss(path=str(heldout.path), weight=heldout.weight, loss=total / count,
                                        perplexity=math.exp(total / count), tokens=count,
                                        windows=len(heldout.windows)))
    seconds = time.perf_counter() - start
    # One set: its loss exactly as it was computed; a blend: the components' losses weighted as the blend.
    loss = sum(c.weight * c.loss for c in components) if len(components) > 1 else components[0].loss
    windows = sum(c.windows for c in components)
    result = EvalResult(
        loss=loss,
        perplexity=math.exp(loss),
        tokens=sum(c.tokens for c in components),
        windows=windows,
        seconds=seconds,
        tokens_per_second=windows * cfg.seq_length / seconds,
        components=components if isinstance(cfg.data, list) else [],
    )
    return _write_output(cfg, result)


def _write_output(cfg: EvalConfig, result):
    if cfg.output and (not dist.is_initialized() or dist.get_rank() == 0):
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result
