"""Peak memory of a training step's forward and backward with ``train.recompute`` none, selective and full.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recompute_memory.py [--seq-length 8192] [--hidden 256] \\
        [--layers 8] [--vocab 4096] [--json FILE]

A small Llama (random weights, fp32, TP = PP = 1; 8 layers of hidden 256, MLP 768, 4 heads in 2 query groups
by default) runs the trainer's step on one sequence of ``--seq-length`` tokens: megatron's schedule over the
distillation pair without a teacher, the fused CE loss (FusedLogitKD, 1024-token chunks) on the final hidden
states. The peak is measured with torch's profiler (``profile_memory``): the running sum of every CPU
allocation and free during the step, so it is the step's memory above what existed before it. A step run
before the measured one allocates the gradients, so the peak is activations and the step's transient buffers.
Each mode builds the model from the same seed; the losses are printed to show that they compute the same.
(``tracemalloc`` cannot do this: it sees Python's allocator, not the tensors' memory.)
"""

from __future__ import annotations

import argparse
import json

import torch

MODES = (None, "selective", "full")


def step_peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations (minus frees) while ``fn()`` runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def measure(mode, args: argparse.Namespace) -> dict:
    from nemo_minitron.distill.config import LogitKDConfig
    from nemo_minitron.distill.losses import FusedLogitKD
    from nemo_minitron.distill.pair import DistillationPair, output_weight
    from nemo_minitron.models.builder import build_model
    from nemo_minitron.models.config import ModelConfig
    from nemo_minitron.parallel.schedule import forward_backward

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
                      num_layers=args.layers, num_attention_heads=4, num_query_groups=2,
                      max_position_embeddings=args.seq_length)
    torch.manual_seed(0)
    model = build_model(cfg, recompute=mode, use_te=False)
    model.train()
    pair = DistillationPair(model, None)
    pair.model_type = model.model_type  # read by megatron's schedules, as from the trainer's stage module
    loss = FusedLogitKD(LogitKDConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=1024), cfg.vocab_size)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq_length + 1), generator=torch.Generator().manual_seed(1))

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor):
        out = loss(hidden.reshape(-1, hidden.shape[-1]), output_weight(model), None, None, labels.reshape(-1))
        return out["loss"], {"loss": out["loss"].detach().clone()}

    def step() -> float:
        return float(forward_backward(pair, [tokens], loss_fn, forward_only=False)[0]["loss"])

    value = step()  # allocates the gradients
    peak = step_peak_bytes(step)
    pair.restore()
    return {"recompute": mode, "peak_bytes": peak, "loss": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    from nemo_minitron.parallel import state

    state.initialize(state.ParallelConfig())
    try:
        results = [measure(mode, args) for mode in MODES]
    finally:
        state.destroy()
    mib = 2**20
    print(f"seq_length {args.seq_length}  hidden {args.hidden}  layers {args.layers}  vocab {args.vocab}  fp32  "
          "batch 1")
    none = results[0]["peak_bytes"]
    for r in results:
        print(f"recompute {str(r['recompute']):9s}  peak +{r['peak_bytes'] / mib:8.1f} MiB  "
              f"ratio to none {r['peak_bytes'] / none:.3f}  loss {r['loss']:.7f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
