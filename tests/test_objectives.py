"""Training objectives: each asks the loss what it needs (features or logits) and feeds it exactly that."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.compress.losses import build_loss
from gkd.compress.objectives import DistillObjective, JointObjective
from gkd.models.backbone import Backbone
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor

NUM_CLASSES = 3


def tiny_segmentor(seed: int) -> Segmentor:
    """A 2-block, width-32 ViT with a linear head."""
    torch.manual_seed(seed)
    kwargs = {"dynamic_img_size": True, "img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2}
    backbone = Backbone(f"tiny{seed}", "vit_small_patch16_224", kwargs, (0.5,) * 3, (0.5,) * 3)
    return Segmentor(backbone, *build_decoder(DecoderConfig(name="linear"), 32, 2, NUM_CLASSES))


def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return {"image": torch.rand(2, 3, 64, 64), "label": torch.randint(0, NUM_CLASSES, (2, 64, 64))}


def test_joint_objective_feeds_a_logit_loss_both_segmentors_logits() -> None:
    student, teacher = tiny_segmentor(0).eval(), tiny_segmentor(1)
    loss = build_loss("vanilla_kd", {"temperature": 2.0}, 32, 32, NUM_CLASSES)
    objective = JointObjective(student, loss, teacher, weight=0.5, teacher_dtype=torch.float32)
    data = batch()
    out = objective(data)
    with torch.no_grad():
        student_logits, teacher_logits = student(data["image"]), teacher(data["image"])
    expected_kd = loss(student_logits, teacher_logits)["loss"]
    expected_ce = F.cross_entropy(student_logits, data["label"])
    torch.testing.assert_close(out["distill_loss_kd"], expected_kd)
    torch.testing.assert_close(out["loss"].detach(), expected_ce + 0.5 * expected_kd)
    out["loss"].backward()
    assert student.encoder.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_joint_objective_feeds_a_feature_loss_encoder_tokens() -> None:
    student, teacher = tiny_segmentor(0).eval(), tiny_segmentor(1).encoder
    loss = build_loss("mse", {"student_layers": [0], "teacher_layers": [-1]}, 32, 32)
    objective = JointObjective(student, loss, teacher, weight=2.0, teacher_dtype=torch.float32)
    data = batch()
    out = objective(data)
    with torch.no_grad():
        student_tokens = student.encoder(data["image"], layers=(0,))
        teacher_tokens = teacher(data["image"], layers=(1,))
        expected = loss(student_tokens, teacher_tokens, student.encoder, data["image"])["loss"]
    torch.testing.assert_close(out["distill_loss_mse"], expected)
    assert {"loss", "loss_ce", "distill_loss", "distill_loss_mse"} == set(out)


def test_distill_objective_refuses_a_logit_loss() -> None:
    segmentor = tiny_segmentor(0)
    loss = build_loss("cwd_logits", {}, 32, 32, NUM_CLASSES)
    with pytest.raises(ValueError, match="CWDLogitsLoss takes logits"):
        DistillObjective(segmentor.encoder, loss, tiny_segmentor(1).encoder, torch.float32)
