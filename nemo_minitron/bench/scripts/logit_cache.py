"""Distillation from a teacher logit cache against online distillation: speed, quality and disk, in one run.

    .venv/bin/python benchmarks/logit_cache.py [--student runs/prune/smollm2-width-55] [--steps 16]

The embedded teacher (SmolLM2-135M) and one student, bf16 compute, fp32 AdamW, global batch of --batch
sequences of --seq tokens (one micro-batch), the prepared Shakespeare data:

1. ``cache-logits`` writes the teacher's top-k on the windows of --steps steps, for each k of --ks (bf16
   log-probabilities): its time and its size on disk per token and per million tokens.
2. Speed: a training step from the cache (k = 64) and an online step (teacher beside the student) on the same
   batches, alternated in one loop so that machine noise hits both alike; best of --timed steps each.
3. Quality: the student distilled for --steps steps online, and from each cache (the tail as a bucket; and
   k = 64 renormalised), same initial weights, batches, optimiser and schedule; the held-out loss after each
   (the first --eval-windows windows of the valid split).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nemo_minitron import embedded
from nemo_minitron.checkpoint.io import load_model
from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.data.prepare import prepare_data
from nemo_minitron.distill.cache import run_cache_logits
from nemo_minitron.distill.config import (
    CacheLogitsConfig,
    CheckpointConfig,
    EvalDuringTraining,
    LogConfig,
    LossConfig,
    OptimConfig,
    TeacherCacheConfig,
    TrainConfig,
)
from nemo_minitron.distill.trainer import Trainer
from nemo_minitron.parallel import state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="runs/prune/smollm2-width-55")
    parser.add_argument("--data", default="runs/data/shakespeare-smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="KD steps of each quality arm")
    parser.add_argument("--timed", type=int, default=4, help="timed steps of each speed arm (after one warm-up)")
    parser.add_argument("--ks", default="16,64,256", help="cached top-k sizes, comma-separated")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if not Path(args.student).is_dir():
        raise SystemExit(f"{args.student}: run `nemo-minitron prune conf/prune/smollm2_width_55.yaml` first")
    ks = [int(k) for k in args.ks.split(",")]
    if args.timed + 1 > args.steps:
        raise SystemExit("--timed + 1 must not exceed --steps (the speed arms read the cached windows)")
    prepare_data(PrepareDataConfig(input=embedded.CORPUS, tokenizer=embedded.TEACHER, output_dir=args.data))
    tmp = Path(tempfile.mkdtemp())
    try:
        results = _run(args, ks, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _train(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(seq_length=args.seq, micro_batch_size=args.batch, global_batch_size=args.batch,
                       max_steps=args.steps, dtype="bfloat16", teacher_dtype="bfloat16")


def _trainer(args: argparse.Namespace, out: Path, cache: TeacherCacheConfig | None) -> Trainer:
    teacher = None if cache is not None else load_model(embedded.TEACHER, dtype=torch.bfloat16)
    return Trainer(load_model(args.student, dtype=torch.bfloat16), teacher, args.data, out, _train(args),
                   OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2), LossConfig(), CheckpointConfig(resume=False,
                   every_steps=10**6), EvalDuringTraining(every_steps=0, max_windows=args.eval_windows),
                   LogConfig(progress=False, tensorboard=False), teacher_cache=cache)


def _run(args: argparse.Namespace, ks: list[int], tmp: Path) -> dict:
    tokens = args.steps * args.batch * args.seq
    caches = {}
    for k in ks:
        cfg = CacheLogitsConfig(teacher=embedded.TEACHER, data=args.data, output=str(tmp / f"cache{k}"),
                                seq_length=args.seq, seed=_train(args).seed, windows=args.steps * args.batch,
                                top_k=k, dtype="bfloat16", teacher_dtype="bfloat16", micro_batch_size=args.batch,
                                windows_per_shard=args.batch * 4)
        caches[k] = run_cache_logits(cfg)
    state.initialize(state.ParallelConfig())

    # Speed: the same batches through both, alternated.
    speed_k = 64 if 64 in ks else ks[0]
    speed_cache = TeacherCacheConfig(path=str(tmp / f"cache{speed_k}"))
    arms = {"online": _trainer(args, tmp / "speed_online", None),
            f"cache k={speed_k}": _trainer(args, tmp / "speed_cache", speed_cache)}
    batches = next(iter(arms.values())).sampler.batches()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for step in range(args.timed + 1):  # the first step of each is a warm-up
        micro = next(batches)
        for name, trainer in arms.items():
            trainer.step = step  # the cache is read by step: the windows of this batch
            start = time.perf_counter()
            trainer.train_step([micro])
            times[name].append(time.perf_counter() - start)
    for trainer in arms.values():
        trainer.release()
    del arms
    step_tokens = args.batch * args.seq
    speed = {name: step_tokens / min(t[1:]) for name, t in times.items()}

    # Quality: the same KD budget from every source.
    quality_arms: dict[str, TeacherCacheConfig | None] = {"online": None}
    for k in ks:
        quality_arms[f"cache k={k}"] = TeacherCacheConfig(path=str(tmp / f"cache{k}"))
    quality_arms[f"cache k={speed_k}, renormalized"] = TeacherCacheConfig(path=str(tmp / f"cache{speed_k}"),
                                                                          tail="renormalize")
    quality = {}
    for name, cache in quality_arms.items():
        trainer = _trainer(args, tmp / f"q{len(quality)}", cache)
        result = trainer.run()
        trainer.release()
        quality[name] = {"eval_loss": result.eval_loss, "final_kd": result.final_loss,
                         "tokens_per_second": result.tokens_per_second}

    print(f"teacher SmolLM2-135M, student {args.student}; batch {args.batch} x {args.seq} tokens, bf16 compute")
    print("\ncache-logits (bf16 log-probabilities + int32 ids + fp32 tail per token):")
    for k, c in caches.items():
        print(f"  k={k:<4} {c['bytes_per_token']:8.1f} bytes/token = {c['bytes_per_token']:8.1f} MB per million "
              f"tokens; wrote {c['tokens']:,} tokens in {c['seconds']:.1f} s ({c['tokens'] / c['seconds']:.0f} "
              "teacher tokens/s)")
    online, cached = speed["online"], speed[f"cache k={speed_k}"]
    print(f"\ndistillation step, best of {args.timed} (same student, batches, dtype):")
    for name, tps in speed.items():
        print(f"  {name:<16} {tps:8.1f} tokens/s")
    print(f"  from the cache / online = {cached / online:.2f}x tokens/s")
    print(f"\nheld-out loss after {args.steps} KD steps ({tokens:,} tokens), {args.eval_windows} windows of the "
          "valid split:")
    ref = quality["online"]["eval_loss"]
    for name, q in quality.items():
        print(f"  {name:<28} {q['eval_loss']:.4f}  ({q['eval_loss'] - ref:+.4f} vs online)")
    return {"batch": args.batch, "seq": args.seq, "steps": args.steps, "caches": {str(k): c for k, c in caches.items()},
            "speed_tokens_per_second": speed, "speedup": cached / online, "quality": quality}


if __name__ == "__main__":
    main()
