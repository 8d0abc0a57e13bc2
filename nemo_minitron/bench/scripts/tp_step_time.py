"""Distillation step time at TP=2 against TP=1 on this CPU, from one run.

    .venv/bin/python benchmarks/tp_step_time.py [--data runs/data/shakespeare-smollm2] [--steps 4] [--seq 256]
        [--batch 4]

SmolLM2-135M's 9 attention heads (3 query groups) do not split over two ranks, so the pair timed here has the
embedded teacher's vocabulary, depth and tokenizer with TP-divisible widths and random weights: a teacher with
hidden 512, 8 heads, 4 query groups, MLP 1536, and a student of it with hidden 384 and MLP 768. Runs
``nemo-minitron distill`` twice on the same pair and batches: once on one rank, once as two tensor-parallel
ranks over gloo (each rank then has half of this machine's cores). The step time of each is
the median over the steps after the first (which includes start-up), read from the run's ``metrics.jsonl``.
On a CPU, tensor parallelism is a way to fit a model, not to speed it up: expect a ratio near or above 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def step_seconds(student: str, teacher: str, data: str, tp: int, args: argparse.Namespace, out: Path) -> float:
    """Median seconds per step of a short distillation at tensor-parallel size ``tp``."""
    cmd = [
        sys.executable, "-m", "nemo_minitron.cli", "distill",
        f"student={student}", f"teacher={teacher}", f"data={data}", f"output={out}",
        f"train.seq_length={args.seq}", f"train.micro_batch_size={args.batch}",
        f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps + 1}",
        "checkpoint.resume=false", f"checkpoint.every_steps={args.steps + 1}", "eval.every_steps=0",
        "eval.max_windows=1", "log.progress=false", "log.tensorboard=false",
        f"parallel.tensor_model_parallel_size={tp}",
    ]
    threads = max(1, (os.cpu_count() or 2) // tp)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        sys.exit(f"TP={tp} distillation failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    if not rates:
        sys.exit(f"TP={tp}: no timed steps in {out / 'metrics.jsonl'}")
    return args.batch * args.seq / statistics.median(rates)


def random_pair(out: Path) -> tuple[str, str]:
    """Write the random teacher and student checkpoints described above; their directories."""
    import torch

    from nemo_minitron import embedded
    from nemo_minitron.checkpoint.io import LoadedModel, read_model_config, resolve_model_dir, save_checkpoint
    from nemo_minitron.models.builder import build_model
    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig(), seed=0)
    tokenizer_dir = resolve_model_dir(embedded.TEACHER)
    base = read_model_config(tokenizer_dir)
    teacher = base.model_copy(update={"hidden_size": 512, "num_attention_heads": 8, "num_query_groups": 4,
                                      "head_dim": 64, "ffn_hidden_size": 1536})
    student = teacher.model_copy(update={"hidden_size": 384, "ffn_hidden_size": 768})
    paths = []
    for name, cfg in (("teacher", teacher), ("student", student)):
        model = build_model(cfg, dtype=torch.float32, use_te=False)
        save_checkpoint(LoadedModel(cfg=cfg, model=model, tokenizer_dir=tokenizer_dir), out / name)
        paths.append(str(out / name))
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/data/shakespeare-smollm2")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one more runs first)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher, student = random_pair(Path(tmp))
        seconds = {tp: step_seconds(student, teacher, args.data, tp, args, Path(tmp) / f"tp{tp}") for tp in (1, 2)}
    tokens = args.batch * args.seq
    for tp, sec in seconds.items():
        print(f"TP={tp}  median step {sec:6.2f} s  {tokens / sec:7.1f} tok/s")
    print(f"ratio step time TP=2 / TP=1 = {seconds[2] / seconds[1]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens_per_step": tokens, "tp1_step_s": seconds[1],
                                               "tp2_step_s": seconds[2], "ratio": seconds[2] / seconds[1]}, indent=2))


if __name__ == "__main__":
    main()
