"""NAS wall time with and without a teacher logit cache (``distill.teacher_cache: auto``), in one run.

    .venv/bin/python benchmarks/nas_cache.py [--config conf/nas/smollm2_55.yaml] [--short-kd-tokens 2048]

The search of ``--config`` (the shipped one by default: the embedded teacher, its prepared Shakespeare data),
scaled down by the arguments (candidates, short-listed ones, short distillation tokens, batch shape), runs twice
on the same inputs: online (the teacher beside each short-listed candidate) and with ``teacher_cache: auto``
(``cache-logits`` once over the windows of one short distillation, each candidate reading it). Prints each
arm's wall time (the whole ``nas`` stage: importance, ranking after pruning, the short distillations and the
ranking after them; the cached arm including writing its cache), the ratio, and each arm's winner and short-KD
losses. ``--order`` picks which arm runs first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from nemo_minitron import embedded
from nemo_minitron.config import load_config
from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.data.prepare import prepare_data
from nemo_minitron.pipeline.config import NASStageConfig
from nemo_minitron.stages import run_stage


def _arm(base: NASStageConfig, output: Path, cached: bool) -> tuple[float, dict]:
    raw = base.model_dump(mode="json")
    raw["output"] = str(output)
    raw["distill"]["teacher_cache"] = "auto" if cached else None
    cfg = NASStageConfig.model_validate(raw)
    start = time.perf_counter()
    summary = run_stage("nas", cfg)
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/nas/smollm2_55.yaml")
    parser.add_argument("--max-candidates", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=3, help="short-listed candidates")
    parser.add_argument("--short-kd-tokens", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="micro and global batch")
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--order", choices=["online-first", "cached-first"], default="online-first")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    base = load_config(NASStageConfig, args.config)
    if base.data == "runs/data/shakespeare-smollm2":
        prepare_data(PrepareDataConfig(input=embedded.CORPUS, tokenizer=embedded.TEACHER, output_dir=base.data))
    raw = base.model_dump(mode="json")
    raw["nas"].update(max_candidates=args.max_candidates, top_k=args.top_k, short_kd_tokens=args.short_kd_tokens,
                      eval_windows=args.eval_windows)
    raw["calibration"].update(num_samples=args.calibration_samples)
    raw["distill"]["train"].update(seq_length=args.seq, micro_batch_size=args.batch, global_batch_size=args.batch)
    raw["distill"]["log"] = {"progress": False, "tensorboard": False}
    raw["overwrite"] = True
    base = NASStageConfig.model_validate(raw)
    tmp = Path(tempfile.mkdtemp())
    arms = [False, True] if args.order == "online-first" else [True, False]
    results: dict[str, dict] = {}
    try:
        for cached in arms:
            name = "cached" if cached else "online"
            seconds, summary = _arm(base, tmp / name, cached)
            results[name] = {"seconds": seconds, "best": summary["best"],
                             "short_kd": {r["name"]: r["loss_short_kd"] for r in summary["candidates"]
                                          if "rank_short_kd" in r}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = base.distill.train
    print(f"NAS of {args.config}: {len(results['online']['short_kd'])} short-listed of at most "
          f"{args.max_candidates} candidates, {args.short_kd_tokens} short-KD tokens each, batch {t.global_batch_size}"
          f" x {t.seq_length}, {t.dtype} student, {t.teacher_dtype} teacher, cache top-64 bf16 ({args.order})")
    print("| arm | wall s | winner | short-KD held-out losses |\n|---|---|---|---|")
    for name, r in results.items():
        losses = ", ".join(f"{k} {v:.4f}" for k, v in r["short_kd"].items())
        print(f"| {name} | {r['seconds']:.1f} | {r['best']} | {losses} |")
    ratio = results["online"]["seconds"] / results["cached"]["seconds"]
    print(f"wall time online / cached: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
