"""The distillation trainer on megatron-core's engine at 8 ranks (DP2 x TP2 x PP2, sequence parallel), on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_check.py [--data runs/data/shakespeare-smollm2] \\
        [--steps 4] [--seq 256] [--json FILE]

A random Llama teacher (hidden 256, 8 layers, 4 heads in 2 query groups, MLP 512) and a narrower student (hidden
192, MLP 384) with the embedded teacher's vocabulary (49,152) distil on the prepared corpus, fp32, global batch 8
of ``--seq`` tokens (micro-batches of 2), the fused KD loss in chunks of 128 tokens, a checkpoint every 2 steps.
Runs, each on local gloo ranks:

1. one rank: the reference losses;
2. DP2 x TP2 x PP2 with sequence parallelism (8 ranks), the peak memory of its last step measured;
3. the same with ``train.recompute: full``, its last step measured the same way;
4. DP4 x TP2 x PP1 (8 ranks), resumed from run 2's checkpoint of step 2 (resharded) and trained to the end.

Prints one JSON object:

- ``loss_max_abs_diff_vs_1rank``: largest |loss of run 2 - loss of run 1| over the steps;
- ``optimizer_bytes_per_rank_ratio``: the largest, over ranks, of the optimizer-state bytes a rank holds (Adam's
  two moments; the weights are their own fp32 masters) / the bytes a replicated optimizer would hold for the
  same model shard (8 per parameter): about 1 / DP;
- ``checkpoint_bytes_ratio``: bytes of one checkpoint on disk / bytes of one copy of the model's weights, their
  fp32 master copies and both moments (16 per parameter): about 1 when each byte is written once;
- ``reshard_resume_loss_diff``: largest |loss of run 4 - loss of run 2| over the steps after the checkpoint;
- ``recompute_activation_bytes_ratio``: peak memory of a training step (forward, backward, optimizer; above
  what existed before it, the largest over ranks) with full recomputation / without.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

LAYOUTS = {"dp2tp2pp2": (2, 2, 8), "dp4tp2": (2, 1, 8), "one": (1, 1, 1)}  # name -> (TP, PP, world size)


def random_pair(out: Path) -> tuple[str, str]:
    """The random teacher and student checkpoints described above; their directories."""
    from nemo_minitron import embedded
    from nemo_minitron.checkpoint.io import LoadedModel, read_model_config, resolve_model_dir, save_checkpoint
    from nemo_minitron.models.builder import build_model
    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig(), seed=0)
    try:
        tokenizer_dir = resolve_model_dir(embedded.TEACHER)
        base = read_model_config(tokenizer_dir)
        teacher = base.model_copy(update={"hidden_size": 256, "num_layers": 8, "num_attention_heads": 4,
                                          "num_query_groups": 2, "head_dim": 64, "ffn_hidden_size": 512})
        student = teacher.model_copy(update={"hidden_size": 192, "ffn_hidden_size": 384})
        paths = []
        for name, cfg in (("teacher", teacher), ("student", student)):
            model = build_model(cfg, dtype=torch.float32, use_te=False)
            save_checkpoint(LoadedModel(cfg=cfg, model=model, tokenizer_dir=tokenizer_dir), out / name)
            paths.append(str(out / name))
    finally:
        state.destroy()
    return paths[0], paths[1]


def _rank(job: dict) -> dict:
    """One rank of a distillation run (``state.spawn`` target)."""
    import torch.distributed as dist

    from nemo_minitron.bench.scripts.recompute_memory import step_peak_bytes
    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.distill.config import (
        CheckpointConfig,
        EvalDuringTraining,
        LogConfig,
        LogitKDConfig,
        LossConfig,
        OptimConfig,
        TrainConfig,
    )
    from nemo_minitron.distill.trainer import Trainer
    from nemo_minitron.parallel import state

    tp, pp, _ = LAYOUTS[job["layout"]]
    state.initialize(state.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=7)
    sp = tp > 1
    train = TrainConfig(seq_length=job["seq"], micro_batch_size=2, global_batch_size=8, max_steps=job["steps"],
                        dtype="float32", teacher_dtype="float32", sequence_parallel=sp,
                        recompute=job["recompute"], seed=7)
    student = load_model(job["student"], dtype=torch.float32, sequence_parallel=sp, recompute=job["recompute"])
    teacher = load_model(job["teacher"], dtype=torch.float32, sequence_parallel=sp)
    trainer = Trainer(student, teacher, Path(job["data"]), Path(job["output"]), train,
                      OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1),
                      LossConfig(logits=LogitKDConfig(chunk_tokens=128)),
                      CheckpointConfig(every_steps=2, keep_last=job["steps"]),
                      EvalDuringTraining(every_steps=0, max_windows=1), LogConfig(progress=False, tensorboard=False))
    peak = None
    inner = trainer.train_step

    def last_step_measured(batches):
        nonlocal peak
        if trainer.step + 1 < job["steps"] or not job["measure"]:
            return inner(batches)
        box = {}
        peak = step_peak_bytes(lambda: box.setdefault("metrics", inner(batches)))
        return box["metrics"]

    trainer.train_step = last_step_measured
    try:
        trainer.run()
    finally:
        trainer.release()
    return {"rank": dist.get_rank(), "optimizer_bytes": trainer.engine.optimizer_state_bytes(),
            "params": sum(p.numel() for p in student.model.parameters()), "peak_bytes": peak}


def run(layout: str, output: Path, pair: tuple[str, str], args: argparse.Namespace, recompute=None,
        measure: bool = False) -> tuple[list[dict], dict[int, float]]:
    """Per-rank results and the loss of each step (from ``metrics.jsonl``)."""
    from nemo_minitron.parallel import state

    job = {"layout": layout, "teacher": pair[0], "student": pair[1], "data": args.data, "output": str(output),
           "seq": args.seq, "steps": args.steps, "recompute": recompute, "measure": measure}
    ranks = state.spawn(_rank, LAYOUTS[layout][2], job)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return ranks, {r["step"]: r["loss"] for r in rows if "loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/data/shakespeare-smollm2")
    parser.add_argument("--steps", type=int, default=4, help="an even number: a checkpoint every 2 steps")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    if args.steps < 4 or args.steps % 2:
        parser.error("--steps must be an even number of at least 4")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pair = random_pair(root)
        one_ranks, one = run("one", root / "one", pair, args)
        big_ranks, big = run("dp2tp2pp2", root / "big", pair, args, measure=True)
        rc_ranks, rc = run("dp2tp2pp2", root / "recompute", pair, args, recompute="full", measure=True)
        checkpoints = root / "big" / "checkpoints"
        last = checkpoints / f"step_{args.steps:08d}"
        on_disk = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
        resumed_dir = root / "resharded"
        shutil.copytree(checkpoints / "step_00000002", resumed_dir / "checkpoints" / "step_00000002")
        _, resumed = run("dp4tp2", resumed_dir, pair, args)
    params = one_ranks[0]["params"]
    result = {
        "layout": "DP2 x TP2 x PP2, sequence parallel, 8 gloo ranks",
        "steps": args.steps,
        "losses_1rank": [one[s] for s in sorted(one)],
        "losses_8rank": [big[s] for s in sorted(big)],
        "loss_max_abs_diff_vs_1rank": max(abs(big[s] - one[s]) for s in one),
        "optimizer_bytes_per_rank_ratio": max(r["optimizer_bytes"] / (8 * r["params"]) for r in big_ranks),
        "checkpoint_bytes": on_disk,
        "checkpoint_bytes_ratio": on_disk / (16 * params),
        "losses_resharded_dp4tp2": [resumed[s] for s in sorted(resumed)],
        "reshard_resume_loss_diff": max(abs(resumed[s] - big[s]) for s in resumed),
        "recompute_activation_bytes_ratio": (max(r["peak_bytes"] for r in rc_ranks)
                                             / max(r["peak_bytes"] for r in big_ranks)),
        "recompute_loss_max_abs_diff": max(abs(rc[s] - big[s]) for s in big),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
