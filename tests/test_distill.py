"""The distillation trainer on tiny models: KD and CE learn, the teacher stays frozen, a resumed run is the
uninterrupted run bit for bit, TP=2 / PP=2 / DP=2 give the TP=1 run, intermediate-state losses, non-finite
steps, and the ``distill`` CLI.

Teacher and students share the real SmolLM2 tokenizer (vocabulary 49152) so they train on a corpus prepared
by ``prepare_data``; they are tiny (hidden 64 / 48 / 32, 4 layers) so that a step takes milliseconds. Each
multi-rank layout is one ``state.spawn`` that runs every scenario and returns numpy, never torch tensors; the
TP=1 references run in this process.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DIST_ENV, destroy_state

SEQ, MB, GBS = 16, 2, 4
# Metrics that depend on the wall clock, not on the computation.
TIMING = ("tokens_per_second",)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def kd(tmp_path_factory) -> dict[str, Path]:
    """A prepared corpus, a tiny teacher (hidden 64, 4 layers, untied) and three students: ``pruned`` (the teacher
    width-pruned to hidden 48 / ffn 64 by ``prune``, head_dim 16 kept), and random ``student`` / ``tied``
    (hidden 32, 4 layers; untied / tied embeddings)."""
    from nemo_minitron.checkpoint import io
    from nemo_minitron.parallel import state
    from nemo_minitron.prune import PruneTarget, prune
    from tiny import prepare_tiny_corpus, write_tiny_hf

    root = tmp_path_factory.mktemp("kd")
    common = dict(vocab_size=49152, with_tokenizer=True)
    dirs = {
        "teacher": write_tiny_hf(root / "teacher", hidden_size=64, intermediate_size=96, seed=21, **common),
        "student": write_tiny_hf(root / "student", hidden_size=32, intermediate_size=64, seed=22, **common),
        "tied": write_tiny_hf(root / "tied", hidden_size=32, intermediate_size=64, tied=True, seed=23, **common),
    }
    dirs["data"] = prepare_tiny_corpus(root, dirs["teacher"])
    state.initialize(state.ParallelConfig())
    try:
        calibration = fixed_batches(dirs["data"], n=2, seed=7)
        pruned, _ = prune(io.load_model(str(dirs["teacher"])), PruneTarget(hidden_size=48, ffn_hidden_size=64),
                          calibration)
        io.save_checkpoint(pruned, root / "pruned")
    finally:
        destroy_state()
    dirs["pruned"] = root / "pruned"
    return dirs


# ------------------------------------------------------------------------------------------ runs on every rank


def job(student: Path, teacher: Path | None, data: Path, output: Path, *, steps: int = 4, dtype: str = "float32",
        train: dict | None = None, optim: dict | None = None, loss: dict | None = None,
        checkpoint: dict | None = None) -> dict:
    """Everything one training run needs, as plain picklable values."""
    return dict(
        student=str(student), teacher=None if teacher is None else str(teacher), data=str(data), output=str(output),
        train=dict(seq_length=SEQ, micro_batch_size=MB, global_batch_size=GBS, max_steps=steps, dtype=dtype,
                   teacher_dtype=dtype, **(train or {})),
        optim=dict(lr=3e-3, min_lr=3e-4, warmup_steps=1, **(optim or {})),
        loss=loss or {},
        checkpoint=dict(every_steps=2, keep_last=2, **(checkpoint or {})),
        evaluation=dict(every_steps=0, max_windows=4),
        log=dict(tensorboard=False, progress=False),
    )


def make_trainer(spec: dict):
    """Load teacher and student (at the run's dtypes) and build the Trainer; needs ``state.initialize``."""
    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.distill import trainer as T
    from nemo_minitron.dtypes import torch_dtype

    train = T.TrainConfig(**spec["train"])
    student = load_model(spec["student"], dtype=torch_dtype(train.dtype), sequence_parallel=train.sequence_parallel,
                         recompute=train.recompute)
    student.model.train()
    teacher = None if spec["teacher"] is None else load_model(
        spec["teacher"], dtype=torch_dtype(train.teacher_dtype), sequence_parallel=train.sequence_parallel)
    return T.Trainer(
        student, teacher, spec["data"] if isinstance(spec["data"], list) else Path(spec["data"]), Path(spec["output"]),
        train, T.OptimConfig(**spec["optim"]),
        T.LossConfig(**spec["loss"]), T.CheckpointConfig(**spec["checkpoint"]),
        T.EvalDuringTraining(**spec["evaluation"]), T.LogConfig(**spec["log"]),
    )


def metrics(output: Path) -> list[dict]:
    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def canonical(trainer) -> dict[str, np.ndarray] | None:
    """The student's canonical fp32 weights on global rank 0 (None elsewhere)."""
    from nemo_minitron.parallel.sharding import gather_canonical

    full = gather_canonical(trainer.student.model, trainer.student.cfg)
    # (a copy: at world size 1 the gathered tensors are the live parameters)
    return None if full is None else {k: v.float().numpy().copy() for k, v in full.items()}


def params_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def sigterm_after(trainer, step: int) -> None:
    """This process receives a SIGTERM during ``step`` (1-based), as from a scheduler's preemption."""
    inner = trainer.train_step

    def train_step(batches):
        out = inner(batches)
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = train_step


def run_job(spec: dict) -> dict:
    """Train one run on this rank; report what the tests compare (numpy / Python only).

    ``spec["interrupt"] = (rank, step)``: global rank ``rank`` alone gets a SIGTERM during ``step``; every rank
    must stop after that step with a checkpoint, and the run is then resumed to its end.
    """
    import torch.distributed as dist

    stopped_at = None
    if spec.get("interrupt"):
        rank, step = spec["interrupt"]
        first = make_trainer(spec)
        if (dist.get_rank() if dist.is_initialized() else 0) == rank:
            sigterm_after(first, step)
        stopped = first.run()
        stopped_at = (stopped.steps, stopped.stopped_early)
    trainer = make_trainer(spec)
    teacher_before = params_snapshot(trainer.teacher.model) if trainer.teacher is not None else {}
    initial = canonical(trainer)
    result = trainer.run()
    teacher_params = dict(trainer.teacher.model.named_parameters()) if trainer.teacher is not None else {}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    proj = {}  # (student_layer, teacher_layer) -> (weight, gradient of the last step) of this stage's pairs
    if trainer.intermediate is not None:
        for pair, module in zip(trainer.intermediate.pairs, trainer.intermediate.module.projections):
            proj[pair] = (module.weight.detach().numpy().copy(), module.weight.main_grad.numpy().copy())
    return {
        "result": asdict(result),
        "weights": canonical(trainer),
        "initial": initial,
        "metrics": metrics(spec["output"]) if rank0 else None,
        "teacher_unchanged": all(torch.equal(teacher_params[n], v) for n, v in teacher_before.items()),
        "teacher_no_grad": all(p.grad is None and not p.requires_grad and not hasattr(p, "main_grad")
                               for p in teacher_params.values()),
        "projections": proj,
        "stopped_at": stopped_at,
    }


def run_layout(tp: int, pp: int, specs: list[dict], seed: int = 1234) -> list[dict]:
    """``run_job`` for every spec at one TP/PP layout (DP takes the rest of the world)."""
    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed)
    try:
        return [run_job(spec) for spec in specs]
    finally:
        state.destroy()


