"""The memory plan (``nemo-minitron plan``) against measured ranks, for several small DP x TP x PP layouts on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_check.py [--layouts dp2,tp2-sp-selective,...] [--json FILE]

Each layout distils a random student (hidden 96, MLP 256, 4 layers, 4 heads of 32 channels in 2 query groups,
vocabulary 1000) from a random teacher (hidden 128, MLP 384, 4 layers) on local gloo ranks, with the trainer's
machinery: megatron's DDP and distributed optimizer (:class:`~nemo_minitron.parallel.engine.TrainingEngine`),
the distillation pair through megatron's schedule, the fused KD loss. After one step (which creates the
optimizer state), each rank counts its bytes: the student's parameter and gradient buffers (``param_data``,
``grad_data`` of every DDP buffer), the optimizer state (every tensor of every parameter's Adam state, and the
fp32 master copies), the teacher's parameters; then the peak of its second step is measured like
``recompute_memory.py`` does (torch's profiler: the running sum of CPU allocations during the step, above what
existed before it). The plan's arithmetic (:mod:`nemo_minitron.plan.memory`) predicts each of these for the same
rank from the configs alone. Prints one row per rank: the static terms planned and measured (equal when the plan
is exact) and the step's peak planned / measured.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

SEQ, MICRO, GLOBAL, CHUNK = 256, 2, 8, 256
STUDENT = dict(vocab_size=1000, hidden_size=96, ffn_hidden_size=256, num_layers=4, num_attention_heads=4,
               num_query_groups=2, head_dim=32, max_position_embeddings=SEQ)
TEACHER = dict(STUDENT, hidden_size=128, ffn_hidden_size=384)
# name -> (DP, TP, PP, sequence parallel, recompute, dtype)
LAYOUTS = {
    "dp2": (2, 1, 1, False, None, "float32"),
    "tp2-sp-selective": (1, 2, 1, True, "selective", "bfloat16"),
    "pp2": (1, 1, 2, False, None, "float32"),
    "dp2-tp2-sp-full": (2, 2, 1, True, "full", "bfloat16"),
    "tp2-pp2-full": (1, 2, 2, False, "full", "float32"),
    "dp2-pp2-tied": (2, 1, 2, False, None, "float32"),
    "tp2-sp-fp32": (1, 2, 1, True, None, "float32"),
}
TIED = {"dp2-pp2-tied"}


def configs(name: str):
    from nemo_minitron.models.config import ModelConfig

    tied = name in TIED
    return (ModelConfig(**STUDENT, tie_word_embeddings=tied), ModelConfig(**TEACHER, tie_word_embeddings=tied))


def train_settings(name: str):
    from nemo_minitron.distill.config import TrainSettings

    _, _, _, sp, recompute, dtype = LAYOUTS[name]
    return TrainSettings(seq_length=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL, dtype=dtype,
                         teacher_dtype=dtype, sequence_parallel=sp, recompute=recompute)


def _rank(name: str) -> dict:
    """One rank of a layout: its measured bytes (``state.spawn`` target)."""
    import torch

    from nemo_minitron.bench.scripts.recompute_memory import step_peak_bytes
    from nemo_minitron.distill.config import LogitKDConfig
    from nemo_minitron.distill.losses import FusedLogitKD
    from nemo_minitron.distill.pair import DistillationPair, output_weight, pipeline_shapes
    from nemo_minitron.dtypes import torch_dtype
    from nemo_minitron.models.builder import build_model
    from nemo_minitron.parallel import state
    from nemo_minitron.parallel.engine import TrainingEngine
    from nemo_minitron.parallel.schedule import forward_backward

    dp, tp, pp, sp, recompute, dtype_name = LAYOUTS[name]
    state.initialize(state.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0)
    try:
        student_cfg, teacher_cfg = configs(name)
        dtype = torch_dtype(dtype_name)
        student = build_model(student_cfg, dtype=dtype, use_te=False, sequence_parallel=sp, recompute=recompute)
        teacher = build_model(teacher_cfg, dtype=dtype, use_te=False, sequence_parallel=sp)
        student.train()
        pair = DistillationPair(student, teacher)
        pair.model_type = student.model_type  # read by megatron's schedules
        engine = TrainingEngine([student], lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
        loss = FusedLogitKD(LogitKDConfig(chunk_tokens=CHUNK), student_cfg.vocab_size)
        generator = torch.Generator().manual_seed(state.dp_rank())
        batches = [torch.randint(0, student_cfg.vocab_size, (MICRO, SEQ + 1), generator=generator)
                   for _ in range(GLOBAL // (MICRO * dp))]

        def loss_fn(hidden, labels):
            t = pair.teacher_hidden
            out = loss(hidden.reshape(-1, hidden.shape[-1]), output_weight(student), t.reshape(-1, t.shape[-1]),
                       output_weight(teacher), labels.reshape(-1), None)
            return out["loss"], {"loss": out["loss"].detach().clone()}

        def step() -> None:
            engine.zero_grad()
            forward_backward(pair, batches, loss_fn, forward_only=False, adjust_tensor_shapes_fn=pipeline_shapes(pair))
            engine.finalize()
            engine.step(1e-3, 1.0)

        step()  # creates the optimizer state
        # The teacher's last hidden states outlive a step: freed before the measured one, so that its frees are
        # of blocks it allocated (the profiler cannot subtract frees of older blocks).
        pair.teacher_hidden = None
        gc.collect()
        chunk = engine.chunks[0]
        optimizer = 0
        for inner in engine.optimizer.chained_optimizers:
            for per_param in inner.optimizer.state.values():
                optimizer += sum(t.nbytes for t in per_param.values() if torch.is_tensor(t))
            optimizer += sum(p.nbytes for group in getattr(inner, "shard_fp32_from_float16_groups", [])
                             for p in group)
        measured = {
            "weights": sum(b.param_data.nbytes for b in chunk.buffers),
            "gradients": sum(b.grad_data.nbytes for b in chunk.buffers),
            "optimizer": optimizer,
            "teacher_weights": sum(p.nbytes for p in teacher.parameters()),
            "peak": step_peak_bytes(step),
        }
        engine.release()
        pair.restore()
        return {"layout": name, "pp_rank": state.pp_rank(), "dp_rank": state.dp_rank(), "tp_rank": state.tp_rank(),
                "measured": measured}
    finally:
        state.destroy()


def planned(name: str, pp_rank: int, dp_rank: int) -> dict:
    """The plan's figures for one rank of a layout, from the configs alone."""
    from nemo_minitron.plan import memory as mem
    from nemo_minitron.plan.settings import PlanSettings
    from nemo_minitron.plan.stage import Layout, train_plan

    dp, tp, pp, _, _, dtype = LAYOUTS[name]
    student, teacher = configs(name)
    e = mem.DTYPE_BYTES[dtype]
    # The local spec (CPU) builds its norms in fp32.
    static = mem.trained_state(student, e, tp, pp, dp, pp_rank, dp_rank, fp32_norms=True)
    stage = train_plan("distill", student, teacher, train_settings(name), GLOBAL * SEQ, CHUNK, True,
                       Layout(tp, pp, dp * tp * pp), PlanSettings(workspace_gb=0), float("nan"), None, 1,
                       fp32_norms=True)
    terms = stage["per_pipeline_stage"][pp_rank]
    return {"weights": static.weights, "gradients": static.gradients, "optimizer": static.optimizer,
            "teacher_weights": mem.frozen_weights(teacher, e, tp, pp, pp_rank, fp32_norms=True),
            "peak": terms["activations"] + terms["transient"]}


