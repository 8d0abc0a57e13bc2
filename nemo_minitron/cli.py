"""``nemo-minitron <stage> [CONFIG.yaml] [key=value ...]``

Each stage validates its strict config first (a problem is one line on stderr and exit status 2), then
runs. Stages that need several ranks (TP x PP > 1) start them on this machine unless launched by
torchrun / Slurm, which set ``RANK`` and ``WORLD_SIZE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Optional, Sequence

from nemo_minitron.config import StrictModel, load_config
from nemo_minitron.errors import StoppedEarly, UserError, storage_error


@dataclass(frozen=True)
class Stage:
    config: type[StrictModel]
    run: Callable[[Any], Any]
    help: str
    validate: Optional[Callable[[Any], None]] = None
    # A driver runs in the calling process and starts the ranks of its own stages (``run``).
    driver: bool = False


def _stages() -> dict[str, Stage]:
    from nemo_minitron import convert
    from nemo_minitron.bench import config as bench_config, run as bench
    from nemo_minitron.data import PrepareDataConfig, prepare_data
    from nemo_minitron import eval as evaluation
    from nemo_minitron import prune
    from nemo_minitron.distill import trainer
    from nemo_minitron.launch import slurm
    from nemo_minitron.pipeline import config as pipeline, nas, report, run

    return {
        "prepare-data": Stage(PrepareDataConfig, prepare_data, "tokenize text into train/valid indexed datasets"),
        "import-hf": Stage(convert.ConvertConfig, convert.import_hf, "HF model -> nemo_minitron checkpoint", convert.validate),
        "export-hf": Stage(convert.ConvertConfig, convert.export_hf_dir, "checkpoint -> HF directory", convert.validate_export),
        "export": Stage(convert.ExportConfig, convert.export, "checkpoint -> HF directory or GGUF file", convert.validate_export_any),
        "eval": Stage(evaluation.EvalConfig, evaluation.evaluate, "held-out loss and perplexity", evaluation.validate),
        "prune": Stage(prune.PruneConfig, prune.run_prune, "importance + width/depth pruning", prune.stage.validate),
        "distill": Stage(trainer.DistillConfig, trainer.run_distill, "knowledge distillation (or CE training)", trainer.validate),
        "nas": Stage(nas.NASStageConfig, nas.run_nas, "architecture search within a parameter budget", nas.validate),
        "generation-speed": Stage(report.GenerationConfig, report.generation_speed,
                                  "greedy generation tokens/s of a teacher and a student (HF)"),
        "run": Stage(pipeline.RunConfig, run.run_pipeline,
                     "the whole pipeline: data, prune/NAS, distill, eval, export, report", run.validate, driver=True),
        "bench": Stage(bench_config.BenchConfig, bench.run_bench,
                       "recovery, baselines, peers, the paper's claims and speed, in one report (--quick: short "
                       "budgets)", bench.validate, driver=True),
        "launch": Stage(slurm.SlurmLaunch, slurm.launch_slurm, "submit a stage to Slurm (launch slurm JOB.yaml cluster=...)"),
    }


def _quiet() -> None:
    # megatron-core warns about missing apex/TE and deprecated defaults at import; none of it is actionable.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    # Spawned ranks import megatron before any code of ours runs in them: they inherit this instead.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _on_rank(stage_name: str, cfg: StrictModel) -> tuple[str, Any]:
    """Body of one spawned rank: the stage's result, or its one-line user error."""
    _quiet()
    try:
        return "ok", _stages()[stage_name].run(cfg)
    except UserError as exc:
        return "error", str(exc)
    except OSError as exc:
        if (error := storage_error(exc)) is None:
            raise
        return "error", str(error)


def run_stage(stage_name: str, cfg: StrictModel) -> Any:
    """Run a validated stage config, on as many local ranks as its parallel sizes need."""
    stage = _stages()[stage_name]
    if stage.validate is not None:
        stage.validate(cfg)
    parallel = getattr(cfg, "parallel", None)
    ranks = parallel.model_parallel_size if parallel is not None and not stage.driver else 1
    if ranks == 1 or "RANK" in os.environ:
        return stage.run(cfg)
    from nemo_minitron.parallel.state import spawn

    outcomes = spawn(_on_rank, ranks, stage_name, cfg)
    for status, value in outcomes:
        if status == "error":
            raise UserError(value)
    return outcomes[0][1]


def _print_result(result: Any) -> None:
    if result is None:
        return
    if is_dataclass(result):
        result = asdict(result)
    print(json.dumps(result, indent=2, default=str))


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet()
    stages = _stages()
    parser = argparse.ArgumentParser(
        prog="nemo-minitron",
        description="Minitron pruning and distillation on megatron-core.",
        epilog="stages:\n" + "\n".join(f"  {n:<14}{s.help}" for n, s in stages.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=sorted(stages), metavar="STAGE")
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    parser.add_argument("--quick", action="store_true", help="bench only: the config's quick_budgets")
    ns = parser.parse_intermixed_args(argv)
    if ns.quick and ns.stage != "bench":
        print(f"nemo-minitron {ns.stage}: error: --quick is an option of the bench stage", file=sys.stderr)
        return 2
    config_path = None
    overrides = list(ns.args) + (["quick=true"] if ns.quick else [])
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    try:
        if ns.stage == "launch":
            # `launch slurm JOB.yaml key=value ...`: a launcher, then another stage's config and overrides.
            from nemo_minitron.launch.slurm import parse_cli

            cfg = parse_cli(ns.args)
        else:
            cfg = load_config(stages[ns.stage].config, config_path, overrides)
        result = run_stage(ns.stage, cfg)
    except StoppedEarly as exc:
        print(f"nemo-minitron {ns.stage}: {exc}", file=sys.stderr)
        _print_result({"stopped_early": True})
        return 0
    except UserError as exc:
        print(f"nemo-minitron {ns.stage}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk or an unwritable file system met while writing outside the stages' own checks.
        if (error := storage_error(exc)) is None:
            raise
        print(f"nemo-minitron {ns.stage}: error: {error}", file=sys.stderr)
        return 2
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
