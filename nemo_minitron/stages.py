"""The stage registry: every stage's name, strict config class, entry function and checks, and how a stage runs.

Entries name their code as ``"module:attribute"`` and are imported only when used, so that the registry sits
below everything it lists: the pipeline, the bench and the launchers run other stages through
:func:`run_stage` without an import circle, and ``nemo-minitron --help`` imports no torch.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Optional

from nemo_minitron.config import StrictModel
from nemo_minitron.errors import UserError, storage_error


def _resolve(ref: str) -> Any:
    # Only the table's own constants: no config or file can name code to import.
    if ref not in _REFS:
        raise ValueError(f"not a reference of the stage table: {ref!r}")
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Stage:
    help: str
    config: str  # "module:Class" of the stage's root config
    entry: str  # "module:function" taking the validated config
    validate: Optional[str] = None  # "module:function": every check that needs no compute
    # A driver runs in the calling process and starts the ranks of its own stages (``run``, ``bench``).
    driver: bool = False
    # Runs on the ranks a launcher (torchrun, Slurm) started. ``run`` does, its stages sharing out the work
    # between the ranks; ``bench`` starts the ranks of its stages itself, on one machine.
    launchable: bool = True
    # "module:function" reading the command line's arguments after the stage name into its config, for stages
    # whose arguments are another stage's config and more (``launch``, ``plan``); None: CONFIG.yaml key=value.
    parser: Optional[str] = None

    def config_class(self) -> type[StrictModel]:
        return _resolve(self.config)

    def entry_function(self) -> Callable[[Any], Any]:
        return _resolve(self.entry)

    def parse(self, args: list[str]) -> StrictModel:
        return _resolve(self.parser)(args)

    def check(self, cfg: StrictModel) -> None:
        if self.validate is not None:
            _resolve(self.validate)(cfg)


STAGES: dict[str, Stage] = {
    "prepare-data": Stage("tokenize text into train/valid indexed datasets",
                          "nemo_minitron.data.config:PrepareDataConfig", "nemo_minitron.data.prepare:prepare_data"),
    "import-hf": Stage("HF model -> nemo_minitron checkpoint", "nemo_minitron.checkpoint.config:ConvertConfig",
                       "nemo_minitron.convert:import_hf", "nemo_minitron.convert:validate"),
    "export-hf": Stage("checkpoint -> HF directory", "nemo_minitron.checkpoint.config:ConvertConfig",
                       "nemo_minitron.convert:export_hf_dir", "nemo_minitron.convert:validate_export"),
    "export": Stage("checkpoint -> HF directory or GGUF file", "nemo_minitron.checkpoint.config:ExportConfig",
                    "nemo_minitron.convert:export", "nemo_minitron.convert:validate_export_any"),
    "generate": Stage("a model's sampled answers to prompts, chat-rendered, as a prepared dataset to blend",
                      "nemo_minitron.chat.config:GenerateConfig", "nemo_minitron.chat.generate:generate",
                      "nemo_minitron.chat.generate:validate"),
    "eval": Stage("held-out loss and perplexity", "nemo_minitron.evaluation.config:EvalConfig",
                  "nemo_minitron.evaluation.stage:evaluate", "nemo_minitron.evaluation.stage:validate"),
    "prune": Stage("importance + width/depth pruning", "nemo_minitron.prune.config:PruneConfig",
                   "nemo_minitron.prune.stage:run_prune", "nemo_minitron.prune.stage:validate"),
    "distill": Stage("knowledge distillation (or CE training)", "nemo_minitron.distill.config:DistillConfig",
                     "nemo_minitron.distill.trainer:run_distill", "nemo_minitron.distill.trainer:validate"),
    "cache-logits": Stage("the teacher's top-k log-probabilities on the windows a distillation reads",
                          "nemo_minitron.distill.config:CacheLogitsConfig",
                          "nemo_minitron.distill.cache:run_cache_logits",
                          "nemo_minitron.distill.cache:validate_cache_logits"),
    "nas": Stage("architecture search within a parameter budget", "nemo_minitron.pipeline.config:NASStageConfig",
                 "nemo_minitron.pipeline.nas:run_nas", "nemo_minitron.pipeline.nas:validate"),
    "generation-speed": Stage("greedy generation tokens/s of a teacher and a student (HF)",
                              "nemo_minitron.evaluation.config:GenerationConfig",
                              "nemo_minitron.evaluation.generation:generation_speed"),
    "run": Stage("the whole pipeline: data, prune/NAS, distill, eval, export, report",
                 "nemo_minitron.pipeline.config:RunConfig", "nemo_minitron.pipeline.run:run_pipeline",
                 "nemo_minitron.pipeline.run:validate", driver=True),
    "bench": Stage("recovery, baselines, peers, the paper's claims and speed, in one report (--quick: short budgets)",
                   "nemo_minitron.bench.config:BenchConfig", "nemo_minitron.bench.run:run_bench",
                   "nemo_minitron.bench.run:validate", driver=True, launchable=False),
    "launch": Stage("submit a stage to Slurm (launch slurm JOB.yaml cluster=...)",
                    "nemo_minitron.launch.slurm:SlurmLaunch", "nemo_minitron.launch.slurm:launch_slurm",
                    # Before anything is written: a job that does not fit the cluster's GPUs stops here.
                    "nemo_minitron.plan.stage:check_launch", parser="nemo_minitron.launch.slurm:parse_cli"),
    "plan": Stage("per-GPU memory, speed and wall time of a job's stages on a cluster (plan JOB.yaml cluster=...)",
                  "nemo_minitron.plan.config:PlanConfig", "nemo_minitron.plan.stage:plan_stage",
                  parser="nemo_minitron.plan.stage:parse_cli"),
}


_REFS = frozenset(ref for stage in STAGES.values()
                  for ref in (stage.config, stage.entry, stage.validate, stage.parser) if ref)


def quiet_libraries() -> None:
    """Silence what megatron-core and transformers print at import: none of it is actionable."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    # Spawned ranks import megatron before any code of ours runs in them: they inherit this instead.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _on_rank(stage_name: str, cfg: StrictModel) -> tuple[str, Any]:
    """Body of one spawned rank: the stage's result, or its one-line user error."""
    quiet_libraries()
    try:
        return "ok", STAGES[stage_name].entry_function()(cfg)
    except UserError as exc:
        return "error", str(exc)
    except OSError as exc:
        if (error := storage_error(exc)) is None:
            raise
        return "error", str(error)


