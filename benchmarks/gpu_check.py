"""The Transformer Engine GPU path on one GPU: TE-spec logits against the local spec, then a few BF16 and FP8
distillation steps of a Llama-shaped ~1B teacher and ~0.5B student, with tokens/s and MFU.

    bash benchmarks/gpu_check.sh                            # CUDA + Transformer Engine; under 8 minutes on an H200
    python benchmarks/gpu_check.py --device cpu --tiny      # the same code path on CPU: tiny models, local spec

1. Logits: a small random Llama-shaped model (hidden 256, 4 layers, GQA) is built with the local spec in fp32
   (the reference), copied through the canonical state dict (the TE spec fuses the pre-attention and pre-MLP
   norms into ``linear_qkv`` / ``linear_fc1``) into a local-spec and a TE-spec model in BF16, and all three
   run the same tokens. The TE model passes when its largest logit error against the reference is within
   4x the local BF16 model's own error plus 1% of the largest logit: a wrong weight mapping is off by the
   logits' own size.
2. Distillation: teacher Llama-3.2-1B-shaped (hidden 2048, ffn 8192, 16 layers, 32 heads / 8 query groups,
   vocab 128256, tied), student the same pruned in width (hidden 1536, ffn 3072, head_dim 64 kept), random
   weights, random tokens; the distillation trainer (fp32 master weights, fused forward-KL loss) runs warm-up
   steps and then timed steps in BF16 and in FP8 (delayed scaling). MFU = model FLOPs per second / the
   precision's peak (flags; H200 dense: BF16 989, FP8 1979 TFLOP/s). Model FLOPs per token follow megatron's
   convention: 2 per weight per pass (teacher: forward; student: forward and backward, 3 passes), the output
   projection once, the embedding lookup not at all, causal attention (scores and values) over half the
   square. The FP8 row counts the same model FLOPs.

With ``--device cpu --tiny`` the TE comparison and FP8 are reported as skipped with the reason. Exit status:
0 when everything that ran passed, 1 when a check failed, 2 for a machine or flags that cannot run it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

from nemo_minitron.bench.flops import flops_per_token

H200_PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}
SKIPPED_WITHOUT_TE = "skipped: needs CUDA and Transformer Engine"


@dataclass(frozen=True)
class Sizes:
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    warmup_steps: int
    timed_steps: int


FULL = Sizes(seq_length=4096, micro_batch_size=2, global_batch_size=16, warmup_steps=3, timed_steps=5)
TINY = Sizes(seq_length=64, micro_batch_size=2, global_batch_size=4, warmup_steps=1, timed_steps=2)


def parity_config():
    from nemo_minitron.models.config import ModelConfig

    return ModelConfig(vocab_size=1000, hidden_size=256, ffn_hidden_size=768, num_layers=4, num_attention_heads=8,
                       num_query_groups=2, rope_theta=500000.0, max_position_embeddings=4096)


def teacher_student(tiny: bool):
    """(teacher, student) ModelConfigs: Llama-3.2-1B-shaped and its width-pruned student, or tiny ones."""
    from nemo_minitron.models.config import ModelConfig

    if tiny:
        teacher = ModelConfig(vocab_size=512, hidden_size=64, ffn_hidden_size=192, num_layers=2,
                              num_attention_heads=4, num_query_groups=2, tie_word_embeddings=True)
        return teacher, teacher.model_copy(update={"hidden_size": 48, "ffn_hidden_size": 96, "head_dim": 16})
    teacher = ModelConfig(vocab_size=128256, hidden_size=2048, ffn_hidden_size=8192, num_layers=16,
                          num_attention_heads=32, num_query_groups=8, rope_theta=500000.0,
                          tie_word_embeddings=True, max_position_embeddings=8192)
    return teacher, teacher.model_copy(update={"hidden_size": 1536, "ffn_hidden_size": 3072, "head_dim": 64})


def uses_te(model) -> bool:
    """Whether ``model``'s layers are TE-spec layers. (Not any module: with TE installed, megatron builds the
    final norm of a local-spec model with TE too.)"""
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    return type(qkv).__module__.startswith("megatron.core.extensions.transformer_engine")


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ 1. logits


@dataclass
class Parity:
    local_error: float  # local spec BF16 vs the fp32 reference, max abs over the logits
    reference_max: float  # largest |logit| of the reference
    te_error: Optional[float] = None  # TE spec BF16 vs the fp32 reference
    te_vs_local: Optional[float] = None

    @property
    def tolerance(self) -> float:
        return 4 * self.local_error + 0.01 * self.reference_max

    @property
    def passed(self) -> Optional[bool]:
        return None if self.te_error is None else self.te_error <= self.tolerance


def logits_parity(cfg, with_te: bool, batch: int = 2, seq_length: int = 256, seed: int = 0) -> Parity:
    """Logits of the local spec (fp32 reference and BF16) and, with ``with_te``, of the TE spec (BF16) on the
    same random weights and tokens. Needs :func:`state.initialize`."""
    import torch

    from nemo_minitron.models.builder import build_model
    from nemo_minitron.parallel.schedule import split_tokens
    from nemo_minitron.parallel.sharding import gather_canonical, load_canonical

    torch.manual_seed(seed)
    reference = build_model(cfg, torch.float32, use_te=False)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            # Norms start at 1: random ones make a norm weight copied to the wrong place visible.
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    weights = gather_canonical(reference, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_length + 1))
    inputs, positions, _ = split_tokens(tokens)

    def logits(model) -> torch.Tensor:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(inputs.to(device), positions.to(device), None)
        return out[..., : cfg.vocab_size].float().cpu()

    def bf16_copy(use_te: bool):
        model = build_model(cfg, torch.bfloat16, use_te=use_te)
        if uses_te(model) != use_te:
            raise RuntimeError(f"build_model(use_te={use_te}) did not build the spec it was asked for")
        load_canonical(model, cfg, weights.__getitem__)
        return model

    ref = logits(reference)
    local = logits(bf16_copy(use_te=False))
    result = Parity(local_error=float((local - ref).abs().max()), reference_max=float(ref.abs().max()))
    if with_te:
        te = logits(bf16_copy(use_te=True))
        result.te_error = float((te - ref).abs().max())
        result.te_vs_local = float((te - local).abs().max())
    return result


# ------------------------------------------------------------------------------------------ 2. distillation


@dataclass
class Speed:
    precision: str
    spec: str
    seconds_per_step: float
    tokens_per_second: float
    tflops: float
    mfu: float
    peak_tflops: float
    losses: list[float]
    peak_memory_gib: Optional[float]

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in self.losses)


def write_random_tokens(root: Path, vocab_size: int, num_tokens: int, seed: int) -> Path:
    """A prepared dataset (``train`` and ``valid`` splits) of uniformly random token ids."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from nemo_minitron.data.blend import META_FILE

    rng = np.random.default_rng(seed)
    for split in ("train", "valid"):
        builder = IndexedDatasetBuilder(str(root / f"{split}.bin"), dtype=np.int32)
        builder.add_item(torch.from_numpy(rng.integers(0, vocab_size, num_tokens, dtype=np.int64)))
        builder.end_document()
        builder.finalize(str(root / f"{split}.idx"))
    meta = {"tokenizer": "random token ids", "vocab_size": vocab_size, "eos_id": None, "dtype": "int32",
            "num_train_tokens": num_tokens, "num_valid_tokens": num_tokens, "num_train_documents": 1,
            "num_valid_documents": 1}
    (root / META_FILE).write_text(json.dumps(meta, indent=2))
    return root