def run_here(specs: list[dict], seed: int = 1234) -> list[dict]:
    """``run_layout`` at TP=PP=1 in this process."""
    try:
        return run_layout(1, 1, specs, seed)
    finally:
        destroy_state()


def losses(rows: list[dict], key: str = "loss") -> list[float]:
    """The per-step values of ``key`` (training records only, not the final evaluation)."""
    return [r[key] for r in rows if "loss" in r]


def fixed_batches(data: Path, n: int = 2, seed: int = 99) -> list[torch.Tensor]:
    """``n`` micro-batches of the training split in another order than the trainer's (seed 1234)."""
    from nemo_minitron.data import SequenceSampler, TokenDataset

    batches = SequenceSampler(TokenDataset(str(data / "train")), SEQ, MB, seed=seed).batches()
    return [next(batches) for _ in range(n)]


def kd_on(trainer, batches: list[torch.Tensor]) -> float:
    """The trainer's KD loss of its current student on ``batches`` (forward only)."""
    from nemo_minitron.distill.pair import pipeline_shapes
    from nemo_minitron.parallel.schedule import forward_backward

    with torch.no_grad():
        out = forward_backward(trainer.stage_module, batches, trainer._loss_fn, forward_only=True,
                               adjust_tensor_shapes_fn=pipeline_shapes(trainer.pair))
    return float(np.mean([float(o["kd"]) for o in out]))


# ------------------------------------------------------------------------------------------ 1, 2: KD learns


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kd_steps_reduce_kd_loss_and_leave_the_teacher_alone(kd, tmp_path, single_rank, dtype):
    from nemo_minitron.checkpoint.io import load_model

    trainer = make_trainer(job(kd["pruned"], kd["teacher"], kd["data"], tmp_path / "run", steps=6, dtype=dtype))
    probe = fixed_batches(kd["data"])
    student_before = params_snapshot(trainer.student.model)
    teacher_before = params_snapshot(trainer.teacher.model)
    kd_before = kd_on(trainer, probe)
    result = trainer.run()
    kd_after = kd_on(trainer, probe)

    assert (result.steps, result.skipped_steps, result.stopped_early) == (6, 0, False)
    assert kd_after < 0.95 * kd_before, (kd_before, kd_after)
    curve = losses(metrics(tmp_path / "run"), "kd")
    assert len(curve) == 6 and all(math.isfinite(v) for v in curve)
    assert np.mean(curve[-2:]) < curve[0], curve
    # (megatron's local-spec RMSNorm keeps its weight in fp32 whatever the model's dtype)
    assert trainer.student.model.embedding.word_embeddings.weight.dtype == getattr(torch, dtype)

    # The teacher: frozen, never given a gradient (nor an fp32 gradient buffer), bit-identical afterwards,
    # and still the model on disk.
    for name, p in trainer.teacher.model.named_parameters():
        assert not p.requires_grad and p.grad is None and not hasattr(p, "main_grad"), name
        assert torch.equal(p, teacher_before[name]), name
    on_disk = load_model(str(kd["teacher"]), dtype=getattr(torch, dtype)).model.state_dict()
    for name, value in trainer.teacher.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, on_disk[name]), name
    # The student: every parameter moved (AdamW's decay moves even rows of unseen tokens).
    for name, p in trainer.student.model.named_parameters():
        assert not torch.equal(p, student_before[name]), f"{name} did not change"
        assert p.main_grad.abs().sum() > 0, name


def test_compiled_layers_train_like_eager_ones(kd, tmp_path, single_rank):
    """train.compile (torch.compile of every layer) gives the eager run's loss curve and weights, in fp32."""
    runs = {}
    for compiled in (False, True):
        spec = job(kd["pruned"], kd["teacher"], kd["data"], tmp_path / f"run{compiled}", steps=3,
                   train={"compile": compiled})
        trainer = make_trainer(spec)
        trainer.run()
        runs[compiled] = (losses(metrics(tmp_path / f"run{compiled}"), "kd"), canonical(trainer))
        torch._dynamo.reset()
    (eager_curve, eager_weights), (compiled_curve, compiled_weights) = runs[False], runs[True]
    np.testing.assert_allclose(compiled_curve, eager_curve, rtol=1e-5)
    # Adam's update is ~lr per element whatever the gradient's size: the last bits of a tiny gradient can move
    # an element by a fraction of lr (3e-3), so a few elements may differ by up to lr / 10 (compiled kernels
    # round otherwise than eager ones, by CPU); a compiled layer that trained otherwise would move most of them.
    for name, value in eager_weights.items():
        diff = np.abs(compiled_weights[name] - value)
        off = diff > 1e-4 + 1e-4 * np.abs(value)
        assert off.mean() <= 1e-3 and diff.max() <= 3e-4, (name, int(off.sum()), off.size, float(diff.max()))


