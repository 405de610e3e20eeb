"""Stage ``export``: the trained student as ONNX (fp32 / fp16 / int8 QDQ), TensorRT engines and AOTInductor."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gkd.data.config import DatasetConfig
from gkd.engine import Stage
from gkd.export.contract import deployment_contract
from gkd.export.stage import export_artifacts
from gkd.models.checkpoint import load_segmentor
from gkd.preflight import DataUse
from gkd.rundir import EXPORT_FILE, SEGMENTOR_FILE
from gkd.stages.context import Run, files
from gkd.utils.io import require_free_space, write_json


def _images(run: Run, config: DatasetConfig, count: int, seed: int) -> torch.Tensor:
    """``count`` images of a split, resized to the input size (calibration and parity inputs)."""
    dataset = run.dataset(config, train=False)
    picks = np.random.default_rng(seed).permutation(len(dataset))[:count]
    size = run.recipe.data.img_size
    return torch.stack(
        [
            F.interpolate(dataset[int(i)]["image"][None], size=size, mode="bilinear", align_corners=False)[0]
            for i in picks
        ]
    )


def stage_export(run: Run) -> None:
    """ONNX (fp32 / fp16 / int8 QDQ), TensorRT engines where possible, AOTInductor; parity checked."""
    recipe = run.recipe
    # ONNX fp32/fp16/int8, the AOTInductor package and engines: a few copies of the weights at most
    require_free_space(run.dir, 6 * run.file(SEGMENTOR_FILE).stat().st_size + 64 * 2**20, "export")
    segmentor = load_segmentor(run.file(SEGMENTOR_FILE))[0].to(run.device).eval()
    calibration = _images(run, recipe.data.source, recipe.export.source_images, recipe.seed)
    parity = _images(run, recipe.data.source_val, 4, recipe.seed + 1)
    summary = export_artifacts(segmentor, recipe.data.img_size, run.dir, recipe.export, calibration, parity, run.device)
    summary["contract"] = deployment_contract(summary, recipe.evaluate.mode, recipe.evaluate.stride)
    write_json(run.file(EXPORT_FILE), summary)


STAGE = Stage(
    "export",
    stage_export,
    files(EXPORT_FILE),
    inputs=files(SEGMENTOR_FILE),
    data=lambda r: [DataUse("source", r.data.source, True), DataUse("source_val", r.data.source_val, True)],
    sections=(
        "seed",
        "data.img_size",
        "data.source",
        "data.source_val",
        "data.eval_transform",
        "evaluate.mode",  # the contract states the inference the reported mIoU used
        "evaluate.stride",
        "export",
    ),
)
