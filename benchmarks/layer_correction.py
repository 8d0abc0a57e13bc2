"""Does the map that replaces removed layers help, before and after distillation? Measured on a teacher.

    .venv/bin/python benchmarks/layer_correction.py conf/prune/smollm2_width_55.yaml --eval conf/eval/teacher.yaml \\
        --layers 28 26 [--kd conf/distill/smollm2_width_55.yaml --kd-tokens 32768] \\
        [--workdir runs/bench/layer_correction] [key=value ...]

``correction: lsq`` replaces each run of removed layers by a linear map merged into the ``linear_fc2`` before it
(ReplaceMe; :mod:`nemo_minitron.prune.layer_map`). For each ``--layers`` N (one rank, TP = PP = 1), the prune
config's teacher, calibration set and depth criterion (``importance.depth``) choose the layers to drop, and the
teacher is cut to N layers twice from one scoring pass: with ``correction`` none and lsq (damping
``correction_damping``; a depth-only cut removes no unit that a width re-fit would see, so lsq adds the maps
alone). The held-out losses of both are printed side by side. With ``--kd``, both students are also distilled
from the teacher for ``--kd-tokens`` with that distill config, then evaluated again. Everything goes to
``<workdir>/result.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from nemo_minitron.checkpoint.io import load_model, resolve_model_dir, save_checkpoint
from nemo_minitron.config import load_config
from nemo_minitron.distill.config import DistillConfig
from nemo_minitron.distill.trainer import run_distill
from nemo_minitron.dtypes import torch_dtype
from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.config import EvalConfig
from nemo_minitron.evaluation.loss import windows_loss_sums
from nemo_minitron.evaluation.stage import eval_tokens, evaluate
from nemo_minitron.parallel import state
from nemo_minitron.prune.config import PruneConfig, PruneTarget
from nemo_minitron.prune.stage import calibration_batches, cut, resolved_dtype, score, validate


def measure(cfg: PruneConfig, eval_cfg: EvalConfig, layer_counts: list[int], workdir: Path,
            kd_cfg: Path | None, kd_tokens: int) -> dict:
    validate(cfg)
    state.initialize(cfg.parallel, cfg.seed)
    dtype = torch_dtype(resolved_dtype(cfg.dtype, cfg.model))
    teacher = load_model(cfg.model, dtype=dtype, use_te=False)
    if any(not 0 < n < teacher.cfg.num_layers for n in layer_counts):
        raise UserError(f"--layers: each count must be between 1 and {teacher.cfg.num_layers - 1}")
    batches = calibration_batches(cfg.calibration)
    windows = eval_tokens(eval_cfg, resolve_model_dir(cfg.model))
    scored = score(teacher, batches, cfg.importance, grams=True)
    rows = []
    for n in layer_counts:
        target = PruneTarget(num_layers=n)
        plain, report = cut(teacher, scored, target, calibration_loss=False)
        mapped, mapped_report = cut(teacher, scored, target, calibration_loss=False, correction="lsq",
                                    damping=cfg.correction_damping)
        row = {"num_layers": n, "dropped_layers": report["dropped_layers"],
               "mapped_layers": mapped_report["layer_maps"], "params": report["target_params"]}
        for name, student in (("none", plain), ("lsq", mapped)):
            total, count = windows_loss_sums(student.model, student.cfg.vocab_size, windows, eval_cfg.micro_batch_size)
            row[f"pruned_{name}"] = total / count
            if kd_cfg is not None:
                path = workdir / f"layers{n}" / name
                save_checkpoint(student, path / "pruned", overwrite=True)
                distilled = run_distill(load_config(DistillConfig, str(kd_cfg), [
                    f"student={path / 'pruned'}", f"teacher={cfg.model}", f"output={path / 'distill'}",
                    f"train.max_tokens={kd_tokens}", "checkpoint.resume=false"]))
                row[f"distilled_{name}"] = evaluate(eval_cfg.model_copy(
                    update={"model": distilled["final"], "output": None})).loss
        row["gain_pruned"] = row["pruned_none"] - row["pruned_lsq"]
        if kd_cfg is not None:
            row["gain_distilled"] = row["distilled_none"] - row["distilled_lsq"]
        print(f"layers {n}: removed {row['dropped_layers']}; held-out loss after pruning none {row['pruned_none']:.4f} "
              f"lsq {row['pruned_lsq']:.4f}"
              + (f"; after {kd_tokens} KD tokens none {row['distilled_none']:.4f} "
                 f"lsq {row['distilled_lsq']:.4f}" if kd_cfg is not None else ""), file=sys.stderr)
        rows.append(row)
        del plain, mapped, student
        gc.collect()  # two students and their distillations per count: free them before the next
    return {"teacher": cfg.model, "depth_criterion": cfg.importance.depth, "damping": cfg.correction_damping,
            "calibration_tokens": sum(b[:, :-1].numel() for b in batches), "eval_windows": len(windows),
            "kd_tokens": kd_tokens if kd_cfg is not None else 0, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prune_config", help="a prune config (conf/prune/*.yaml): teacher, calibration, importance")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the prune config")
    parser.add_argument("--eval", required=True, metavar="EVAL_CONFIG", help="an eval config for the held-out loss")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="layer counts to prune to")
    parser.add_argument("--kd", metavar="DISTILL_CONFIG", help="also distil both students with this config")
    parser.add_argument("--kd-tokens", type=int, default=32768, help="distillation tokens per student")
    parser.add_argument("--workdir", default="runs/bench/layer_correction", help="students and result.json")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    try:
        cfg = load_config(PruneConfig, args.prune_config, args.overrides)
        eval_cfg = load_config(EvalConfig, args.eval)
        if args.kd is not None and not Path(args.kd).is_file():
            raise UserError(f"--kd {args.kd}: no such config")
        if args.kd_tokens < 1:
            raise UserError(f"--kd-tokens must be positive, not {args.kd_tokens}")
        result = measure(cfg, eval_cfg, args.layers, workdir, Path(args.kd) if args.kd else None, args.kd_tokens)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        state.destroy()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
