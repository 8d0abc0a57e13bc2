"""Importance-estimation time vs plain forward passes over the same calibration batches, in one run.

    .venv/bin/python benchmarks/importance_overhead.py [--samples 64] [--seq 256] [--repeats 3]

Both sides run the same megatron-core model through the same pipeline schedule; the importance side adds
the hooks (heads, neurons, channels, block importance). Runs alternate to spread machine noise evenly.
Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nemo_minitron import embedded
from nemo_minitron.checkpoint.io import load_model
from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.data.prepare import prepare_data
from nemo_minitron.parallel import state
from nemo_minitron.prune.config import CalibrationConfig
from nemo_minitron.prune.importance import activation_importance, lm_loss
from nemo_minitron.prune.stage import calibration_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="runs/data/shakespeare-smollm2")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    prepare_data(PrepareDataConfig(input=embedded.CORPUS, tokenizer=embedded.TEACHER, output_dir=args.data))
    state.initialize(state.ParallelConfig())
    loaded = load_model(embedded.TEACHER, use_te=False)
    batches = calibration_batches(
        CalibrationConfig(data=args.data, num_samples=args.samples, seq_length=args.seq,
                          micro_batch_size=args.micro_batch)
    )
    lm_loss(loaded.model, loaded.cfg, batches[:1])  # warm-up
    plain, hooked = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        lm_loss(loaded.model, loaded.cfg, batches)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        activation_importance(loaded.model, loaded.cfg, batches)
        hooked.append(time.perf_counter() - t)
    tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    best_plain, best_hooked = min(plain), min(hooked)
    print(f"calibration: {len(batches)} micro-batches, {tokens} tokens, teacher {embedded.TEACHER}")
    print(f"plain forward       best {best_plain:7.2f} s  ({tokens / best_plain:7.1f} tok/s)  "
          f"runs {['%.2f' % x for x in plain]}")
    print(f"importance (hooks)  best {best_hooked:7.2f} s  ({tokens / best_hooked:7.1f} tok/s)  "
          f"runs {['%.2f' % x for x in hooked]}")
    print(f"ratio importance / plain = {best_hooked / best_plain:.3f}  (target <= 1.15)")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": tokens, "plain_s": best_plain, "importance_s": best_hooked,
                                               "ratio": best_hooked / best_plain}, indent=2))


if __name__ == "__main__":
    main()
