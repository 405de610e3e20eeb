"""Quantization-aware distillation of the int8 export (``export.int8.method: qad``): the fake-quantized student
computes what ONNX Runtime's int8 QDQ graph computes, QAD against PTQ on held-out images, and the recipe key
through a tiny run."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import gkd
from gkd.compress.losses import build_loss
from gkd.compress.qad import QADObjective, train_qad
from gkd.export.config import ExportConfig, Int8Config
from gkd.export.int8_qad import literal_qdq_logits, quantize_qad
from gkd.export.onnx import INPUT_NAME, export_onnx, onnx_session, prepare_for_export
from gkd.export.qdq_mirror import activation_scales, fake_quantized, quant_plan
from gkd.export.quantize import quantize_int8
from tests.helpers.paths import TINY_RECIPE
from tests.helpers.tiny_models import tiny_segmentor

SIZE = (64, 64)
EXACT = 1e-4  # per-image mean |logit difference| of two computations of the same int8 arithmetic (measured ~2e-8)


def _images(count: int, seed: int) -> torch.Tensor:
    """Smooth random images (8 x 8 noise upsampled): regions a segmentor can label."""
    noise = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=SIZE, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict:
    """A tiny segmentor (weights moved off their initialisation, so no two LayerNorms are equal constants the
    exporter would merge), its fp32 graph and ONNX Runtime's PTQ int8 graph of it."""
    torch.set_num_threads(1)
    model = tiny_segmentor(seed=1)
    torch.manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    prepared = prepare_for_export(model, SIZE).eval()
    out = tmp_path_factory.mktemp("qad")
    export_onnx(prepared, out / "model.onnx", SIZE, 18, (1, 4, 8))
    calibration = _images(8, 0)
    quantize_int8(out / "model.onnx", out / "ptq.onnx", calibration, calibration_cache=out / "calibration.json")
    return {"dir": out, "model": prepared, "calibration": calibration, "holdout": _images(8, 1)}


def _per_image_gap(model: torch.nn.Module, plan, int8: Path, images: torch.Tensor) -> np.ndarray:
    """Per-image mean |logit difference| of the fake-quantized model against the int8 graph (Q/DQ as written)."""
    with torch.no_grad(), fake_quantized(model, plan):
        mirrored = model(images).numpy()
    return np.abs(mirrored - literal_qdq_logits(int8, images)).mean(axis=(1, 2, 3))


def test_fake_quant_student_computes_the_ptq_int8_graph(graphs):
    """(a) At step 0 the fake-quantized student's logits are the int8 graph's (Q/DQ as written): within ``EXACT``
    (float rounding) on at least half the held-out images, and where a rounding flips on a near-tie and cascades,
    still far closer than fp32 is (mean |diff| <= 0.35 x fp32's; measured 6 of 8 images, 0.0027 vs 0.013).
    Without the weights' fake quantization the mirror is exact on no image."""
    model, holdout = graphs["model"], graphs["holdout"]
    fp32, int8 = onnx.load(str(graphs["dir"] / "model.onnx")), onnx.load(str(graphs["dir"] / "ptq.onnx"))
    plan = quant_plan(fp32, int8, model)
    constants = {i.name for i in int8.graph.initializer}
    int8_weights = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    weighted = [n for n in int8.graph.node if len(n.input) > 1 and n.input[1] in int8_weights]
    assert plan.unmapped == [] and len(plan.weights) == len(weighted)
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    gaps = _per_image_gap(model, plan, graphs["dir"] / "ptq.onnx", holdout)
    with torch.no_grad():
        fp32_gap = np.abs(model(holdout).numpy() - literal_qdq_logits(graphs["dir"] / "ptq.onnx", holdout)).mean()
    assert np.mean(gaps < EXACT) >= 0.5, gaps
    assert gaps.mean() <= 0.35 * fp32_gap, (gaps.mean(), fp32_gap)
    float_weights = dataclasses.replace(plan, weights={})
    assert np.mean(_per_image_gap(model, float_weights, graphs["dir"] / "ptq.onnx", holdout) < EXACT) == 0
    state = model.state_dict()  # the block left the student fp32: its weights as before, no hooks
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _qad_training(prepared: torch.nn.Module, config: Int8Config, train: torch.Tensor):
    """`train_qad` as the export stage runs it (AdamW, cosine decay), on ``train`` labelled by the fp32 student;
    the stage-1 term's teacher is the student's own encoder (an MSE loss, weighted ``config.distill_weight``)."""

    def train_fn(student: torch.nn.Module, plan) -> dict:
        loss = build_loss("mse", {"student_layers": [3], "teacher_layers": [3]}, 64, 64, 11)
        with torch.no_grad():
            labels = prepared(train).argmax(1)
        objective = QADObjective(student, loss, copy.deepcopy(prepared.encoder), config, torch.float32)

        def fit(objective: torch.nn.Module, optim) -> dict:
            params = [p for p in objective.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, optim.steps)
            objective.train()
            for step in range(optim.steps):
                pick = torch.randint(0, len(train), (optim.batch_size,), generator=torch.Generator().manual_seed(step))
                outputs = objective({"image": train[pick], "label": labels[pick]})
                optimizer.zero_grad()
                outputs["loss"].backward()
                optimizer.step()
                schedule.step()
            return {"loss": float(outputs["loss"])}

        return train_qad(objective, plan, fit, {"image": train[:8], "label": labels[:8]}, config)

    return train_fn


