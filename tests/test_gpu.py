"""The Transformer Engine GPU path.

Tests marked ``gpu`` need CUDA and Transformer Engine and are skipped without them: TE-spec logits against the
local spec, and one BF16 and one FP8 distillation step. The others run anywhere: what FP8 refuses, and the CPU
mode of ``benchmarks/gpu_check.py``, which runs the GPU check's code path on tiny models.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DIST_ENV

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

from nemo_minitron.models.builder import te_available  # noqa: E402

needs_gpu = pytest.mark.skipif(not te_available(), reason="needs CUDA and Transformer Engine")


# ------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@needs_gpu
def test_te_spec_logits_match_the_local_spec(single_rank):
    parity = gpu_check.logits_parity(gpu_check.parity_config(), with_te=True)
    assert parity.passed, parity


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fp8", [None, "hybrid"], ids=["bf16", "fp8"])
def test_a_distillation_step_on_the_te_spec_is_finite(fp8, single_rank, tmp_path):
    teacher, student = gpu_check.teacher_student(tiny=True)
    sizes = gpu_check.Sizes(seq_length=64, micro_batch_size=2, global_batch_size=4, warmup_steps=0, timed_steps=1)
    row = gpu_check.distill_speed(teacher, student, sizes, fp8, peak_tflops=1.0, work=tmp_path)
    assert row.spec == "transformer_engine"
    assert len(row.losses) == 1 and math.isfinite(row.losses[0]) and row.losses[0] > 0


# ------------------------------------------------------------------------------------------ anywhere


@pytest.mark.parametrize("stage", ["distill", "run"])
def test_fp8_on_a_machine_without_cuda_and_te_is_refused_before_compute(stage, tiny_hf_dirs, tmp_path, capsys):
    if te_available():
        pytest.skip("this machine has CUDA and Transformer Engine")
    from nemo_minitron.cli import main

    model, out = tiny_hf_dirs["untied"], tmp_path / "out"
    if stage == "distill":
        args = [f"student={model}", f"teacher={model}", f"data={tmp_path / 'data'}", f"output={out}",
                "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=2", "train.max_steps=1",
                "train.fp8=hybrid"]
    else:
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for name in ("a", "b"):
            (corpus / f"{name}.txt").write_text("To be, or not to be.\n", encoding="utf-8")
        args = [f"output={out}", f"teacher={model}", f"data.input={corpus}",
                "schedule=[{target: {hidden_size: 48}, kd_tokens: 64}]", "distill.train.seq_length=16",
                "distill.train.fp8=hybrid"]
    assert main([stage] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"nemo-minitron {stage}: error: train.fp8 hybrid needs CUDA and Transformer Engine "
                   "(pip install -e .[gpu]); leave it unset to train in bf16"), err
    assert not out.exists()


def test_fp8_needs_gemm_dimensions_that_are_multiples_of_16():
    from nemo_minitron.errors import UserError
    from nemo_minitron.models.builder import build_model, check_fp8_shapes
    from nemo_minitron.models.config import ModelConfig

    llama = ModelConfig(vocab_size=1000, hidden_size=2048, ffn_hidden_size=8192, num_layers=2,
                        num_attention_heads=32, num_query_groups=8)
    check_fp8_shapes(llama, tp=1)
    check_fp8_shapes(llama, tp=8)
    for change, message in [
        ({"hidden_size": 2056, "head_dim": 64}, "hidden_size is 2056"),
        ({"ffn_hidden_size": 8200}, "ffn_hidden_size / TP is 8200"),
        ({"num_attention_heads": 10, "num_query_groups": 2, "head_dim": 60},
         "num_attention_heads x head_dim / TP is 600"),
        ({"num_query_groups": 4, "head_dim": 62}, "num_query_groups x head_dim / TP is 248"),
    ]:
        with pytest.raises(UserError, match="fp8 needs GEMM dimensions that are multiples of 16: " + message):
            check_fp8_shapes(llama.model_copy(update=change), tp=1)
    with pytest.raises(UserError, match=r"ffn_hidden_size / TP is 1032"):
        check_fp8_shapes(llama.model_copy(update={"ffn_hidden_size": 8256}), tp=8)
    with pytest.raises(UserError, match="fp8 needs the Transformer Engine layer spec"):
        build_model(llama, use_te=False, fp8="hybrid")


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_gpu_check_cpu_mode_runs_the_check_on_tiny_models_and_prints_its_table():
    proc = _gpu_check("--device", "cpu", "--tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "local spec bf16" in out and "TE spec bf16      skipped: needs CUDA and Transformer Engine" in out
    assert "tokens/s" in out and "MFU" in out
    bf16 = next(line for line in out.splitlines() if line.strip().startswith("bf16"))
    fields = bf16.split()
    assert fields[1] == "local" and float(fields[3].replace(",", "")) > 0, bf16  # tokens/s
    assert all(math.isfinite(float(x)) for x in (fields[-3], fields[-1])), bf16  # first and last loss
    assert "fp8 hybrid  skipped: needs CUDA and Transformer Engine" in out
    assert out.rstrip().endswith("gpu_check: PASS")


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "--device cpu runs only with --tiny"),
    (["--device", "cpu", "--tiny", "--global-batch-size", "3"], "--global-batch-size 3 is not divisible"),
])
def test_gpu_check_refuses_what_it_cannot_run_with_one_line(args, message):
    proc = _gpu_check(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_gpu_check_model_flops_follow_megatrons_count():
    """2 FLOPs per weight and pass, the output projection once (tied or not), causal attention over half the
    square: for Llama-3.2-1B's shape, 2.74 GFLOP per token for a forward at seq 4096."""
    teacher, student = gpu_check.teacher_student(tiny=False)
    assert round(teacher.num_params() / 1e9, 2) == 1.24 and round(student.num_params() / 1e9, 2) == 0.55
    h, layers, vocab = 2048, 16, 128256
    weights = layers * (h * 64 * (32 + 2 * 8) + 32 * 64 * h + 3 * h * 8192) + vocab * h
    attention = layers * 32 * 64 * 4096
    assert gpu_check.flops_per_token(teacher, 4096, passes=1) == 2 * (weights + attention)
    assert round(gpu_check.flops_per_token(teacher, 4096, passes=1) / 1e9, 2) == 2.74
    untied = teacher.model_copy(update={"tie_word_embeddings": False})
    assert gpu_check.flops_per_token(untied, 4096, passes=3) == 3 * gpu_check.flops_per_token(teacher, 4096, passes=1)
