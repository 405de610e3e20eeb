"""Recipe block `export:` (the benchmark's is `gkd.export.benchmark.BenchmarkConfig`). Defaults are quick on 2 CPU
cores (the embedded default run)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gkd.export.precisions import ParityConfig

# The precisions of the ONNX files and AOTInductor packages an export can write (their entries' precisions).
OnnxPrecision = Literal["fp32", "fp16", "int8"]
AOTIPrecision = Literal["fp32", "bf16", "fp16"]
CalibrationMethod = Literal["minmax", "percentile", "entropy"]


class Int8FallbackConfig(BaseModel):
    """Sensitivity fallback of the int8 ONNX graph (`gkd.export.quantize.quantize_with_fallback`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="keep the most sensitive nodes float until int8 parity holds")
    holdout_images: int = Field(
        32, ge=0, description="source images beyond the calibration set that the sensitivity is measured on"
    )
    max_float_nodes: int = Field(8, ge=1, description="most quantizable nodes the fallback may keep float")


class Int8Config(BaseModel):
    """``export.int8``: how ``model.int8.onnx`` is made: post-training quantization (``ptq``) or quantization-aware
    distillation (``qad``, `gkd.compress.qad`): the student fake-quantized as the PTQ graph quantizes it, fine-tuned
    on the self-distillation from its own fp32 copy (NVIDIA Model Optimizer's QAD term), optionally plus the stage-1
    distillation loss from the frozen teacher and the task loss, then quantized again with the PTQ calibration
    ranges (or the learned ones)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ptq", "qad"] = Field("ptq", description="ptq: calibrate and quantize; qad: fine-tune, then")
    steps: int = Field(200, gt=0, description="qad: optimizer steps of the fake-quantized student")
    batch_size: int = Field(8, gt=0, description="qad: labelled source images per step")
    lr: float = Field(1e-5, gt=0, description="qad: peak AdamW learning rate (cosine decay, no warm-up)")
    distill_weight: float = Field(
        0.0, ge=0, description="qad: weight of the stage-1 distillation loss (distill.loss) on the encoder tokens"
    )
    task_weight: float = Field(
        0.0, ge=0, description="qad: weight of the task cross-entropy on labelled images (raised the int8 error)"
    )
    self_distill_weight: float = Field(
        1.0,
        ge=0,
        description="qad: weight of the self-distillation: KL divergence of the fake-quantized student's per-pixel "
        "class softmax from the fp32 student's (a frozen copy taken before fake quantization)",
    )
    temperature: float = Field(1.0, gt=0, description="qad: softmax temperature of the self-distillation")
    learn_scales: bool = Field(
        False,
        description="qad: learn the activation scales too (LSQ-style, from the PTQ scales); the int8 graph is "
        "quantized with them (the same QDQ points and scheme)",
    )
    scale_rate: float = Field(
        1000.0, gt=0, description="qad: step size of the learned log-scales relative to the weights' (lr)"
    )


class ExportConfig(BaseModel):
    """What `export` writes: ONNX per precision, TensorRT engines, an AOTInductor package."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(
        18,
        ge=17,
        le=23,
        description="ONNX opset; >= 17 so LayerNorm is one LayerNormalization op (TensorRT keeps it in fp32 better)",
    )
    precisions: tuple[OnnxPrecision, ...] = Field(
        ("fp32", "fp16", "int8"),
        description="ONNX files to write: model.onnx (fp32, always), model.fp16.onnx, model.int8.onnx (QDQ)",
    )
    calibration_images: int = Field(
        256, gt=0, description="source images (seeded draw) that calibrate the int8 activation ranges"
    )
    calibration_method: CalibrationMethod = Field(
        "minmax", description="onnxruntime calibrator for int8 activation ranges: minmax, percentile or entropy"
    )
    int8_fallback: Int8FallbackConfig = Field(
        default_factory=Int8FallbackConfig,
        description="nodes kept float by measured sensitivity when the int8 graph misses its parity tolerance",
    )
    int8: Int8Config = Field(
        default_factory=Int8Config, description="how model.int8.onnx is made: ptq, or qad (fine-tuned fake-quantized)"
    )
    parity: ParityConfig = Field(
        default_factory=ParityConfig,
        description="per-precision tolerances of every artifact against PyTorch fp32; a miss is recorded as failed",
    )
    tensorrt: bool = Field(
        True, description="build model.fp16.engine / model.int8.engine where TensorRT and a GPU exist"
    )
    aoti: bool = Field(True, description="compile AOTInductor packages on the export device")
    aoti_precisions: tuple[AOTIPrecision, ...] = Field(
        ("fp32", "bf16"),
        min_length=1,
        description="AOTInductor packages to compile: model.pt2 (fp32), model.bf16.pt2, model.fp16.pt2; "
        "bf16 / fp16 only on CUDA (on CPU they are skipped with the reason)",
    )
    batch_range: tuple[int, int, int] = Field(
        (1, 8, 32), description="(min, opt, max) batch: the dynamic batch of every artifact and the TensorRT profile"
    )
    workspace_mib: int = Field(4096, gt=0, description="TensorRT builder workspace memory pool limit (MiB)")

    @property
    def source_images(self) -> int:
        """Source images the export draws: the calibration set, then the fallback's held-out images."""
        return self.calibration_images + (self.int8_fallback.holdout_images if self.int8_fallback.enabled else 0)

    @field_validator("precisions")
    @classmethod
    def _with_fp32(cls, precisions: tuple[str, ...]) -> tuple[str, ...]:
        # fp32 is the reference every other artifact is checked against, and int8 is quantized from it.
        return tuple(dict.fromkeys(("fp32", *precisions)))

    @field_validator("batch_range")
    @classmethod
    def _ordered(cls, batch_range: tuple[int, int, int]) -> tuple[int, int, int]:
        low, opt, high = batch_range
        if not 1 <= low <= opt <= high:
            raise ValueError(f"batch_range must satisfy 1 <= min <= opt <= max, got {batch_range}")
        return batch_range