def test_recomputed_activations_train_bit_identically(kd, tmp_path, single_rank):
    """train.recompute selective (core attention) and full (every layer) recompute in backward what the forward
    dropped; in fp32 on CPU the recomputation repeats the same operations on the same inputs, so the loss curve
    and the weights are those of the run without recomputation, bit for bit. The forward calls of the first
    layer and its core attention show that the recomputation happened: once more per training micro-batch."""
    runs = {}
    for recompute in (None, "selective", "full"):
        spec = job(kd["pruned"], kd["teacher"], kd["data"], tmp_path / str(recompute), steps=3,
                   train={"recompute": recompute})
        trainer = make_trainer(spec)
        layer = trainer.student.model.decoder.layers[0]
        calls = {"layer": 0, "core_attention": 0}
        for name, module in (("layer", layer), ("core_attention", layer.self_attention.core_attention)):
            module.register_forward_hook(lambda *_args, name=name: calls.__setitem__(name, calls[name] + 1))
        trainer.run()
        runs[recompute] = (metrics(spec["output"]), canonical(trainer), calls)
    want_metrics, want_weights, plain = runs[None]
    extra = 3 * GBS // MB  # training micro-batches: 3 steps of 2
    expected_calls = {"selective": {"layer": plain["layer"], "core_attention": plain["core_attention"] + extra},
                      "full": {"layer": plain["layer"] + extra, "core_attention": plain["core_attention"] + extra}}
    for recompute in ("selective", "full"):
        got_metrics, got_weights, calls = runs[recompute]
        assert calls == expected_calls[recompute], (recompute, calls, plain)
        assert got_metrics == want_metrics, recompute
        assert sorted(got_weights) == sorted(want_weights)
        for key, value in want_weights.items():
            assert np.array_equal(got_weights[key], value), f"{recompute} {key}"


def test_periodic_evaluation_leaves_the_training_as_it_is(kd, tmp_path, single_rank):
    """Held-out evaluations during training (here after every step, against none) change the loss curve's points
    and nothing else: the training metrics and the weights are the same bit for bit (what lets ``run`` and
    ``bench`` reuse a finished distillation whose eval.every_steps differs)."""
    runs = {}
    for every in (0, 1):
        spec = {**job(kd["pruned"], kd["teacher"], kd["data"], tmp_path / str(every), steps=3),
                "evaluation": dict(every_steps=every, max_windows=4)}
        trainer = make_trainer(spec)
        trainer.run()
        rows = metrics(spec["output"])
        runs[every] = ([{k: v for k, v in row.items() if not k.startswith("eval_")} for row in rows],
                       canonical(trainer), sum("eval_loss" in row for row in rows))
    assert (runs[0][2], runs[1][2]) == (1, 3)  # the final evaluation; after steps 1 and 2 too
    assert runs[1][0] == runs[0][0]
    for key, value in runs[0][1].items():
        assert np.array_equal(runs[1][1][key], value), key


# ------------------------------------------------------------------------------------------ 3: resume


def checkpoint_steps(output: Path) -> list[int]:
    from nemo_minitron.distill.checkpointing import step_dirs

    return [step for step, _ in step_dirs(Path(output) / "checkpoints")]