def distill_speed(teacher_cfg, student_cfg, sizes: Sizes, fp8: Optional[str], peak_tflops: float, work: Path,
                  seed: int = 1234) -> Speed:
    """Warm-up, then timed distillation steps of freshly built random teacher and student (BF16 weights and
    compute, FP8 layers with ``fp8``). Needs :func:`state.initialize`."""
    import torch

    from nemo_minitron.checkpoint.io import LoadedModel
    from nemo_minitron.distill import config as dc
    from nemo_minitron.distill.trainer import Trainer
    from nemo_minitron.models.builder import build_model

    steps = sizes.warmup_steps + sizes.timed_steps
    data = work / "data"
    if not data.is_dir():
        data.mkdir(parents=True)
        # Enough samples for every step; the sampler would wrap around anyway.
        write_random_tokens(data, student_cfg.vocab_size, steps * sizes.global_batch_size * sizes.seq_length + 1,
                            seed)
    torch.manual_seed(seed)
    teacher = LoadedModel(teacher_cfg, build_model(teacher_cfg, torch.bfloat16, fp8=fp8).eval(), work)
    student = LoadedModel(student_cfg, build_model(student_cfg, torch.bfloat16, fp8=fp8).train(), work)
    train = dc.TrainConfig(seq_length=sizes.seq_length, micro_batch_size=sizes.micro_batch_size,
                           global_batch_size=sizes.global_batch_size, max_steps=steps, dtype="bfloat16",
                           teacher_dtype="bfloat16", seed=seed, fp8=fp8)
    trainer = Trainer(student, teacher, data, work / f"run-{fp8 or 'bf16'}", train, dc.OptimConfig(lr=1e-4),
                      dc.LossConfig(), dc.CheckpointConfig(resume=False),
                      dc.EvalDuringTraining(every_steps=0, max_windows=1),
                      dc.LogConfig(tensorboard=False, progress=False))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batches = trainer.sampler.batches()
    seconds, losses = [], []
    for _ in range(steps):
        micro_batches = [next(batches) for _ in range(trainer.num_micro)]
        synchronize()
        start = time.perf_counter()
        metrics = trainer.train_step(micro_batches)
        synchronize()
        seconds.append(time.perf_counter() - start)
        # A skipped (non-finite) step reports its loss too: a NaN there fails the check.
        losses.append(metrics["loss"])
    spec = "transformer_engine" if uses_te(student.model) else "local"
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del trainer, teacher, student
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    step_seconds = sum(seconds[sizes.warmup_steps :]) / sizes.timed_steps
    tokens_per_second = sizes.global_batch_size * sizes.seq_length / step_seconds
    flops = (flops_per_token(teacher_cfg, sizes.seq_length, passes=1)
             + flops_per_token(student_cfg, sizes.seq_length, passes=3))
    tflops = flops * tokens_per_second / 1e12
    return Speed(precision=f"fp8 {fp8}" if fp8 else "bf16", spec=spec, seconds_per_step=step_seconds,
                 tokens_per_second=tokens_per_second, tflops=tflops, mfu=tflops / peak_tflops,
                 peak_tflops=peak_tflops, losses=losses, peak_memory_gib=peak_memory)


