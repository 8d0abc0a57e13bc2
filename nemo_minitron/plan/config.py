"""The ``plan`` stage's config: a job (another stage's validated config), the cluster it is for, and what the
plan assumes (plain data: no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nemo_minitron.config import StrictModel
from nemo_minitron.launch.slurm import ClusterConfig
from nemo_minitron.plan.settings import PlanSettings

# The stages a plan covers.
Planned = Literal["run", "distill", "prune", "eval"]


class PlanConfig(StrictModel):
    """``nemo-minitron plan JOB.yaml cluster=CLUSTER.yaml [stage=NAME] [plan.KEY=VALUE ...] [key=value ...]``."""

    stage: Planned
    job: StrictModel = Field(description="the stage's validated config")
    cluster: ClusterConfig
    plan: PlanSettings = PlanSettings()