def test_a_blend_trains_in_the_blended_order_and_evaluates_each_component(kd, tmp_path, single_rank):
    from nemo_minitron.data import BlendComponent, BlendedSampler, PrepareDataConfig, prepare_data, train_sampler

    meta = json.loads((kd["data"] / "meta.json").read_text())
    other = prepare_data(PrepareDataConfig(input=meta["config"]["input"], tokenizer=meta["config"]["tokenizer"],
                                           output_dir=str(tmp_path / "data2"), valid_fraction=0.5, split_seed=5))
    paths = [str(kd["data"]), str(other.output_dir)]
    blend = [BlendComponent(weight=3, path=paths[0]), BlendComponent(weight=1, path=paths[1])]
    spec = job(kd["student"], kd["teacher"], kd["data"], tmp_path / "blend")
    trainer = make_trainer({**spec, "data": blend})
    assert isinstance(trainer.sampler, BlendedSampler)
    ours, reference = trainer.sampler.batches(start_sample=2), train_sampler(blend, SEQ, MB, seed=1234).batches(2)
    for _ in range(3):
        assert torch.equal(next(ours), next(reference))
    # Held-out: each component on its own windows, weighted as the blend.
    alone = [make_trainer({**spec, "data": p}).evaluate()[0] for p in paths]
    assert trainer.evaluate()[0] == pytest.approx(0.75 * alone[0] + 0.25 * alone[1], rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(kd, tmp_path, single_rank, dtype):
    """6 steps, a checkpoint every 2. The interrupted run gets a SIGTERM during step 3 (saves step 3 and
    stops), then resumes and crashes during step 6 after a half-written checkpoint of step 6 (the last
    complete one is step 4, and step 5 is already in metrics.jsonl), then resumes again to the end."""
    spec = job(kd["student"], kd["teacher"], kd["data"], tmp_path / "straight", steps=6, dtype=dtype)
    straight = make_trainer(spec)
    straight.run()
    want_metrics, want_weights = metrics(spec["output"]), canonical(straight)
    assert checkpoint_steps(spec["output"]) == [4, 6]  # keep_last 2 of 2, 4, 6

    spec = {**spec, "output": str(tmp_path / "interrupted")}
    first = make_trainer(spec)
    sigterm_after(first, 3)
    handler = signal.getsignal(signal.SIGTERM)
    result = first.run()
    assert (result.steps, result.stopped_early) == (3, True)
    assert checkpoint_steps(spec["output"]) == [2, 3]
    assert signal.getsignal(signal.SIGTERM) == handler  # the run's own handler is gone again

    second = make_trainer(spec)
    inner = second.train_step

    def crash_in_step_6(batches):
        if second.step == 5:
            tmp = Path(spec["output"]) / "checkpoints" / ".step_00000006.tmp"
            tmp.mkdir()
            (tmp / "rank00000.pt.part").write_bytes(b"half a checkpoint")
            raise RuntimeError("node failure")
        return inner(batches)

    second.train_step = crash_in_step_6
    with pytest.raises(RuntimeError, match="node failure"):
        second.run()
    assert checkpoint_steps(spec["output"]) == [3, 4]
    assert len(metrics(spec["output"])) == 5  # steps 1-5; step 5 will be redone

    third = make_trainer(spec)
    result = third.run()
    assert (result.steps, result.stopped_early, result.skipped_steps) == (6, False, 0)

    got_metrics = metrics(spec["output"])
    assert [r["step"] for r in got_metrics] == [1, 2, 3, 4, 5, 6, 6]
    assert got_metrics == want_metrics  # every loss, norm, lr and eval value, bit for bit
    got_weights = canonical(third)
    assert sorted(got_weights) == sorted(want_weights)
    for key, value in want_weights.items():
        assert np.array_equal(got_weights[key], value), key
    assert checkpoint_steps(spec["output"]) == [4, 6]
    assert not (Path(spec["output"]) / "checkpoints" / ".step_00000006.tmp").exists()  # replaced by the real one

    # The checkpoint holds the weights and, per weight, the optimizer's fp32 copy and Adam moments, whole.
    from nemo_minitron.distill.checkpointing import read_tensors

    ckpt = Path(spec["output"]) / "checkpoints" / "step_00000006"
    tensors = read_tensors(ckpt)
    checked = 0
    # megatron's names: the layers' tensors stacked ([layer, ...]), the norms named as in Transformer Engine's
    # fused norm + linear layers (so checkpoints of either layer spec load in the other).
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    for key, value in want_weights.items():
        index = re.search(r"\.layers\.(\d+)\.", key)
        name = key if index is None else key.replace(index.group(0), ".layers.")
        for local, te in te_names.items():
            name = name.replace(local, te)
        saved = tensors[name] if index is None else tensors[name][int(index.group(1))]
        assert np.array_equal(saved.float().numpy(), value), key
        checked += 1
    assert checked == len(want_weights) > 10
    state_keys = {k for k in tensors if k.startswith("optimizer.state.")}
    assert {k.split(".")[2] for k in state_keys} == {"exp_avg", "exp_avg_sq", "param"}  # fp32: the weights
    assert tensors["optimizer.state.exp_avg.decoder.final_layernorm.weight"].shape == (32,)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["step"], meta["layout"]["world_size"], meta["layout"]["tensor_model_parallel_size"]) == (6, 1, 1)

    # Starting from scratch among these checkpoints would mix two runs: refused.
    from nemo_minitron.errors import UserError

    with pytest.raises(UserError, match="holds checkpoints of an earlier run and checkpoint.resume is false"):
        make_trainer({**spec, "checkpoint": {**spec["checkpoint"], "resume": False}}).run()
    assert checkpoint_steps(spec["output"]) == [4, 6]


# ------------------------------------------------------------------------------------------ 4, 6: layouts

# layout -> (TP, PP, world size, train settings); DP is world / (TP * PP). tp2sp splits the sequence (SEQ = 16
# tokens) over the 2 TP ranks between the tensor-parallel GEMMs: norms, intermediate states and final hidden
# states hold 8 tokens per rank.
LAYOUTS = {"tp2": (2, 1, 2, {}), "pp2": (1, 2, 2, {}), "dp2": (1, 1, 2, {}),
           "tp2sp": (2, 1, 2, {"sequence_parallel": True})}
# Student layers 1 and 3 against teacher layers 1 and 3, widths 32 -> 64: at PP=2 one pair is on each stage,
# so the first stage's loss travels back through the tensor it sends on (pair.AttachAuxLoss).
PAIRS = [{"student_layer": 1, "teacher_layer": 1}, {"student_layer": 3, "teacher_layer": 3}]
# Both on the first stage at PP=2: the last stage, which reports the metrics, holds no pair.
FIRST_STAGE_PAIRS = [{"student_layer": 0, "teacher_layer": 0}, {"student_layer": 1, "teacher_layer": 1}]


def layout_specs(kd: dict, root: Path, world: int = 1, train: dict | None = None) -> list[dict]:
    """The runs of SPEC_NAMES; and the pruned one again with a SIGTERM on the last rank during step 3. ``train``:
    settings of the layout that every run gets."""
    return [
        job(kd["pruned"], kd["teacher"], kd["data"], root / "pruned", train=train),
        job(kd["tied"], kd["teacher"], kd["data"], root / "tied", train=train),
        job(kd["student"], kd["teacher"], kd["data"], root / "intermediate", train=train,
            loss={"intermediate": {"pairs": PAIRS, "loss": "cosine", "weight": 1.0}}),
        job(kd["tied"], None, kd["data"], root / "ce", train=train),
        job(kd["tied"], kd["teacher"], kd["data"], root / "first_stage_pairs", train=train,
            loss={"intermediate": {"pairs": FIRST_STAGE_PAIRS, "loss": "mse", "weight": 0.3}}),
        # At PP=2 the first stage's pair is weighted before the last stage knows this step's logit loss.
        job(kd["student"], kd["teacher"], kd["data"], root / "dynamic", train=train,
            loss={"intermediate": {"pairs": PAIRS, "loss": "mse", "weight": 0.5, "balancing": "dynamic"}}),
        {**job(kd["pruned"], kd["teacher"], kd["data"], root / "resumed", train=train), "interrupt": (world - 1, 3)},
    ]