def test_qad_lowers_the_int8_error_against_fp32(graphs):
    """(b) QAD (self-distillation from the fp32 student, learned activation scales) gives an int8 graph that
    disagrees with fp32's argmax on held-out images less than PTQ's (< 0.95 x; issue 39's target of 0.8 x is not
    reached on tiny models, where PTQ's error is mostly unsystematic rounding), both computed as their Q/DQ are
    written; the QAD graph quantizes PTQ's tensors, at its learned scales. Measured (100 steps at lr 3e-6, 256
    fine-tune images, 64 held-out ones): PTQ 2.26 %, QAD 1.87 % (0.83x). With the attention products quantized
    too (the earlier int8 graph): 0.87x, 0.84x after 300 steps, 0.86x-0.87x with 32-image batches; weights only
    (PTQ scales fixed) 0.81x-0.96x on 16 held-out images over lr 1e-6..3e-5,
    temperature 0.5-4, MSE on logits 0.91x-0.94x, the task cross-entropy on fp32's labels 1.14x-8.4x."""
    out, prepared = graphs["dir"], graphs["model"]
    config = ExportConfig(
        precisions=["fp32", "int8"],
        calibration_images=8,
        int8_fallback={"enabled": False},
        int8={"method": "qad", "steps": 100, "batch_size": 8, "lr": 3e-6, "learn_scales": True},
    )
    images = (graphs["calibration"], graphs["calibration"][:0], graphs["holdout"][:4])
    train_fn = _qad_training(prepared, config.int8, _images(256, 2))
    info = quantize_qad(prepared, out / "model.onnx", out / "qad.onnx", images, config, SIZE, train_fn)
    assert info["method"] == "qad" and info["qad"]["steps"] == 100
    losses_start, losses_end = info["qad"]["losses_start"], info["qad"]["losses_end"]
    assert losses_end["loss_self"] < 0.7 * losses_start["loss_self"], (losses_start, losses_end)
    holdout = _images(64, 3)
    with torch.no_grad():
        reference = prepared(holdout).numpy().argmax(1)
    disagreement = {
        name: float((literal_qdq_logits(out / f"{name}.onnx", holdout).argmax(1) != reference).mean())
        for name in ("ptq", "qad")
    }
    qad_scales = activation_scales(onnx.load(str(out / "qad.onnx")))
    assert qad_scales.keys() == activation_scales(onnx.load(str(out / "ptq.onnx"))).keys()
    assert disagreement["qad"] < 0.95 * disagreement["ptq"], disagreement


