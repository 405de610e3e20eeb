"""Settings of the training loop (recipe blocks of every training stage, and `training:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class OptimConfig(BaseModel):
    """Optimisation of one training stage: AdamW + warm-up + cosine/poly decay."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="global batch size (split across DDP ranks)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    poly_power: float = Field(1.0, gt=0, description="poly: lr factor (1 - progress) ** power (mmseg PolyLR)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null = off")
    accumulate: int = Field(1, gt=0, description="gradient accumulation micro-steps per optimizer step")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay for ViT blocks")
    repeated_augmentation: int = Field(
        1,
        ge=1,
        description="repeats of each sample per epoch, each differently augmented (timm's RepeatAugSampler: the "
        "epoch keeps floor(N / 256) * 256 draws); 1 = off",
    )
    checkpoint_every: int = Field(100, gt=0, description="steps between resumable checkpoints")
    log_every: int = Field(10, gt=0)
    validate_every: int | None = Field(
        None,
        gt=0,
        description="supervised stages: mIoU on every domain each N steps and at the last, appended to "
        "logs/<stage>_validation.jsonl (monitoring: the last checkpoint is the model; train-head also keeps the "
        "best, on mean target mIoU, as the GKD code does every 4000 iterations); null = off",
    )


class TrainingConfig(BaseModel):
    """Settings shared by every training stage."""

    model_config = ConfigDict(extra="forbid")

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="data-loading worker processes per rank; auto = 0 on CPU (training uses every core), on GPU the "
        "CPUs this process may use split over the ranks of this node, one left to the training process, at most 16",
    )

    @field_validator("num_workers")
    @classmethod
    def _non_negative(cls, workers: int | str) -> int | str:
        if isinstance(workers, int) and workers < 0:
            raise ValueError(f"num_workers must be >= 0 or 'auto', got {workers}")
        return workers


class TeacherCacheConfig(BaseModel):
    """``distill.teacher_cache``: the teacher run once over ``views`` augmented views of each image, its outputs
    stored (`gkd.compress.teacher_cache`) and read by every distillation step instead of a teacher pass."""

    model_config = ConfigDict(extra="forbid")

    views: int = Field(4, ge=1, description="K: augmented views per image; training samples among them")
    dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="dtype the teacher's outputs are stored in")
    batch_size: int = Field(32, gt=0, description="views per teacher pass while the cache is built")
    views_per_shard: int = Field(256, gt=0, description="views per shard file")
