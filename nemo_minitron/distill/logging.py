"""What a training run shows and records: a progress bar (loss, tokens/s, ETA), ``metrics.jsonl`` and
TensorBoard scalars, written by global rank 0 only. On resume, records after the resumed step are dropped
so the files show one consistent curve."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from nemo_minitron.distill.config import LogConfig
from nemo_minitron.fsutil import atomic_write_text


class RunLogger:
    def __init__(self, output: Path, cfg: LogConfig, total_steps: int, start_step: int) -> None:
        self.cfg = cfg
        self.active = not dist.is_initialized() or dist.get_rank() == 0
        self.bar = self.writer = self.file = None
        self.last_time, self.last_tokens = time.perf_counter(), None
        if not self.active:
            return
        output.mkdir(parents=True, exist_ok=True)
        path = output / "metrics.jsonl"
        if path.exists():
            # A resumed run logs again from step start_step + 1, and a finished run that is run again (it
            # resumes at its last step) logs its final evaluation again: the training records up to
            # start_step stay, the evaluation-only record of start_step goes.
            records = []
            for line in path.read_text().splitlines():
                try:
                    records.append((line, json.loads(line)))
                except json.JSONDecodeError:  # a line cut short by a crash mid-write
                    continue
            kept = [line for line, r in records if r["step"] < start_step or (r["step"] == start_step and "loss" in r)]
            # In one step: a run killed now must not lose the records it keeps.
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="distill")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        tokens = metrics.get("tokens")
        if tokens is not None and self.last_tokens is not None and tokens > self.last_tokens:
            metrics = {**metrics, "tokens_per_second": (tokens - self.last_tokens) / (now - self.last_time)}
        if tokens is not None and tokens != self.last_tokens:
            self.last_time, self.last_tokens = now, tokens
        if step % self.cfg.every_steps == 0 or "eval_loss" in metrics:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}", value, step)
        if self.bar is not None:
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
            shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "eval_loss", "tokens_per_second") if k in metrics}
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        for thing in (self.bar, self.writer, self.file):
            if thing is not None:
                thing.close()