def test_qad_without_distill_weight_needs_no_teacher(graphs, monkeypatch):
    """With ``export.int8.distill_weight`` 0 (the default) the export stage's QAD builds neither the teacher nor
    the stage-1 loss, and does not declare the teacher stage's file as an input; the objective then trains
    without them (no ``distill_loss``). Weighted, it needs both."""
    from gkd.recipe import load_recipe
    from gkd.rundir import TEACHER_FILE
    from gkd.stages import export as export_stage

    recipe = load_recipe(TINY_RECIPE, ["export.int8.method=qad", "export.int8.steps=2", "export.int8.batch_size=4"])
    assert recipe.export.int8.distill_weight == 0 and recipe.models.teacher.train_encoder
    assert TEACHER_FILE not in export_stage.STAGE.inputs(recipe)
    weighted = load_recipe(TINY_RECIPE, ["export.int8.method=qad", "export.int8.distill_weight=1"])
    assert TEACHER_FILE in export_stage.STAGE.inputs(weighted)
    with pytest.raises(ValueError, match="needs the stage-1 loss and the teacher"):
        QADObjective(graphs["model"], None, None, weighted.export.int8, torch.float32)

    def no_teacher(*args, **kwargs):
        raise AssertionError("QAD with distill_weight 0 built the teacher or the stage-1 loss")

    monkeypatch.setattr(export_stage, "teacher_backbone", no_teacher)
    monkeypatch.setattr(export_stage, "build_loss", no_teacher)
    model = copy.deepcopy(graphs["model"])
    fp32, int8 = onnx.load(str(graphs["dir"] / "model.onnx")), onnx.load(str(graphs["dir"] / "ptq.onnx"))
    plan = quant_plan(fp32, int8, model)
    images = graphs["calibration"]
    with torch.no_grad():
        labels = model(images).argmax(1)
    samples = [{"image": image, "label": label} for image, label in zip(images, labels, strict=True)]

    class Trainer:
        def __init__(self, objective: torch.nn.Module, config) -> None:
            self.objective, self.config = objective, config

        def fit(self) -> dict:
            params = [p for p in self.objective.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.config.lr)
            self.objective.train()
            for step in range(self.config.steps):
                batch = samples[step * 4 : step * 4 + 4]
                outputs = self.objective({key: torch.stack([s[key] for s in batch]) for key in ("image", "label")})
                optimizer.zero_grad()
                outputs["loss"].backward()
                optimizer.step()
            return {"loss": float(outputs["loss"])}

    class Run:  # what `qad_training` reads of a run
        device, num_classes, teacher_dtype = torch.device("cpu"), 11, torch.float32

        def __init__(self) -> None:
            self.recipe = recipe

        def dataset(self, config, train: bool) -> list[dict]:
            return samples

        def trainer(self, name: str, objective: torch.nn.Module, dataset, config) -> Trainer:
            assert objective.teacher is None and objective.loss is None
            return Trainer(objective, config)

    record = export_stage.qad_training(Run())(model, plan)
    assert set(record["losses_start"]) == {"loss", "loss_self", "loss_ce"}  # no distill_loss: no teacher term
    assert record["steps"] == 2 and np.isfinite(record["last_logged"]["loss"])


def test_recipe_key_and_a_tiny_run_write_the_qad_int8_graph(tmp_path):
    """(c) ``export.int8`` validates (default ptq, unknown methods and keys refused); a tiny run with
    ``method: qad`` writes a model.int8.onnx that ONNX Runtime runs, recorded as QAD with its losses, the PTQ
    graph's parity beside it, and a second run finds the stage up to date."""
    assert ExportConfig().int8.method == "ptq"
    assert ExportConfig(int8={"method": "qad", "steps": 3}).int8.steps == 3
    for bad in ({"method": "kd"}, {"method": "qad", "epochs": 1}, {"steps": 0}):
        with pytest.raises(ValidationError):
            ExportConfig(int8=bad)
    overrides = ["export.int8.method=qad", "export.int8.steps=3", "export.int8.batch_size=4"]
    overrides += ["export.int8.distill_weight=1", "export.int8.task_weight=1", "export.int8.learn_scales=true"]
    pipeline = gkd.Pipeline(TINY_RECIPE, out=tmp_path / "run", device="cpu", threads=1, overrides=overrides)
    stages = ["train-teacher", "distill", "train-head", "export"]
    assert pipeline.run(stages=stages).failed == []
    summary = json.loads((tmp_path / "run" / "export.json").read_text())
    int8 = summary["artifacts"]["onnx/int8"]
    assert int8["method"] == "qad" and int8["qad"]["steps"] == 3 and "onnx/int8" not in summary["failed"]
    assert set(int8["qad"]["losses_start"]) == {"loss", "loss_self", "loss_ce", "distill_loss"}
    assert int8["qad"]["losses_end"]["loss"] != int8["qad"]["losses_start"]["loss"]  # it trained
    assert int8["ptq"]["parity"]["passed"] and int8["qad"]["plan"]["unmapped"] == []
    assert set(int8["qad"]["learned_scales"]) == {"min", "median", "max"}
    image = np.random.default_rng(0).random((1, 3, *summary["img_size"]), dtype=np.float32)
    logits = onnx_session(tmp_path / "run" / "model.int8.onnx").run(None, {INPUT_NAME: image})[0]
    assert list(logits.shape) == [1, *summary["output"]["shape"][1:]] and np.isfinite(logits).all()
    assert (tmp_path / "run" / "checkpoints" / "qad" / "last.pt").is_file()
    assert not list((tmp_path / "run").glob("gkd.qad.*"))  # the scratch directory is gone
    assert pipeline.run(stages=stages).ran == []  # up to date: nothing trains again
