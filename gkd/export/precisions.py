"""The precisions an artifact or runtime computes in, and how far each may be from PyTorch fp32.

Every list of precisions in `gkd.export` is a subset of `PRECISIONS`; each runtime's own subset is in its
registry entry (`gkd.export.runtimes`), the exported ones in the export block (`gkd.export.config`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Float precisions of PyTorch (weights, activations, autocast); int8 exists only in quantized ONNX graphs.
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
