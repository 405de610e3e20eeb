"""The recipe's ``compare:`` section: the report's reference rows and the methods ``gkd-compress compare``
runs against each other (`gkd.compare`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gkd.compress.config import OptimConfig
from gkd.rundir import JobKind


class MethodConfig(BaseModel):
    """One row of ``gkd-compress compare``: this recipe with ``overrides`` deep-merged in, once per seed."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="the row's name in tables and plots")
    student: JobKind = Field(
        JobKind.DISTILLED,
        description="distilled: distill (+ head) stages; no_kd: the student fine-tuned end to end (compare.no_kd); "
        "frozen: the student's own encoder frozen + the head schedule (the authors' no-KD row); ceiling: the "
        "teacher's frozen encoder + the head schedule (what perfect distillation reaches)",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict, description="recipe keys to change (teacher excluded)")

    @field_validator("student")
    @classmethod
    def _not_the_teacher(cls, kind: JobKind) -> JobKind:
        if kind is JobKind.TEACHER:
            raise ValueError("the teacher is the comparison's own job, not a method")
        return kind


class BudgetCurveConfig(BaseModel):
    """Methods that differ only in their stage-1 budget, each set against a baseline seed by seed."""

    model_config = ConfigDict(extra="forbid")

    baseline: str = Field(description="the method every budget is compared with (e.g. the frozen no-KD row)")
    methods: list[str] = Field(min_length=2, description="the budgets' methods; x = their stage-1 steps")


class CompareConfig(BaseModel):
    """Reference rows of the report, and the methods ``gkd-compress compare`` runs against each other."""

    model_config = ConfigDict(extra="forbid")

    no_kd: OptimConfig | None = Field(None, description="student fine-tuned on source without distillation")
    methods: dict[str, MethodConfig] = Field(default_factory=dict, description="compare: rows by name")
    reference_domain: str = Field("source", description="compare: the in-domain column drops are measured from")
    figure_domain: str | None = Field(None, description="compare: domain of the example frames (default: 1st target)")
    figure_methods: list[str] = Field(default_factory=list, description="compare: methods shown in the frames figure")
    budget_curve: BudgetCurveConfig | None = Field(None, description="compare: Δ mIoU against stage-1 steps")
    paired_with: str | None = Field(
        "gkd",
        description="compare: the method set against every other row seed by seed (mean difference and seeds won, "
        "in comparison.md); null or a method not compared = no paired table",
    )
