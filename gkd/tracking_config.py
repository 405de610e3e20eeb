"""The recipe's ``logging:`` section: the experiment trackers a run also reports to (`gkd.tracking`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MlflowConfig(BaseModel):
    """An MLflow tracking store (no server needed)."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(
        None,
        description="e.g. sqlite:///runs/mlflow.db; a plain directory (or file: URI) means DIR/mlflow.db in it; "
        "null: MLFLOW_TRACKING_URI, else mlflow.db in the command's output directory",
    )
    experiment: str | None = Field(None, description="experiment name; default: the recipe's name")
    artifact_location: str | None = Field(
        None, description="where a new experiment keeps artifacts; default: mlartifacts/ beside a sqlite file"
    )


class WandbConfig(BaseModel):
    """A Weights & Biases run; offline by default (``wandb sync`` uploads it later)."""

    model_config = ConfigDict(extra="forbid")

    project: str | None = Field(None, description="default: the recipe's name")
    mode: Literal["offline", "online", "disabled"] = "offline"
    dir: str | None = Field(None, description="where wandb/ is written; default: the command's output directory")
    entity: str | None = None


class LoggingConfig(BaseModel):
    """Experiment trackers a run also reports to (`gkd.tracking`); none by default. Never part of a stage's
    record: changing a tracker reruns nothing."""

    model_config = ConfigDict(extra="forbid")

    mlflow: MlflowConfig | None = None
    wandb: WandbConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.wandb is not None
