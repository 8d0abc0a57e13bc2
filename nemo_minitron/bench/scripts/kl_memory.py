"""Peak memory of FusedLogitKD (forward + backward) against a naive full-softmax KL, from one run.

    .venv/bin/python benchmarks/kl_memory.py [--tokens 4096] [--vocab 128256] [--hidden 512] [--chunk-tokens 1024]

The naive side materialises the student and teacher logits [T, V], log-softmaxes both, takes KL(p_t || p_s)
and backpropagates; the fused side is FusedLogitKD (forward KL, temperature 1, the config's chunking). Both are
fp32 at TP=1 on the same inputs. Each side runs in its own process (this module with ``--side``), which reports
its peak resident memory (``ru_maxrss``) above the resident memory right after its inputs are allocated, so
neither side's allocations or allocator state leak into the other's number. At the defaults one [T, V] fp32
tensor is 2 GiB and the naive side needs several of them at once.
Target: ratio fused / naive <= 0.125, with the same loss value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

SIDES = ("naive", "fused")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Allocate the inputs, run forward + backward of one side, and measure (runs in a child process)."""
    import torch
    import torch.nn.functional as F

    from nemo_minitron.distill.config import LogitKDConfig
    from nemo_minitron.distill.losses import FusedLogitKD
    from nemo_minitron.parallel import state

    # FusedLogitKD asks megatron for its TP rank and group; initialised before the baseline on both sides.
    state.initialize(state.ParallelConfig())
    g = torch.Generator().manual_seed(0)
    # Logits of std ~2: softmaxes with a realistic spread.
    scale = 2 / math.sqrt(args.hidden)
    student_hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    student_weight = (torch.randn(args.vocab, args.hidden, generator=g) * scale).requires_grad_()
    teacher_hidden = torch.randn(args.tokens, args.hidden, generator=g)
    teacher_weight = torch.randn(args.vocab, args.hidden, generator=g) * scale
    baseline = current_rss_bytes()

    start = time.perf_counter()
    if side == "naive":
        log_ps = F.log_softmax(student_hidden @ student_weight.T, dim=-1)
        with torch.no_grad():
            log_pt = F.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
        loss = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / args.tokens
    else:
        kd = FusedLogitKD(LogitKDConfig(chunk_tokens=args.chunk_tokens), args.vocab)
        loss = kd(student_hidden, student_weight, teacher_hidden, teacher_weight)["loss"]
    loss.backward()
    seconds = time.perf_counter() - start
    assert student_hidden.grad is not None and student_weight.grad is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"side": side, "extra_bytes": peak - baseline, "loss": float(loss.detach()), "seconds": seconds}


def measure(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--side", side]
    cmd += ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return

    mib = 2**20
    print(
        f"tokens {args.tokens}  vocab {args.vocab}  hidden {args.hidden}  fp32  chunk_tokens {args.chunk_tokens}  "
        f"(one [T, V] fp32 tensor = {args.tokens * args.vocab * 4 / mib:.0f} MiB)"
    )
    results = {side: measure(side, args) for side in SIDES}
    for side, label in (("naive", "naive full-softmax KL"), ("fused", "FusedLogitKD        ")):
        r = results[side]
        print(
            f"{label}  peak +{r['extra_bytes'] / mib:8.0f} MiB  loss {r['loss']:.7f}  "
            f"forward+backward {r['seconds']:6.1f} s"
        )
    naive, fused = results["naive"], results["fused"]
    print(f"relative loss difference = {abs(fused['loss'] - naive['loss']) / abs(naive['loss']):.2e}")
    print(f"ratio fused/naive = {fused['extra_bytes'] / naive['extra_bytes']:.3f} (target <= 0.125)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "vocab": args.vocab, **results,
                       "ratio": fused["extra_bytes"] / naive["extra_bytes"],
                       "relative_loss_difference": abs(fused["loss"] - naive["loss"]) / abs(naive["loss"])},
                      f, indent=2)


if __name__ == "__main__":
    main()