def run_stage(stage_name: str, cfg: StrictModel) -> Any:
    """Check ``cfg`` (once, here), then run the stage on as many local ranks as its parallel sizes need
    (one when a launcher such as torchrun or Slurm already started the ranks)."""
    stage = STAGES[stage_name]
    stage.check(cfg)
    parallel = getattr(cfg, "parallel", None)
    ranks = parallel.model_parallel_size if parallel is not None and not stage.driver else 1
    if ranks == 1 or "RANK" in os.environ:
        try:
            return stage.entry_function()(cfg)
        finally:
            # A stage's models, optimizer and process groups sit in reference cycles, which Python frees only at
            # its next full collection: free them now, before a later stage of the same process (a `run` or
            # `bench` runs dozens) loads its own beside them.
            gc.collect()
    from nemo_minitron.parallel.state import spawn  # torch.distributed: only when ranks are spawned

    outcomes = spawn(_on_rank, ranks, stage_name, cfg)
    for status, value in outcomes:
        if status == "error":
            raise UserError(value)
    return outcomes[0][1]


def print_result(result: Any) -> None:
    """A stage's result as JSON on stdout (nothing for None)."""
    if result is None:
        return
    if is_dataclass(result):
        result = asdict(result)
    print(json.dumps(result, indent=2, default=str))
