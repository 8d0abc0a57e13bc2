"""The stages as NeMo-Run entry points: ``nemo minitron prune config=llama31_8b_width_4b config.dtype=bfloat16``.

setup.py registers this module in the ``nemo_run.cli`` entry-point group, which NeMo-Run's ``nemo`` command
loads. It needs the optional ``nemo-run`` extra, so nothing else in the package imports it.

Each entry point takes its stage's strict config; the factories are recipes made from the shipped YAMLs in
``conf/`` (a checkout, or the image's /opt/nemo_minitron), named after them. A run goes through the same
validation and rank handling as the ``nemo-minitron`` CLI: under NeMo-Run's torchrun or Slurm executors the
ranks come from ``RANK`` / ``WORLD_SIZE``; run directly, the stage starts TP x PP local ranks itself.
"""

# No `from __future__ import annotations`: NeMo-Run reads the factories' return annotations as objects.
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import nemo_run as run
from nemo_run.cli.cli_parser import type_parser

from nemo_minitron.config import StrictModel, load_config
from nemo_minitron.distill.config import DistillConfig
from nemo_minitron.errors import UserError
from nemo_minitron.evaluation.config import EvalConfig
from nemo_minitron.prune import PruneConfig
from nemo_minitron.stages import print_result, run_stage

NAMESPACE = "minitron"
CONF = Path(__file__).resolve().parents[2] / "conf"


# Two gaps between NeMo-Run's CLI parser and pydantic models, closed for `config.KEY=VALUE` overrides; either way
# pydantic validates the value when NeMo-Run builds the config.
# 1. Field constraints (Field(ge=1)) appear in the model's signature as Annotated[...], which the parser has no
#    rule for: parse the inner type.
@type_parser.register_parser(Annotated)
def _parse_annotated(value: str, annotation: Any) -> Any:
    return type_parser.parse(value, get_args(annotation)[0])


# 2. The parser takes a class whose signature has two parameters for (*args, **kwargs) and reads its __init__
#    instead: for a two-field model (ParallelConfig) that is BaseModel.__init__(**data: "Any"), annotated with
#    the string, as pydantic's own module postpones its annotations. Infer the type from the value.
@type_parser.register_parser("Any")
def _parse_any(value: str, annotation: Any) -> Any:
    return type_parser.parse(value, type_parser.infer_type(value))


def _as_run_config(value: Any) -> Any:
    """A validated config as nested ``run.Config``s of the explicitly set fields (defaults stay defaults)."""
    if isinstance(value, StrictModel):
        fields = {name: _as_run_config(getattr(value, name)) for name in value.model_fields_set}
        return run.Config(type(value), **fields)
    if isinstance(value, list):
        return [_as_run_config(item) for item in value]
    return value


def _recipe(cls: type[StrictModel], name: str) -> run.Config:
    try:
        return _as_run_config(load_config(cls, CONF / name))
    except UserError as exc:
        raise ValueError(f"recipe conf/{name}: {exc}") from None


def _run(stage: str, config: StrictModel) -> None:
    # As the CLI does: a problem the user can fix is one line and exit status 2, not a traceback.
    try:
        print_result(run_stage(stage, config))
    except UserError as exc:
        print(f"nemo minitron {stage}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@run.cli.entrypoint(namespace=NAMESPACE, help="importance + width/depth pruning")
def prune(config: PruneConfig) -> None:
    _run("prune", config)


@run.cli.entrypoint(namespace=NAMESPACE, help="knowledge distillation (or CE training)")
def distill(config: DistillConfig) -> None:
    _run("distill", config)


# Named after the stage (`nemo minitron eval`); it shadows the builtin in this module only, which never uses it.
@run.cli.entrypoint(namespace=NAMESPACE, help="held-out loss and perplexity")
def eval(config: EvalConfig) -> None:  # noqa: A001
    _run("eval", config)


@run.cli.factory(name="smollm2_width_55")
def smollm2_width_55_prune() -> run.Config[PruneConfig]:
    """The embedded teacher (SmolLM2-135M) pruned to ~55% of its parameters."""
    return _recipe(PruneConfig, "prune/smollm2_width_55.yaml")


@run.cli.factory
def llama31_8b_width_4b() -> run.Config[PruneConfig]:
    """Llama-3.1-8B -> Minitron-4B-Width: hidden 3072, MLP 9216, TP 8."""
    return _recipe(PruneConfig, "prune/llama31_8b_width_4b.yaml")


@run.cli.factory
def llama31_8b_depth_4b() -> run.Config[PruneConfig]:
    """Llama-3.1-8B -> Minitron-4B-Depth: layers 16-31 dropped, TP 8."""
    return _recipe(PruneConfig, "prune/llama31_8b_depth_4b.yaml")


@run.cli.factory(name="smollm2_width_55")
def smollm2_width_55_distill() -> run.Config[DistillConfig]:
    """Logit KD of the ~55% SmolLM2 student from the embedded teacher."""
    return _recipe(DistillConfig, "distill/smollm2_width_55.yaml")


@run.cli.factory
def smollm2_teacher_correction() -> run.Config[DistillConfig]:
    """LM-loss fine-tuning of the teacher on the distillation corpus (no teacher)."""
    return _recipe(DistillConfig, "distill/smollm2_teacher_correction.yaml")


@run.cli.factory
def llama31_8b_to_4b_width() -> run.Config[DistillConfig]:
    """Minitron-4B-Width distillation from the corrected Llama-3.1-8B (94B tokens, TP 8)."""
    return _recipe(DistillConfig, "distill/llama31_8b_to_4b_width.yaml")


@run.cli.factory
def llama31_8b_to_4b_depth() -> run.Config[DistillConfig]:
    """Minitron-4B-Depth distillation from the corrected Llama-3.1-8B (TP 8)."""
    return _recipe(DistillConfig, "distill/llama31_8b_to_4b_depth.yaml")


@run.cli.factory
def teacher() -> run.Config[EvalConfig]:
    """Held-out perplexity of the embedded teacher on the Shakespeare valid split."""
    return _recipe(EvalConfig, "eval/teacher.yaml")