STATIC = ("weights", "gradients", "optimizer", "teacher_weights")


def check(name: str) -> list[dict]:
    """Every rank of layout ``name``: measured and planned bytes, and the peak's relative error."""
    from nemo_minitron.parallel import state

    dp, tp, pp = LAYOUTS[name][:3]
    rows = state.spawn(_rank, dp * tp * pp, name)
    for row in rows:
        row["planned"] = planned(name, row["pp_rank"], row["dp_rank"])
        row["peak_error"] = row["planned"]["peak"] / row["measured"]["peak"] - 1
        row["static_exact"] = all(row["planned"][k] == row["measured"][k] for k in STATIC)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names of: " + ", ".join(LAYOUTS))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout {unknown[0]} (one of {', '.join(LAYOUTS)})")
    rows = [row for name in names for row in check(name)]
    kib = 1024
    print(f"student {STUDENT['hidden_size']}/{STUDENT['ffn_hidden_size']}, teacher {TEACHER['hidden_size']}/"
          f"{TEACHER['ffn_hidden_size']}, {STUDENT['num_layers']} layers, seq {SEQ}, micro-batch {MICRO}, "
          f"global batch {GLOBAL}; KiB per rank, planned = measured for the static terms")
    print(f"{'layout':18} {'rank(pp,dp,tp)':>14} {'weights':>9} {'grads':>9} {'optim':>9} {'teacher':>9} "
          f"{'exact':>6} {'peak plan':>10} {'measured':>10} {'error':>7}")
    for r in rows:
        p, m = r["planned"], r["measured"]
        print(f"{r['layout']:18} {str((r['pp_rank'], r['dp_rank'], r['tp_rank'])):>14} "
              + " ".join(f"{m[k] / kib:9.1f}" for k in STATIC)
              + f" {'yes' if r['static_exact'] else 'NO':>6} {p['peak'] / kib:10.1f} {m['peak'] / kib:10.1f} "
              f"{r['peak_error']:+7.1%}")
    worst = max(abs(r["peak_error"]) for r in rows)
    print(f"static terms exact on {sum(r['static_exact'] for r in rows)} of {len(rows)} ranks; "
          f"largest |peak error| {worst:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
