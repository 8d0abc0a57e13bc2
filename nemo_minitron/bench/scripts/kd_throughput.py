"""Distillation step throughput: nemo_minitron's trainer vs a plain Hugging Face transformers KD loop.

    .venv/bin/python benchmarks/kd_throughput.py [--student runs/prune/smollm2-width-55] [--steps 4]

Same teacher (the embedded SmolLM2-135M), same student, same batches (global batch of --batch sequences of
--seq tokens), same dtype (--dtype, by default ``auto`` as the configs read it; fp32 AdamW) on this CPU, measured
alternately in one run. The HF loop is what one writes by hand: teacher forward under no_grad, student
forward/backward, full-softmax forward KL on the materialised logits, ``torch.optim.AdamW`` step (PyTorch's
default implementation); a second HF loop uses ``AdamW(fused=True)``, to show how much of the difference is the
optimizer. Ours runs three times: as is, with ``train.compile`` (every transformer layer through
``torch.compile``; compiled before timing), and in the other of bfloat16 and float32 (teacher and student), which
shows what ``auto`` gains on this CPU. Also prints the machine's measured GEMM FLOP/s in both dtypes and the
fraction of the compute dtype's that each loop in it reaches (model FLOPs as in the GPU check,
:mod:`nemo_minitron.bench.flops`: a forward of the teacher's GEMMs, forward and backward of the student's, the
output projection once). Target: ours / HF >= 1.3.
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
from nemo_minitron.bench.flops import flops_per_token
from nemo_minitron.checkpoint.io import export_hf, load_model
from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.data.prepare import prepare_data
from nemo_minitron.distill.config import (
    CheckpointConfig,
    EvalDuringTraining,
    LogConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)
from nemo_minitron.distill.trainer import Trainer
from nemo_minitron.dtypes import resolve, torch_dtype
from nemo_minitron.parallel import state


def gemm_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5, min_seconds: float = 0.1) -> float:
    """FLOP/s of the best of ``repeats`` square products of size ``n``, or of the smallest power of two from 256 up
    whose product takes ``min_seconds``: where ``dtype`` is emulated (bf16 on a CPU without bf16 arithmetic, ~0.3
    GFLOP/s), one 2048-square product would take a minute."""
    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        t = time.perf_counter()
        a @ b
        if size >= n or time.perf_counter() - t >= min_seconds:
            break
        size *= 2
    n = size
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def hf_kd_step(teacher, student, optimizer, tokens: torch.Tensor) -> float:
    inputs = tokens[:, :-1]
    with torch.no_grad():
        t_logits = teacher(inputs).logits.float()
    s_logits = student(inputs).logits.float()
    loss = torch.nn.functional.kl_div(
        torch.log_softmax(s_logits, -1).flatten(0, 1), torch.log_softmax(t_logits, -1).flatten(0, 1),
        log_target=True, reduction="batchmean",
    )
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="runs/prune/smollm2-width-55")
    parser.add_argument("--data", default="runs/data/shakespeare-smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="compute dtype of every loop but ours in the other one")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if not Path(args.student).is_dir():
        raise SystemExit(f"{args.student}: run `nemo-minitron prune conf/prune/smollm2_width_55.yaml` first")
    from transformers import AutoModelForCausalLM

    prepare_data(PrepareDataConfig(input=embedded.CORPUS, tokenizer=embedded.TEACHER, output_dir=args.data))
    state.initialize(state.ParallelConfig())
    dtype = resolve(args.dtype)
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    teacher = load_model(embedded.TEACHER, dtype=torch_dtype(dtype))
    student = load_model(args.student, dtype=torch_dtype(dtype))
    tmp = Path(tempfile.mkdtemp())
    export_hf(student, tmp / "student")
    hf_teacher = AutoModelForCausalLM.from_pretrained(embedded.teacher_dir(), dtype=torch_dtype(dtype)).eval()
    # fp32 master weights with bf16 compute, as ours: autocast over an fp32 student (when dtype is bfloat16).
    hf_student = AutoModelForCausalLM.from_pretrained(tmp / "student", dtype=torch.float32).train()
    hf_opt = torch.optim.AdamW(hf_student.parameters(), lr=1e-4)
    hf_student_fused = AutoModelForCausalLM.from_pretrained(tmp / "student", dtype=torch.float32).train()
    hf_opt_fused = torch.optim.AdamW(hf_student_fused.parameters(), lr=1e-4, fused=True)

    def trainer_for(compiled: bool, dtype: str) -> Trainer:
        train = TrainConfig(seq_length=args.seq, micro_batch_size=args.batch, global_batch_size=args.batch,
                            max_steps=10**6, dtype=dtype, teacher_dtype=dtype, compile=compiled)
        return Trainer(load_model(args.student, dtype=torch_dtype(dtype)),
                       load_model(embedded.TEACHER, dtype=torch_dtype(dtype)),
                       Path(args.data), tmp / f"run{compiled}{dtype}", train, OptimConfig(lr=1e-4), LossConfig(),
                       CheckpointConfig(resume=False), EvalDuringTraining(every_steps=0),
                       LogConfig(progress=False, tensorboard=False))

    trainer, compiled, in_other = trainer_for(False, dtype), trainer_for(True, dtype), trainer_for(False, other)
    batches = trainer.sampler.batches()
    for _ in range(2):  # the compiled layers compile in their first calls: keep that out of the timings
        compiled.train_step([next(batches)])
    loops = {
        "nemo_minitron": lambda tokens: trainer.train_step([tokens]),
        "nemo_minitron, compile": lambda tokens: compiled.train_step([tokens]),
        f"nemo_minitron, {other}": lambda tokens: in_other.train_step([tokens]),
        "HF loop, AdamW": lambda tokens: hf_kd_step(hf_teacher, hf_student, hf_opt, tokens),
        "HF loop, fused AdamW": lambda tokens: hf_kd_step(hf_teacher, hf_student_fused, hf_opt_fused, tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    for step in range(args.steps + 1):  # the first step of each is a warm-up
        tokens = next(batches)
        for name, loop in loops.items():  # alternated, so that machine noise hits all of them alike
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.startswith("HF") and dtype == "bfloat16"):
                loop(tokens)
            times[name].append(time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)
    n_tok = args.batch * args.seq
    best = {name: min(t[1:]) for name, t in times.items()}
    flops_per_tok = flops_per_token(teacher.cfg, args.seq, passes=1) + flops_per_token(student.cfg, args.seq, passes=3)
    peaks = {name: gemm_flops(torch_dtype(name)) for name in (dtype, other)}
    loop_dtype = {name: other if name.endswith(other) else dtype for name in loops}
    # Of the compute dtype's GEMM rate; none for the other dtype, whose GEMM rate may be an emulation's.
    fraction = {name: flops_per_tok * n_tok / sec / peaks[dtype] if loop_dtype[name] == dtype else None
                for name, sec in best.items()}
    print(f"batch {args.batch} x {args.seq} tokens, teacher {teacher.cfg.num_params() / 1e6:.1f}M, "
          f"student {student.cfg.num_params() / 1e6:.1f}M params, {dtype} compute (auto here: {resolve('auto')})")
    print("measured GEMM: " + ", ".join(f"{name} {peak / 1e9:.1f} GFLOP/s" for name, peak in peaks.items()))
    for name, sec in best.items():
        share = f"{fraction[name]:6.1%} of {dtype} GEMM peak" if fraction[name] is not None else ""
        print(f"{name:<24} best step {sec:6.2f} s  {n_tok / sec:7.1f} tok/s  {share}")
    for variant in ("nemo_minitron", "nemo_minitron, compile"):
        ours = best[variant]
        print(f"{variant}: ratio to the HF loop (tokens/s) = {best['HF loop, AdamW'] / ours:.2f} (target >= 1.3), "
              f"to the HF loop with fused AdamW = {best['HF loop, fused AdamW'] / ours:.2f}")
    gain = best[f"nemo_minitron, {other}"] / best["nemo_minitron"]
    print(f"nemo_minitron in {dtype} / in {other} (tokens/s) = {gain:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "dtype": dtype, "other_dtype": other,
            "gemm_flops": peaks[dtype], "gemm_flops_by_dtype": peaks,
            "loops": {name: {"best_step_s": sec, "tokens_per_second": n_tok / sec, "dtype": loop_dtype[name],
                             "fraction_of_gemm_peak": fraction[name]}
                      for name, sec in best.items()},
        }, indent=2))


if __name__ == "__main__":
    main()
