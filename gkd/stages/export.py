"""Stage ``export``: the trained student as ONNX (fp32 / fp16 / int8 QDQ), TensorRT engines and AOTInductor; with
``export.int8.method: qad`` the int8 graph comes from a quantization-aware distillation of the student
(`gkd.compress.qad`) from its own fp32 copy (and the frozen teacher, where weighted) on labelled source images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gkd.compress.losses import build_loss
from gkd.compress.qad import QAD_PHASE, QADObjective, qad_optim, train_qad
from gkd.data.config import DatasetConfig
from gkd.engine import Stage
from gkd.export.contract import deployment_contract
from gkd.export.qdq_mirror import QADTraining, QuantPlan
from gkd.export.stage import export_artifacts
from gkd.models.checkpoint import load_segmentor
from gkd.preflight import DataUse, Part, TrainingUse
from gkd.recipe import Recipe
from gkd.rundir import EXPORT_FILE, SEGMENTOR_FILE
from gkd.stages.context import Run, files, teacher_backbone
from gkd.stages.distill import distill_inputs
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


def _qad(recipe: Recipe) -> bool:
    return "int8" in recipe.export.precisions and recipe.export.int8.method == "qad"


def _qad_teacher(recipe: Recipe) -> bool:
    """Whether QAD distils from the teacher: its stage-1 term is weighted (``export.int8.distill_weight`` > 0)."""
    return _qad(recipe) and recipe.export.int8.distill_weight > 0


def _qad_use(recipe: Recipe) -> TrainingUse:
    """QAD's phase: the whole student, beside the frozen teacher's encoder where its stage-1 term is weighted."""
    frozen: tuple[Part, ...] = ("teacher encoder",) if _qad_teacher(recipe) else ()
    return TrainingUse(QAD_PHASE, qad_optim(recipe.export.int8), "source", ("student",), frozen)


def qad_training(run: Run) -> QADTraining:
    """`train_qad` in this run: labelled source images, a resumable trainer (phase ``qad``) and, where
    ``export.int8.distill_weight`` > 0, the recipe's stage-1 loss and frozen teacher (otherwise neither is built);
    the losses are probed on the first batch of source images."""
    recipe, config = run.recipe, run.recipe.export.int8

    def train(student: torch.nn.Module, plan: QuantPlan) -> dict:
        torch.manual_seed(recipe.seed + 7)
        teacher = distill = None
        if _qad_teacher(recipe):
            teacher = teacher_backbone(run)
            loss = recipe.distill.loss
            dims = (student.encoder.embed_dim, teacher.embed_dim)
            distill = build_loss(loss.name, loss.options, *dims, run.num_classes)
        objective = QADObjective(student.to(run.device), distill, teacher, config, run.teacher_dtype)
        dataset = run.dataset(recipe.data.source, train=True)
        picks = range(min(config.batch_size, len(dataset)))
        probe = {key: torch.stack([dataset[i][key] for i in picks]) for key in ("image", "label")}
        return train_qad(objective, plan, lambda o, c: run.trainer(QAD_PHASE, o, dataset, c).fit(), probe, config)

    return train


def stage_export(run: Run) -> None:
    """ONNX (fp32 / fp16 / int8 QDQ), TensorRT engines where possible, AOTInductor; parity checked."""
    recipe = run.recipe
    # ONNX fp32/fp16/int8, the AOTInductor package and engines: a few copies of the weights at most
    require_free_space(run.dir, 6 * run.file(SEGMENTOR_FILE).stat().st_size + 64 * 2**20, "export")
    segmentor = load_segmentor(run.file(SEGMENTOR_FILE))[0].to(run.device).eval()
    calibration = _images(run, recipe.data.source, recipe.export.source_images, recipe.seed)
    parity = _images(run, recipe.data.source_val, 4, recipe.seed + 1)
    qad = qad_training(run) if _qad(recipe) else None
    summary = export_artifacts(
        segmentor, recipe.data.img_size, run.dir, recipe.export, calibration, parity, run.device, qad
    )
    summary["contract"] = deployment_contract(summary, recipe.evaluate.mode, recipe.evaluate.stride)
    write_json(run.file(EXPORT_FILE), summary)


STAGE = Stage(
    "export",
    stage_export,
    files(EXPORT_FILE),
    inputs=lambda r: (SEGMENTOR_FILE, *(distill_inputs(r) if _qad_teacher(r) else ())),
    data=lambda r: [DataUse("source", r.data.source, True), DataUse("source_val", r.data.source_val, True)],
    trainings=lambda r: [_qad_use(r)] if _qad(r) else [],
    # QAD's teacher (read only where export.int8.distill_weight > 0; `Stage.weights` is fixed, not per recipe, and
    # a changed teacher changes the student upstream anyway)
    weights=("teacher",),
    sections=(
        "seed",
        "data.img_size",
        "data.source",
        "data.source_val",
        "data.eval_transform",
        "evaluate.mode",  # the contract states the inference the reported mIoU used
        "evaluate.stride",
        "export",
        # QAD: the teacher, the stage-1 loss and the training transform (each also changes the student upstream)
        "models",
        "distill.loss",
        "data.train_transform",
        "training",
    ),
)
