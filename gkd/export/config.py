"""Recipe blocks `export:` and `benchmark:`. Defaults are quick on 2 CPU cores (the embedded default run)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["fp32", "fp16", "int8"]
RuntimeName = Literal[
    "torch", "torch-cudagraph", "onnxruntime", "onnxruntime-trt", "tensorrt", "aoti", "aoti-cudagraph"
]
AOTIPrecision = Literal["fp32", "bf16", "fp16"]
CalibrationMethod = Literal["minmax", "percentile", "entropy"]


class ParityTolerance(BaseModel):
    """How far an artifact's logits may be from PyTorch fp32's (see `gkd.export.parity.judge`)."""

    model_config = ConfigDict(extra="forbid")

    atol: float = Field(ge=0, description="absolute part of the allowed max |logit difference|")
    rtol: float = Field(ge=0, description="part of the reference logits' range (max - min) added to atol")
    min_argmax_agreement: float = Field(ge=0, le=1, description="fraction of pixels whose argmax class must agree")


class ParityConfig(BaseModel):
    """Per-precision parity tolerances; the defaults hold on CPU and on GPU (TF32, other kernels)."""

    model_config = ConfigDict(extra="forbid")

    fp32: ParityTolerance = ParityTolerance(atol=1e-4, rtol=1e-3, min_argmax_agreement=0.999)
    fp16: ParityTolerance = ParityTolerance(atol=1e-3, rtol=1e-2, min_argmax_agreement=0.99)
    bf16: ParityTolerance = ParityTolerance(atol=1e-3, rtol=3e-2, min_argmax_agreement=0.98)
    # int8 logits move by a few quantisation steps: judged mainly by argmax and by the benchmark's mIoU drop.
    int8: ParityTolerance = ParityTolerance(atol=1e-2, rtol=0.1, min_argmax_agreement=0.9)

    def tolerance(self, precision: str) -> ParityTolerance:
        """The tolerance of an artifact or runtime of ``precision``."""
        return getattr(self, precision)


class Int8FallbackConfig(BaseModel):
    """Sensitivity fallback of the int8 ONNX graph (`gkd.export.quantize.quantize_with_fallback`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="keep the most sensitive nodes float until int8 parity holds")
    holdout_images: int = Field(
        32, ge=0, description="source images beyond the calibration set that the sensitivity is measured on"
    )
    max_float_nodes: int = Field(8, ge=1, description="most quantizable nodes the fallback may keep float")


class ExportConfig(BaseModel):
    """What `export` writes: ONNX per precision, TensorRT engines, an AOTInductor package."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(
        18,
        ge=17,
        le=23,
        description="ONNX opset; >= 17 so LayerNorm is one LayerNormalization op (TensorRT keeps it in fp32 better)",
    )
    precisions: tuple[Precision, ...] = Field(
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


class BenchmarkConfig(BaseModel):
    """Latency of every available runtime x precision x batch size, and each artifact's mIoU vs PyTorch fp32."""

    model_config = ConfigDict(extra="forbid")

    batch_sizes: tuple[int, ...] = Field((1, 8), min_length=1, description="batch sizes to time")
    warmup_iterations: int = Field(5, ge=0, description="untimed iterations before timing")
    warmup_seconds: float = Field(0.0, ge=0, description="also warm up for at least this long (trtexec uses 0.2 s)")
    iterations: int = Field(20, ge=5, description="timed iterations per runtime and batch size")
    runtimes: Literal["auto"] | list[RuntimeName] = Field(
        "auto", description="'auto' = every runtime that loads here, or a list of runtime names"
    )
    accuracy: bool = Field(True, description="evaluate every artifact's mIoU on every target domain")
    tolerance_fp32: float = Field(0.1, ge=0, description="mIoU points an fp32 artifact may lose against PyTorch fp32")
    tolerance_fp16: float = Field(
        0.5, ge=0, description="mIoU points an fp16/bf16 artifact may lose against PyTorch fp32"
    )
    tolerance_int8: float = Field(1.5, ge=0, description="mIoU points an int8 artifact may lose against PyTorch fp32")

    @model_validator(mode="after")
    def _positive_batches(self) -> BenchmarkConfig:
        if any(size < 1 for size in self.batch_sizes):
            raise ValueError(f"batch_sizes must be >= 1, got {self.batch_sizes}")
        return self

    def tolerance(self, precision: str) -> float:
        """mIoU tolerance for an artifact of ``precision`` (bf16 counts as fp16)."""
        tolerances = {
            "fp32": self.tolerance_fp32,
            "fp16": self.tolerance_fp16,
            "bf16": self.tolerance_fp16,
            "int8": self.tolerance_int8,
        }
        return tolerances[precision]
