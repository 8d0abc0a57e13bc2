"""megatron-core's own training engine runs on CPU (gloo) through nemo_minitron.parallel.cpu: DDP with bucketed,
overlapped gradient reduction and the distributed optimizer (ZeRO-1). DP=2 trains exactly as DP=1 on the same
global batch, and each DP rank holds half of the optimizer state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

VOCAB = 256
STEPS = 3


def _batches() -> list[torch.Tensor]:
    """Two micro-batches of 2 sequences of 17 tokens: the global batch of every layout below."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (2, 17), generator=gen) for _ in range(2)]


def _train(source: str) -> dict:
    """STEPS AdamW steps of megatron's DDP + distributed optimizer on this rank's share of the batches."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.parallel import state
    from nemo_minitron.parallel.config import ParallelConfig
    from nemo_minitron.parallel.schedule import forward_backward
    from nemo_minitron.parallel.vocab import token_cross_entropy

    state.initialize(ParallelConfig())
    model = load_model(source).model
    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True, bucket_size=4096), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
        use_distributed_optimizer=True), [ddp])
    mine = _batches()[state.dp_rank() :: state.dp_size()]

    def loss_fn(logits, labels):
        loss = token_cross_entropy(logits, labels, VOCAB).mean()
        return loss, {"loss": loss.detach().clone()}

    losses, norms = [], []
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(ddp, mine, loss_fn, forward_only=False)
        _, norm, _ = optimizer.step()
        local = torch.stack([r["loss"] for r in reports]).mean().double()
        losses.append(float(state.all_reduce(local, state.dp_group())) / state.dp_size())
        norms.append(float(norm))
    inner = [opt.optimizer for opt in optimizer.chained_optimizers]
    state_bytes = sum(t.numel() * t.element_size() for opt in inner for s in opt.state.values()
                      for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()
               if torch.is_tensor(v) and not k.endswith("_extra_state")}
    return {"losses": losses, "norms": norms, "state_bytes": state_bytes, "weights": weights}


@pytest.mark.parametrize("dp", [2])
def test_distributed_optimizer_at_dp2_equals_dp1(tiny_hf_dirs, dp):
    from nemo_minitron.parallel import state

    source = str(tiny_hf_dirs["untied"])
    (one,) = state.spawn(_train, 1, source)
    many = state.spawn(_train, dp, source)
    assert one["losses"][-1] < one["losses"][0]
    for got in many:
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-5)
        np.testing.assert_allclose(got["norms"], one["norms"], rtol=1e-5)
        for key, value in one["weights"].items():
            np.testing.assert_allclose(got["weights"][key], value, rtol=0, atol=1e-5, err_msg=key)
    # ZeRO-1: each DP rank keeps the Adam moments of its own shard of the parameters (one bucket's padding aside).
    for got in many:
        assert got["state_bytes"] == pytest.approx(one["state_bytes"] / dp, rel=0.02)


# ------------------------------------------------------------------------------------------ resharding checkpoints

STEPS_RESHARD = 4


@pytest.fixture(scope="module")
def pair_and_data(tmp_path_factory) -> dict:
    """A tiny teacher (hidden 64) and student (hidden 32), 4 layers each, with the SmolLM2 tokenizer, and a
    prepared corpus."""
    from tiny import prepare_tiny_corpus, write_tiny_hf

    root = tmp_path_factory.mktemp("reshard")
    common = dict(vocab_size=49152, with_tokenizer=True)
    teacher = write_tiny_hf(root / "teacher", hidden_size=64, intermediate_size=96, seed=31, **common)
    student = write_tiny_hf(root / "student", hidden_size=32, intermediate_size=64, seed=32, **common)
    return {"teacher": str(teacher), "student": str(student), "data": str(prepare_tiny_corpus(root, teacher))}


def _distil(tp: int, pp: int, models: dict, output: str) -> None:
    """STEPS_RESHARD steps of KD at this layout (DP takes the rest), a checkpoint every 2; resumes if one is there."""
    from pathlib import Path

    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.distill.config import (
        CheckpointConfig,
        EvalDuringTraining,
        LogConfig,
        LossConfig,
        OptimConfig,
        TrainConfig,
    )
    from nemo_minitron.distill.trainer import distill
    from nemo_minitron.parallel import state
    from nemo_minitron.parallel.config import ParallelConfig

    state.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=5)
    train = TrainConfig(seq_length=16, micro_batch_size=1, global_batch_size=4, max_steps=STEPS_RESHARD,
                        dtype="float32", teacher_dtype="float32", seed=5)
    distill(load_model(models["student"], dtype=torch.float32), load_model(models["teacher"], dtype=torch.float32),
            models["data"], Path(output), train, OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1), LossConfig(),
            CheckpointConfig(every_steps=2, keep_last=STEPS_RESHARD), EvalDuringTraining(every_steps=0, max_windows=1),
            LogConfig(progress=False, tensorboard=False))


def _losses(output) -> dict[int, float]:
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_checkpoint_reshards_and_continues_the_loss_curve(pair_and_data, tmp_path):
    """Written at DP2 x TP2, the checkpoint of step 2 resumes at DP4 x TP1 and at DP1 x TP2 x PP2: steps 3 and 4
    have the losses of the run that went on at DP2 x TP2 (float rounding apart: TP sums in another order)."""
    import shutil

    from nemo_minitron.parallel import state

    straight = tmp_path / "dp2tp2"
    state.spawn(_distil, 4, 2, 1, pair_and_data, str(straight))
    want = _losses(straight)
    assert sorted(want) == [1, 2, 3, 4] and want[4] < want[1]
    meta = json.loads((straight / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                              "data_parallel_size": 2, "world_size": 4}
    for name, tp, pp in (("dp4tp1", 1, 1), ("dp1tp2pp2", 2, 2)):
        resumed = tmp_path / name
        shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
        state.spawn(_distil, 4, tp, pp, pair_and_data, str(resumed))
        got = _losses(resumed)
        assert sorted(got) == [3, 4], name
        np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=2e-5, err_msg=name)
