"""The ``bench`` job: what is measured, and with how many tokens (a full and a ``--quick`` set of budgets)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from nemo_minitron.config import StrictModel
from nemo_minitron.dtypes import Dtype
from nemo_minitron.parallel.config import ParallelConfig
from nemo_minitron.pipeline.config import NASConfig, RunCalibration, RunData, RunDistill, RunEval
from nemo_minitron.prune.config import IMPORTANCE_DTYPE, Agg, ImportanceConfig, PruneTarget


class Budgets(StrictModel):
    """Token and sample counts of one bench mode."""

    recovery_tokens: int = Field(gt=0, description="distillation tokens of the recovery run")
    compare_tokens: int = Field(gt=0, description="training tokens of every arm compared side by side")
    scratch_tokens: int = Field(gt=0, description="tokens of the from-scratch run (a multiple of compare_tokens "
                                                  "bounds how much more it needs)")
    correction_tokens: int = Field(gt=0, description="teacher correction tokens (CE on the corpus)")
    nas_short_kd_tokens: Optional[int] = Field(None, ge=0, description="the full method's search: distillation "
                                                                      "tokens of each short-listed shape (None: "
                                                                      "nas.short_kd_tokens)")
    nas_max_candidates: Optional[int] = Field(None, gt=0, description="the full method's search: candidates ranked "
                                                                     "after pruning, the largest first (None: "
                                                                     "nas.max_candidates)")
    nas_top_k: Optional[int] = Field(None, gt=0, description="the full method's search: short-listed shapes "
                                                            "distilled (None: nas.top_k)")
    generated_prompts: Optional[int] = Field(None, ge=2, description="data.generated: answers to this many prompts, "
                                                                    "the first ones (None: data.generated."
                                                                    "max_prompts)")
    generated_max_new_tokens: Optional[int] = Field(None, ge=1, description="data.generated: tokens per answer at "
                                                                           "most (None: data.generated.sampling."
                                                                           "max_new_tokens)")
    calibration_samples: int = Field(gt=0)
    seq_length: Optional[int] = Field(None, ge=2, description="sequence length of calibration, training and the "
                                                              "held-out windows (None: calibration.seq_length, "
                                                              "distill.train.seq_length and eval.seq_length)")
    eval_windows: int = Field(gt=0, description="held-out windows of eval.seq_length behind every loss")
    recovery_eval_every_steps: Optional[int] = Field(
        None, gt=0, description="the recovery_tokens distillations' held-out loss curve: a point every this "
                                "many steps (None: distill.eval.every_steps)")
    speed_steps: int = Field(gt=0, description="timed steps of the speed benchmarks")
    speed_seq: int = Field(ge=2, description="sequence length of the speed benchmarks")
    kl_tokens: int = Field(gt=0, description="tokens of the KL peak-memory benchmark")
    kl_vocab: int = Field(gt=0, description="vocabulary of the KL peak-memory benchmark")


class Peers(StrictModel):
    modelopt: bool = Field(True, description="NVIDIA ModelOpt's Minitron pruning as a peer "
                                             "(needs `make install-modelopt`)")


class BenchConfig(StrictModel):
    """Every arm starts from ``teacher`` and ends at ``target`` (or, for depth, at the layer count whose
    parameter count is nearest to it); losses are on the held-out split, which no arm trains or calibrates on."""

    output: str = Field(min_length=1, description="bench directory (--quick writes to <output>-quick)")
    teacher: str = Field(min_length=1)
    data: RunData
    target: PruneTarget = Field(description="the width target of every width arm")
    iterative_steps: list[PruneTarget] = Field(
        min_length=1, description="intermediate width targets of the iterative-importance arm (then target)")
    aggregations: list[tuple[Agg, Agg]] = Field(
        min_length=1, description="(seq_agg, batch_agg) pairs compared after pruning")
    importance: ImportanceConfig = ImportanceConfig()
    calibration: RunCalibration = RunCalibration()
    distill: RunDistill = RunDistill()
    eval: RunEval = RunEval()
    budgets: Budgets
    quick_budgets: Budgets
    quick: bool = Field(False, description="use quick_budgets (the CLI's --quick)")
    peers: Peers = Peers()
    correction_damping: float = Field(0.01, gt=0, description="ridge strength of the arms with lsq weight "
                                                              "correction (the prune stage's correction_damping)")
    nas: Optional[NASConfig] = Field(
        None, description="the full method's arm: the shape that this search finds within "
                          "[target params x (1 - nas.tolerance), target params], lsq-corrected, then the same "
                          "distillation as every arm (None: no such arm)")
    speed: bool = Field(True, description="run the speed benchmarks of benchmarks/")
    prune_dtype: Optional[Dtype] = Field(None, description=IMPORTANCE_DTYPE)
    rerun_from: Optional[str] = Field(None, description="redo this stage and every later one")
    parallel: ParallelConfig = ParallelConfig()
    seed: int = 1234

    @model_validator(mode="after")
    def _checks(self) -> "BenchConfig":
        if self.parallel.model_parallel_size != 1:
            raise ValueError("parallel: the bench compares arms at TP = PP = 1 (the speed part times TP = 2)")
        if (self.importance.seq_agg, self.importance.batch_agg) not in {tuple(a) for a in self.aggregations}:
            raise ValueError(f"aggregations: include importance's own ({self.importance.seq_agg}, "
                             f"{self.importance.batch_agg})")
        return self

    @property
    def active(self) -> Budgets:
        return self.quick_budgets if self.quick else self.budgets

    @property
    def out_dir(self) -> str:
        return f"{self.output}-quick" if self.quick else self.output