# ------------------------------------------------------------------------------------------ the check


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (required with --device cpu)")
    parser.add_argument("--fp8", choices=["hybrid", "e4m3"], default="hybrid", help="FP8 format of the FP8 run")
    parser.add_argument("--seq-length", type=int, help=f"default {FULL.seq_length} ({TINY.seq_length} with --tiny)")
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per precision")
    parser.add_argument("--peak-bf16-tflops", type=float, default=H200_PEAK_TFLOPS["bf16"])
    parser.add_argument("--peak-fp8-tflops", type=float, default=H200_PEAK_TFLOPS["fp8"])
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The sizes of the flags, defaults from FULL or TINY; one-line error for impossible ones."""
    base = TINY if args.tiny else FULL

    def pick(value: Optional[int], default: int) -> int:
        return default if value is None else value

    sizes = Sizes(
        seq_length=pick(args.seq_length, base.seq_length),
        micro_batch_size=pick(args.micro_batch_size, base.micro_batch_size),
        global_batch_size=pick(args.global_batch_size, base.global_batch_size),
        warmup_steps=pick(args.warmup_steps, base.warmup_steps),
        timed_steps=pick(args.steps, base.timed_steps),
    )
    if min(sizes.seq_length, sizes.micro_batch_size, sizes.global_batch_size, sizes.timed_steps) < 1 \
            or sizes.warmup_steps < 0:
        fail("sizes and timed steps must be at least 1, warm-up steps at least 0")
    if sizes.global_batch_size % sizes.micro_batch_size:
        fail(f"--global-batch-size {sizes.global_batch_size} is not divisible by --micro-batch-size "
             f"{sizes.micro_batch_size}")
    if min(args.peak_bf16_tflops, args.peak_fp8_tflops) <= 0:
        fail("peak TFLOP/s must be positive")
    return sizes


def fail(message: str) -> NoReturn:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    if args.device == "cpu":
        if not args.tiny:
            fail("--device cpu runs only with --tiny (the ~1B models are for a GPU)")
        # Before torch starts: with --device cpu nothing may land on a GPU this machine might have.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from nemo_minitron.distill.trainer import check_fp8_train
    from nemo_minitron.errors import UserError
    from nemo_minitron.models.builder import te_available
    from nemo_minitron.parallel import state

    with_te = args.device == "cuda"
    if with_te:
        if not torch.cuda.is_available():
            fail("no CUDA device: run on a GPU, or use --device cpu --tiny")
        if not te_available():
            fail("Transformer Engine is not importable: pip install -e .[gpu] (or use the NGC PyTorch image)")
        try:
            check_fp8_train(args.fp8, sizes.seq_length, compiled=False)
        except UserError as exc:
            fail(f"{exc} (--seq-length)")

    import megatron.core

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    versions = f"torch {torch.__version__}, megatron-core {megatron.core.__version__}"
    if with_te:
        import transformer_engine

        versions += f", transformer_engine {transformer_engine.__version__}"
    print(f"gpu_check on {device}: {versions}", flush=True)
    state.initialize(state.ParallelConfig())
    ok = True
    try:
        cfg = parity_config()
        parity = logits_parity(cfg, with_te)
        print(f"\n[1/2] logits, TE spec vs local spec (bf16; hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
              f"2 x 256 tokens; max abs error against the local fp32 reference, largest logit "
              f"{parity.reference_max:.3f})")
        print(f"  local spec bf16   {parity.local_error:.5f}")
        if parity.passed is None:
            print(f"  TE spec bf16      {SKIPPED_WITHOUT_TE}")
        else:
            print(f"  TE spec bf16      {parity.te_error:.5f}  (TE vs local bf16: {parity.te_vs_local:.5f}; "
                  f"tolerance {parity.tolerance:.5f})  {'PASS' if parity.passed else 'FAIL'}")
            ok &= parity.passed

        teacher_cfg, student_cfg = teacher_student(args.tiny)
        print(f"\n[2/2] distillation: teacher {count(teacher_cfg.num_params())} (hidden {teacher_cfg.hidden_size}, "
              f"ffn {teacher_cfg.ffn_hidden_size}, {teacher_cfg.num_layers} layers), student "
              f"{count(student_cfg.num_params())} (hidden {student_cfg.hidden_size}, ffn "
              f"{student_cfg.ffn_hidden_size}); seq {sizes.seq_length}, micro-batch {sizes.micro_batch_size}, "
              f"global batch {sizes.global_batch_size}; {sizes.warmup_steps} warm-up + {sizes.timed_steps} timed steps",
              flush=True)
        print(f"  {'precision':<12}{'spec':<20}{'s/step':>8}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
              f"{'(of peak)':>11}{'memory':>10}  loss first -> last")
        rows: list[Speed] = []
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            for fp8, peak in ((None, args.peak_bf16_tflops), (args.fp8, args.peak_fp8_tflops)):
                if fp8 and not with_te:
                    print(f"  {'fp8 ' + fp8:<12}{SKIPPED_WITHOUT_TE}")
                    continue
                row = distill_speed(teacher_cfg, student_cfg, sizes, fp8, peak, Path(tmp))
                rows.append(row)
                memory = "-" if row.peak_memory_gib is None else f"{row.peak_memory_gib:.1f} GiB"
                print(f"  {row.precision:<12}{row.spec:<20}{row.seconds_per_step:>8.3f}{row.tokens_per_second:>12,.0f}"
                      f"{row.tflops:>10.4g}{row.mfu:>8.2%}{row.peak_tflops:>11.0f}{memory:>10}  "
                      f"{row.losses[0]:.3f} -> {row.losses[-1]:.3f}{'' if row.finite else '  FAIL: not finite'}",
                      flush=True)
                ok &= row.finite
        if len(rows) == 2:
            print(f"  fp8 / bf16 tokens/s: {rows[1].tokens_per_second / rows[0].tokens_per_second:.2f}")
    finally:
        state.destroy()
    print(f"\ngpu_check: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