SPEC_NAMES = ["pruned", "tied", "intermediate", "ce", "first_stage_pairs", "dynamic"]
RESUMED = len(SPEC_NAMES)


@pytest.fixture(scope="module")
def layout_reference(kd, tmp_path_factory) -> list[dict]:
    return run_here(layout_specs(kd, tmp_path_factory.mktemp("tp1"))[:RESUMED])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, kd, tmp_path_factory) -> tuple[str, list[list[dict]]]:
    from nemo_minitron.parallel import state

    tp, pp, world, train = LAYOUTS[request.param]
    reports = state.spawn(run_layout, world, tp, pp,
                          layout_specs(kd, tmp_path_factory.mktemp(request.param), world, train))
    return request.param, reports


@pytest.mark.parametrize("index", range(len(SPEC_NAMES)), ids=SPEC_NAMES)
def test_parallel_layout_equals_tp1(layout_reference, layout, index):
    name, reports = layout
    ref, got = layout_reference[index], reports[0][index]
    assert got["result"]["steps"] == ref["result"]["steps"] == 4
    want_curve, got_curve = losses(ref["metrics"]), losses(got["metrics"])
    assert len(got_curve) == 4
    np.testing.assert_allclose(got_curve, want_curve, rtol=1e-5, err_msg=f"{name} {SPEC_NAMES[index]}")
    # A KD run without a CE weight computes no CE, so reports none.
    for key in ("kd", "grad_norm") + tuple(k for k in ("ce", "intermediate") if k in ref["metrics"][0]):
        np.testing.assert_allclose(losses(got["metrics"], key), losses(ref["metrics"], key), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["result"]["eval_loss"], ref["result"]["eval_loss"], rtol=1e-5)
    assert sorted(got["weights"]) == sorted(ref["weights"])
    # Adam divides by sqrt(v): where a gradient is ~eps, its rounding (TP sums in another order) moves single
    # weights by up to ~lr / 10 (seen: 3e-4, a 6e-4 share of the tensor's change). So: every tensor's
    # difference from TP=1 is tiny next to what training changed it by (a wrong gradient gives ~1), and no
    # single weight is off by a third of a step.
    for key, value in ref["weights"].items():
        change = np.linalg.norm(value - ref["initial"][key])
        diff = np.linalg.norm(got["weights"][key] - value)
        assert change > 0 and diff <= 1e-2 * change, f"{name} {SPEC_NAMES[index]} {key}: {diff:.3g} vs {change:.3g}"
        assert np.abs(got["weights"][key] - value).max() <= 1e-3, key
    # Only global rank 0 gathers and logs.
    assert all(r[index]["weights"] is None and r[index]["metrics"] is None for r in reports[1:])
    # The teacher never changes nor gets a gradient, on any rank.
    assert all(r[index]["teacher_unchanged"] and r[index]["teacher_no_grad"] for r in reports)


def test_intermediate_loss_trains_its_projections_at_every_layout(layout_reference, layout):
    name, reports = layout
    index = SPEC_NAMES.index("intermediate")
    ref = layout_reference[index]
    assert {pair for pair in ref["projections"]} == {(1, 1), (3, 3)}
    assert all("intermediate" in r for r in ref["metrics"] if "loss" in r)
    for (weight, grad) in ref["projections"].values():
        assert weight.shape == (64, 32) and np.abs(grad).sum() > 0
    # Every pair lives on exactly one pipeline stage, replicated over TP and DP, with the TP=1 weights.
    held: dict[tuple[int, int], list] = {}
    for r in reports:
        for pair, (weight, grad) in r[index]["projections"].items():
            held.setdefault(pair, []).append((weight, grad))
    assert sorted(held) == [(1, 1), (3, 3)], name
    for pair, copies in held.items():
        for weight, grad in copies:
            assert np.abs(grad).sum() > 0, f"{name} {pair}: projection got no gradient"
            assert np.abs(weight - ref["projections"][pair][0]).max() <= 1e-4, f"{name} {pair}"
            assert np.array_equal(weight, copies[0][0])


# ------------------------------------------------------------------------------------------ 5: CE mode


def test_ce_mode_trains_one_model_on_the_lm_loss(kd, tmp_path, single_rank):
    """Teacher correction: no teacher, CE only. The first step's loss is transformers' CE on the same batch."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from nemo_minitron.data import SequenceSampler, TokenDataset

    spec = job(kd["teacher"], None, kd["data"], tmp_path / "ce", steps=6)
    trainer = make_trainer(spec)
    assert trainer.pair.teacher is None and trainer.intermediate is None
    probe = fixed_batches(kd["data"])

    def ce_on(batches):
        from nemo_minitron.parallel.schedule import forward_backward

        with torch.no_grad():
            return float(np.mean([float(o["ce"]) for o in forward_backward(
                trainer.stage_module, batches, trainer._loss_fn, forward_only=True)]))

    before = ce_on(probe)
    result = trainer.run()
    after = ce_on(probe)
    rows = metrics(spec["output"])
    assert (result.steps, result.skipped_steps) == (6, 0)
    assert after < before - 0.05, (before, after)
    curve = losses(rows)
    assert np.mean(curve[-2:]) < curve[0], curve
    assert losses(rows, "ce") == curve and all(v == 0 for v in losses(rows, "kd"))
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)

    # The first step's batch is the sampler's first global batch (2 micro-batches of 2 x 17 tokens).
    sampler = SequenceSampler(TokenDataset(str(kd["data"] / "train")), SEQ, MB, seed=1234)
    tokens = torch.cat([b for b, _ in zip(sampler.batches(), range(GBS // MB))])
    hf = AutoModelForCausalLM.from_pretrained(kd["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    assert abs(rows[0]["loss"] - want) <= 1e-4 * want, (rows[0]["loss"], want)


def test_dynamic_balancing_matches_the_previous_logit_loss_in_value(kd, tmp_path, single_rank):
    """dynamic: the intermediate term has the value weight * (the previous step's logit loss); the first step,
    which has none, weights it as fixed. One student layer in two pairs."""
    pairs = [{"student_layer": 0, "teacher_layer": 1}, {"student_layer": 0, "teacher_layer": 2}]
    spec = job(kd["student"], kd["teacher"], kd["data"], tmp_path / "run", steps=3,
               loss={"intermediate": {"pairs": pairs, "loss": "mse", "weight": 0.5, "balancing": "dynamic"}})
    trainer = make_trainer(spec)
    result = trainer.run()
    assert result.steps == 3
    rows = [r for r in metrics(spec["output"]) if "loss" in r]
    assert all(row["intermediate"] > 0 for row in rows)
    first = rows[0]
    assert abs(first["loss"] - (first["logit_loss"] + 0.5 * first["intermediate"])) <= 1e-6 * first["loss"], first
    for previous, row in zip(rows, rows[1:]):
        want = row["logit_loss"] + 0.5 * previous["logit_loss"]
        assert abs(row["loss"] - want) <= 1e-6 * row["loss"], (row, previous)
    for module in trainer.intermediate.module.projections:
        assert module.weight.shape == (64, 32) and module.weight.main_grad.abs().sum() > 0


def test_distill_returns_the_student_without_training_hooks(kd, tmp_path, single_rank):
    """The Python API hands the student back as a plain model: no forward hooks (intermediate losses), no
    gradient hooks or main_grad buffers (the optimizer), and logits, not hidden states, from its forward."""
    from nemo_minitron.checkpoint.io import load_model, save_checkpoint
    from nemo_minitron.distill import trainer as T
    from nemo_minitron.parallel.schedule import split_tokens

    spec = job(kd["student"], kd["teacher"], kd["data"], tmp_path / "run", steps=2,
               loss={"intermediate": {"pairs": PAIRS, "loss": "cosine", "weight": 1.0}})
    student, teacher = load_model(spec["student"]), load_model(spec["teacher"])
    T.distill(student, teacher, spec["data"], spec["output"], T.TrainConfig(**spec["train"]),
              T.OptimConfig(**spec["optim"]), T.LossConfig(**spec["loss"]), T.CheckpointConfig(**spec["checkpoint"]),
              T.EvalDuringTraining(**spec["evaluation"]), T.LogConfig(**spec["log"]))
    for model in (student.model, teacher.model):
        for name, module in model.named_modules():
            assert not module._forward_hooks and not module._forward_pre_hooks, name
            assert "forward" not in module.__dict__, name
    for name, param in student.model.named_parameters():
        assert not getattr(param, "_post_accumulate_grad_hooks", None), name
        assert not hasattr(param, "main_grad"), name
    # Each weight has its own storage again (training kept them in one contiguous buffer).
    storages = [p.untyped_storage().data_ptr() for p in student.model.parameters()]
    assert len(set(storages)) == len(storages)
    save_checkpoint(student, tmp_path / "trained")
    fresh = load_model(str(tmp_path / "trained"))
    tokens = fixed_batches(kd["data"], n=1, seed=3)[0]
    inputs, positions, _ = split_tokens(tokens)
    with torch.no_grad():
        got = student.model.eval()(inputs, positions, None)
        want = fresh.model.eval()(inputs, positions, None)
    assert got.shape[-1] == want.shape[-1] >= 49152
    assert torch.equal(got, want)
    # A backward pass puts gradients in .grad again.
    student.model.train()(inputs, positions, None).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in student.model.parameters())


def test_pairs_on_different_pipeline_stages_are_rejected_before_compute(kd, tmp_path):
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.trainer import validate
    from nemo_minitron.errors import UserError

    base = dict(student=str(kd["student"]), teacher=str(kd["teacher"]), data=str(kd["data"]),
                output=str(tmp_path / "out"), train=dict(seq_length=SEQ, max_steps=2),
                parallel=dict(pipeline_model_parallel_size=2))
    same_stage = {"intermediate": {"pairs": [{"student_layer": 0, "teacher_layer": 1}]}}
    validate(DistillConfig(**base, loss=same_stage))
    split = {"intermediate": {"pairs": [{"student_layer": 1, "teacher_layer": 2}]}}
    with pytest.raises(UserError) as err:
        validate(DistillConfig(**base, loss=split))
    assert str(err.value) == ("loss.intermediate: student layer 1 (stage 0) and teacher layer 2 (stage 1) are on "
                              "different pipeline stages")
    # At PP=1 every pair is on the one stage.
    validate(DistillConfig(**{**base, "parallel": {}}, loss=split))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ 7: non-finite steps


def nan_from(trainer, first_step: int, last_step: int | None = None) -> None:
    """Make the logit loss NaN in the steps ``first_step..last_step`` (1-based, inclusive)."""
    inner = trainer.logit_loss

    def logit_loss(*args):
        out = inner(*args)
        if first_step <= trainer.step + 1 <= (last_step or 10**9):
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    trainer.logit_loss = logit_loss


def test_a_non_finite_step_is_skipped(kd, tmp_path, single_rank):
    spec = job(kd["student"], kd["teacher"], kd["data"], tmp_path / "run", steps=5)
    trainer = make_trainer(spec)
    nan_from(trainer, 3, 3)
    snapshots = [params_snapshot(trainer.student.model)]
    inner = trainer.train_step

    def train_step(batches):
        out = inner(batches)
        snapshots.append(params_snapshot(trainer.student.model))
        return out

    trainer.train_step = train_step
    result = trainer.run()
    assert (result.steps, result.skipped_steps, result.stopped_early) == (5, 1, False)
    rows = [r for r in metrics(spec["output"]) if "loss" in r]
    assert [r.get("skipped", 0.0) for r in rows] == [0, 0, 1, 0, 0]
    assert math.isnan(rows[2]["loss"]) and "lr" not in rows[2]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    for step in range(1, 6):
        same = all(torch.equal(snapshots[step][n], snapshots[step - 1][n]) for n in snapshots[0])
        assert same == (step == 3), f"step {step}"
    # AdamW counted only the 4 real steps.
    inner_states = [s for opt in trainer.engine.optimizer.chained_optimizers for s in opt.optimizer.state.values()]
    assert inner_states and {int(s["step"]) for s in inner_states} == {4}


def test_too_many_non_finite_steps_stop_with_a_loadable_checkpoint(kd, tmp_path, single_rank):
    from nemo_minitron.distill import checkpointing
    from nemo_minitron.errors import UserError

    spec = job(kd["student"], kd["teacher"], kd["data"], tmp_path / "run", steps=6, train={"max_skipped_steps": 1})
    trainer = make_trainer(spec)
    nan_from(trainer, 3)
    with pytest.raises(UserError) as err:
        trainer.run()
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("step 4: loss or gradients not finite for 2 steps in a row; stopping")
    assert checkpoint_steps(spec["output"]) == [2]
    found = checkpointing.load_latest(Path(spec["output"]) / "checkpoints", trainer._meta(),
                                      lambda: trainer._sharded_state(loading=True))
    assert found.step == 2 and found.state["train"]["step"] == 2 and found.state["train"]["skipped"] == 0
    # Without the fault, the run resumes from that checkpoint and finishes.
    again = make_trainer(spec)
    result = again.run()
    assert (result.steps, result.skipped_steps) == (6, 0)
    assert [r["step"] for r in metrics(spec["output"]) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------ 8: CLI


@pytest.fixture(scope="module")
def config_only(kd, tmp_path_factory) -> dict[str, Path]:
    """Teachers that exist only as a config.json (validation never reads weights)."""
    root = tmp_path_factory.mktemp("config_only")
    base = json.loads((kd["teacher"] / "config.json").read_text())
    out = {}
    for name, change in {"one_group": {"num_key_value_heads": 1}, "vocab_256": {"vocab_size": 256},
                         "three_layers": {"num_hidden_layers": 3}}.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**base, **change}))
        out[name] = root / name
    return out


def cli_args(kd: dict, output: Path, **changes) -> list[str]:
    args = {
        "student": kd["student"], "teacher": kd["teacher"], "data": kd["data"], "output": output,
        "train.seq_length": SEQ, "train.micro_batch_size": MB, "train.global_batch_size": GBS,
        "train.max_steps": 4, "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 1,
        "checkpoint.every_steps": 2, "eval.every_steps": 2, "eval.max_windows": 4,
    }
    args.update(changes)
    return [f"{k}={v}" for k, v in args.items() if v is not None]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"teacher": None}, "mode kd needs a teacher"),
        ({"mode": "ce"}, "mode ce trains without a teacher: remove teacher"),
        ({"train.global_batch_size": 5}, "global_batch_size 5 is not divisible by micro_batch_size 2"),
        ({"train.max_stepz": 3}, "train.max_stepz: unknown key"),
        ({"data": "/nonexistent/data"}, "data: /nonexistent/data is not a prepared dataset (run prepare-data first)"),
        ({"student": "/nonexistent/student"}, "model directory not found: /nonexistent/student"),
        ({"parallel.tensor_model_parallel_size": 4},
         "num_query_groups 2 is not divisible by tensor_model_parallel_size 4"),
        ({"teacher": "one_group", "parallel.tensor_model_parallel_size": 2},
         "teacher: num_query_groups 1 is not divisible by tensor_model_parallel_size 2"),
        ({"teacher": "three_layers", "parallel.pipeline_model_parallel_size": 2},
         "teacher: num_layers 3 is not divisible by pipeline_model_parallel_size 2"),
        ({"teacher": "vocab_256"}, "teacher vocab_size 256 differs from the student's 49152"),
        ({"parallel.pipeline_model_parallel_size": 2,
          "loss.intermediate.pairs": "[{student_layer: 0, teacher_layer: 3}]"},
         "are on different pipeline stages"),
        ({"loss.intermediate.pairs": "[{student_layer: 4, teacher_layer: 0}]"}, "student_layer 4 does not exist"),
        ({"mode": "ce", "teacher": None, "loss.intermediate.pairs": "[{student_layer: 0, teacher_layer: 0}]"},
         "loss.intermediate needs a teacher (mode kd)"),
        ({"train.seq_length": 100000}, "split of"),
        ({"train.sequence_parallel": True},
         "<root>: Value error, train.sequence_parallel needs parallel.tensor_model_parallel_size > 1"),
        ({"train.sequence_parallel": True, "parallel.tensor_model_parallel_size": 2, "train.seq_length": 15},
         "train.sequence_parallel splits train.seq_length 15 over parallel.tensor_model_parallel_size 2: it must be "
         "divisible by it"),
        ({"train.recompute": "full", "loss.intermediate.pairs": "[{student_layer: 0, teacher_layer: 0}]"},
         "train.recompute full cannot be combined with loss.intermediate pairs"),
        ({"student": "vocab_256", "teacher": "vocab_256"},
         "was tokenized with 49152 token ids, more than the student's vocab_size 256"),
    ],
)
def test_bad_distill_config_is_one_line_and_exit_2(kd, config_only, tmp_path, capsys, changes, message):
    from nemo_minitron.cli import main

    changes = {k: str(config_only[v]) if k in ("student", "teacher") and v in config_only else v
               for k, v in changes.items()}
    assert main(["distill"] + cli_args(kd, tmp_path / "out", **changes)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("nemo-minitron distill: error: ") and message in err, err
    assert not (tmp_path / "out").exists()  # stopped before any work


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("nemo-minitron")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "nemo_minitron.cli"]


def _printed_json(stdout: str) -> dict:
    start = stdout.rfind("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


def test_cli_end_to_end_and_rerun_resumes(kd, tmp_path):
    from safetensors.torch import load_file

    from nemo_minitron.dtypes import native_dtype

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}

    def run() -> dict:
        # 5 held-out windows in micro-batches of 2: the last micro-batch is a partial one.
        proc = subprocess.run(_cli() + ["distill"] + cli_args(kd, out, **{"eval.max_windows": 5}),
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _printed_json(proc.stdout)

    printed = run()
    result = json.loads((out / "result.json").read_text())
    assert printed == {k: v for k, v in result.items() if k != "config"}
    assert ((result["steps"], result["tokens"], result["skipped_steps"], result["stopped_early"])
            == (4, 4 * GBS * SEQ, 0, False))
    # The default dtype, auto, and what it resolved to on this machine.
    assert (result["config"]["train"]["dtype"], result["dtype"]) == ("auto", native_dtype())
    assert math.isfinite(result["eval_loss"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    assert ("eval_loss" in rows[1] and "eval_loss" not in rows[2]
            and set(rows[4]) == {"step", "eval_loss", "eval_ppl", "tokens"})
    assert rows[3]["loss"] == result["final_loss"] and rows[4]["eval_loss"] == result["eval_loss"]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert checkpoint_steps(out) == [2, 4]
    final = out / "final"
    assert {"model_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    tensors = load_file(final / "model.safetensors")
    assert tensors["embedding.word_embeddings.weight"].shape == (49152, 32)
    # The trainer's held-out loss is the eval stage's on the same windows (all 5, in the training dtype).
    proc = subprocess.run(_cli() + ["eval", f"model={final}", f"data={kd['data']}", f"seq_length={SEQ}",
                                    "max_windows=5", f"micro_batch_size={MB}", f"dtype={result['dtype']}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = _printed_json(proc.stdout)
    assert evaluated["windows"] == 5
    assert abs(evaluated["loss"] - result["eval_loss"]) <= 1e-6 * evaluated["loss"], (evaluated, result["eval_loss"])
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}

    # The same command again: it resumes at its last step, trains nothing, and reports the same run.
    again = run()
    assert {k: v for k, v in again.items() if k not in ("seconds", "tokens_per_second")} == {
        k: v for k, v in printed.items() if k not in ("seconds", "tokens_per_second")}
    assert metrics(out) == rows
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before
    for key, value in load_file(final / "model.safetensors").items():
        assert torch.equal(value, tensors[key]), key

    # checkpoint.keep_when_done=false: the same training, and no checkpoint left once the final model is saved.
    out = tmp_path / "run_no_checkpoints"
    proc = subprocess.run(_cli() + ["distill"] + cli_args(kd, out, **{"eval.max_windows": 5,
                                                                       "checkpoint.keep_when_done": "false"}),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()
    assert metrics(out) == rows
    for key, value in load_file(out / "final" / "model.safetensors").items():
        assert torch.equal(value, tensors[key]), key


def test_sigterm_on_one_rank_stops_all_and_the_resumed_run_is_exact(layout):
    """At every layout: a SIGTERM on the last rank alone stops every rank after step 3 (checkpointed); the
    resumed run's loss curve and weights are those of the uninterrupted run at that layout, bit for bit."""
    name, reports = layout
    assert all(r[RESUMED]["stopped_at"] == (3, True) for r in reports), name
    straight, resumed = reports[0][0], reports[0][RESUMED]
    assert resumed["result"]["steps"] == 4 and not resumed["result"]["stopped_early"]
    assert resumed["metrics"] == straight["metrics"], name
    for key, value in straight["weights"].items():
        assert np.array_equal(resumed["weights"][key], value), f"{name} {key}"


def _hold(directory: Path) -> subprocess.Popen:
    """Another process that holds ``directory``'s lock until it is killed."""
    code = ("import sys, time\nfrom nemo_minitron.fsutil import DirectoryLock\n"
            "DirectoryLock(sys.argv[1], 'output').__enter__()\nprint('held', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_distill_on_a_held_output_stops_naming_the_holder(kd, tmp_path):
    import socket

    from nemo_minitron.fsutil import DirectoryLock

    out = tmp_path / "run"
    holder = _hold(out)
    try:
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        proc = subprocess.run(_cli() + ["distill"] + cli_args(kd, out), capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == (
            f"nemo-minitron distill: error: output {out} is in use by process {holder.pid} on "
            f"{socket.gethostname()}: wait for it to finish, or stop it, or choose another output")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing trained, nothing written
    finally:
        holder.kill()
        holder.wait()
    # A holder killed with SIGKILL keeps nothing: the kernel released its lock.
    with DirectoryLock(out, "output"):
        assert (out / ".lock").read_text().startswith(f"process {os.getpid()} on ")


@pytest.mark.parametrize("train, message", [
    ({"fp8": "hybrid"}, "train.fp8 is hybrid but the student was built with fp8=None (load it with "
                        "load_model(..., fp8=train.fp8))"),
])
def test_models_built_otherwise_than_training_asks_are_refused(kd, tmp_path, single_rank, train, message):
    from nemo_minitron.errors import UserError

    spec = job(kd["student"], kd["teacher"], kd["data"], tmp_path / "run", train=train)
    with pytest.raises(UserError) as err:
        make_trainer(spec)
    assert str(err.value) == message
