"""Distillation losses: each against a hand-computed case, plus gradients, masking and the registry.

Hand-computed cases build ``ViTFeatures`` directly and set the loss's projections to identities, so the
expected number is written out with numpy, independently of the implementation. A stub stands in for
the student where a loss runs its own masked pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gkd.compress.losses import LOSSES, LossNeeds, build_loss, loss_needs, validate_loss_options
from gkd.compress.losses.base import (
    conv3x3_generator,
    feature_term,
    masked_mean,
    masked_patch_term,
    random_token_mask,
    weighted_pair_means,
)
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures

LN_EPS = 1e-5
FEATURE_LOSSES = ["qsd", "mse", "cwd", "af_dcd", "g2sd", "vitkd", "proteus"]
LOGIT_LOSSES = ["vanilla_kd", "cwd_logits"]
# Small but valid options for the tiny backbones (student width 32 on a 7x7 grid, teacher 48 on 8x8).
TINY_OPTIONS = {
    "g2sd": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
    "vitkd": {"student_layers": [0, -1], "teacher_layers": [0, -1]},
}


# ---------------------------------------------------------------------------------------------------
# helpers


def features(*tokens: np.ndarray, grid: tuple[int, int], cls: np.ndarray | None = None) -> ViTFeatures:
    """ViTFeatures with one layer per ``(B, N, C)`` array (every layer gets the same class token)."""
    patch = [torch.tensor(t, dtype=torch.float32) for t in tokens]
    cls_t = None if cls is None else torch.tensor(cls, dtype=torch.float32)
    return ViTFeatures(patch, [cls_t] * len(patch), grid, tuple(range(len(patch))))


class StubStudent(nn.Module):
    """Stands in for a ``Backbone``: fixed tokens whose masked positions become the mask token."""

    def __init__(self, tokens: np.ndarray, grid: tuple[int, int], cls: np.ndarray | None = None) -> None:
        super().__init__()
        self.tokens = torch.tensor(tokens, dtype=torch.float32)
        self.cls = None if cls is None else torch.tensor(cls, dtype=torch.float32)
        self.grid = grid

    def forward(self, images, layers=(-1,), mask=None, mask_token=None) -> ViTFeatures:
        tokens = self.tokens if mask is None else torch.where(mask[..., None], mask_token, self.tokens)
        return ViTFeatures([tokens] * len(layers), [self.cls] * len(layers), self.grid, tuple(layers))


def images_for(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 3, 1, 1)


def make_identity(module: nn.Module) -> None:
    """Every Linear -> identity, every 3x3 Conv2d -> identity on its centre tap, biases 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.eye(*m.weight.shape))
                m.bias.zero_()
            elif isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.weight[:, :, 1, 1] = torch.eye(m.weight.shape[0], m.weight.shape[1])
                m.bias.zero_()


def np_ln(x: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def value(out: dict[str, torch.Tensor], key: str) -> float:
    return float(out[key].detach())


@pytest.fixture(scope="module")
def backbones() -> tuple[Backbone, Backbone]:
    """A DeiT-like student (patch 16, width 32) and a DINOv2-like teacher (patch 14, width 48)."""
    torch.manual_seed(0)
    tiny = {"img_size": 112, "depth": 2, "num_heads": 2, "dynamic_img_size": True}
    mean_std = ((0.5,) * 3, (0.5,) * 3)
    student = Backbone("student", "vit_small_patch16_224", {**tiny, "embed_dim": 32}, *mean_std)
    teacher = Backbone("teacher", "vit_small_patch14_dinov2", {**tiny, "embed_dim": 48}, *mean_std)
    return student, teacher.eval()


def run_feature_loss(
    name: str, options: dict, student: Backbone, teacher: Backbone, teacher_dtype: torch.dtype
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The loss and its output for a batch of 2 random images (teacher tokens cast to ``teacher_dtype``)."""
    loss = build_loss(name, options, student.embed_dim, teacher.embed_dim)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        teacher_feats = teacher(images, layers=loss.teacher_layers)
    teacher_feats.patch_tokens = [t.to(teacher_dtype) for t in teacher_feats.patch_tokens]
    teacher_feats.cls_tokens = [t.to(teacher_dtype) for t in teacher_feats.cls_tokens]
    student_feats = student(images, layers=loss.student_layers)
    return loss, loss(student_feats, teacher_feats, student, images)


# ---------------------------------------------------------------------------------------------------
# registry


def test_registry_names() -> None:
    assert set(LOSSES) == set(FEATURE_LOSSES) | set(LOGIT_LOSSES)
    assert {name for name in LOSSES if loss_needs(name).inputs == "features"} == set(FEATURE_LOSSES)
    assert {name for name in LOSSES if loss_needs(name).inputs == "logits"} == set(LOGIT_LOSSES)


def test_needs_say_teacher_and_schedule() -> None:
    features, logits = LossNeeds(inputs="features"), LossNeeds(inputs="logits")
    assert features.two_stage and not features.teacher_segmentor
    assert logits.teacher_segmentor and not logits.two_stage
    assert loss_needs("qsd") == features and loss_needs("vanilla_kd") == logits


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_builds_from_defaults(name: str) -> None:
    resolved = validate_loss_options(name, {})
    assert resolved == validate_loss_options(name, resolved)  # a resolved recipe re-validates unchanged
    loss = build_loss(name, resolved, student_dim=32, teacher_dim=48, num_classes=19)
    assert loss_needs(loss) == loss_needs(name)
    if loss_needs(loss).inputs == "features":
        assert len(loss.student_layers) == len(loss.teacher_layers) >= 1


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unknown_option_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="not_an_option"):
        validate_loss_options(name, {"not_an_option": 1})


def test_unknown_loss_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown distillation loss 'kd'.*qsd"):
        validate_loss_options("kd", {})
    with pytest.raises(ValueError, match="unknown distillation loss"):
        loss_needs("kd")
    with pytest.raises(ValueError, match="unknown distillation loss"):
        build_loss("kd", {}, 32, 48)


def test_invalid_option_values() -> None:
    with pytest.raises(ValueError, match="switch at least one QSD term on"):
        validate_loss_options("qsd", {"cls_token": False, "feature": False, "mask_patch": False})
    with pytest.raises(ValueError, match="pair up"):
        validate_loss_options("mse", {"student_layers": [-1, -2], "teacher_layers": [-1]})
    with pytest.raises(ValueError, match="one layer pair"):
        validate_loss_options("af_dcd", {"student_layers": [0, 1], "teacher_layers": [0, 1]})
    with pytest.raises(ValueError, match="temperature"):
        validate_loss_options("qsd", {"temperature": 0})
    with pytest.raises(ValueError, match="groups"):
        build_loss("af_dcd", {"groups": 5}, 32, 48)


# ---------------------------------------------------------------------------------------------------
# shared terms, each against its formula written out with numpy


def test_masked_mean() -> None:
    rng = np.random.default_rng(0)
    values, keep = rng.normal(size=(2, 5)), rng.random((2, 5)) < 0.4
    out = masked_mean(torch.tensor(values), torch.tensor(keep))
    assert float(out) == pytest.approx(values[keep].mean())
    assert float(masked_mean(torch.tensor(values), None)) == pytest.approx(values.mean())
    assert float(masked_mean(torch.tensor(values), torch.zeros(2, 5, dtype=torch.bool))) == 0.0


def test_feature_and_masked_patch_terms() -> None:
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    pred_cls, target_cls = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    pred_t, target_t = torch.tensor(pred), torch.tensor(target)
    with_cls = np.concatenate([pred_cls[:, None], pred], 1) - np.concatenate([target_cls[:, None], target], 1)
    cls_pair = (torch.tensor(pred_cls), torch.tensor(target_cls))
    assert float(feature_term(pred_t, target_t, cls_pair)) == pytest.approx((with_cls**2).mean())
    assert float(feature_term(pred_t, target_t, None)) == pytest.approx(((pred - target) ** 2).mean())
    masked = np.array([[True, False, True], [False, False, False]])
    per_token = ((pred - target) ** 2).mean(-1)
    assert float(masked_patch_term(pred_t, target_t, torch.tensor(masked))) == pytest.approx(per_token[masked].mean())
    assert float(masked_patch_term(pred_t, target_t, None)) == pytest.approx(per_token.mean())


def test_weighted_pair_means_leave_out_empty_terms() -> None:
    out = weighted_pair_means({"loss_a": (2.0, [torch.tensor(1.0), torch.tensor(3.0)]), "loss_b": (5.0, [])})
    assert set(out) == {"loss_a"} and float(out["loss_a"]) == 4.0


def test_conv3x3_generator_is_conv_relu_conv() -> None:
    torch.manual_seed(0)
    generator = conv3x3_generator(3)
    x = torch.randn(2, 3, 4, 5)
    first, second = generator[0], generator[2]
    hidden = torch.nn.functional.conv2d(x, first.weight, first.bias, padding=1).clamp(min=0)
    expected = torch.nn.functional.conv2d(hidden, second.weight, second.bias, padding=1)
    torch.testing.assert_close(generator(x), expected)
    assert sum(p.numel() for p in generator.parameters()) == 2 * (3 * 3 * 9 + 3)


def test_random_token_mask_counts() -> None:
    torch.manual_seed(3)
    mask = random_token_mask(4, 10, 3, torch.device("cpu"), masked_samples=2)
    assert mask[:2].sum(1).tolist() == [3, 3]
    assert mask[2:].sum().item() == 0
    torch.manual_seed(3)
    assert torch.equal(mask, random_token_mask(4, 10, 3, torch.device("cpu"), masked_samples=2))


# ---------------------------------------------------------------------------------------------------
# gradients and masking on real (tiny) backbones


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_gradients_reach_student_and_loss_parameters(name: str, backbones) -> None:
    student, teacher = backbones
    student.zero_grad()
    loss, out = run_feature_loss(name, TINY_OPTIONS.get(name, {}), student, teacher, teacher_dtype=torch.bfloat16)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["loss"].dtype == torch.float32
    terms = [key for key in out if key != "loss"]
    assert terms and all(not out[key].requires_grad for key in terms)
    assert torch.allclose(out["loss"].detach(), sum(out[key] for key in terms))
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for param_name, param in loss.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}: no gradient for {param_name}"
    student.zero_grad()


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("qsd", {}, "loss_mask"),
        ("proteus", {}, "loss_patch"),
        ("g2sd", TINY_OPTIONS["g2sd"], "loss_g2sd"),
        ("vitkd", TINY_OPTIONS["vitkd"], "loss_gen"),
        ("af_dcd", {}, "loss_fd"),
    ],
)
def test_masked_terms_depend_on_the_mask(name: str, options: dict, key: str, backbones) -> None:
    student, teacher = backbones
    torch.manual_seed(1)
    low = build_loss(name, {**options, "mask_ratio": 0.25}, student.embed_dim, teacher.embed_dim)
    high = build_loss(name, {**options, "mask_ratio": 0.75}, student.embed_dim, teacher.embed_dim)
    high.load_state_dict(low.state_dict())
    if hasattr(low, "mask_token"):
        with torch.no_grad():
            low.mask_token.normal_()  # a non-zero mask token: masked positions visibly differ
            high.mask_token.copy_(low.mask_token)
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        teacher_feats = teacher(images, layers=low.teacher_layers)
        student_feats = student(images, layers=low.student_layers)
        torch.manual_seed(2)
        out_low = low(student_feats, teacher_feats, student, images)
        torch.manual_seed(2)
        again = low(student_feats, teacher_feats, student, images)
        torch.manual_seed(2)
        out_high = high(student_feats, teacher_feats, student, images)
    assert value(out_low, key) == pytest.approx(value(again, key), rel=1e-6)  # seeded masks reproduce
    assert abs(value(out_low, key) - value(out_high, key)) > 1e-6 * abs(value(out_low, key))
    for other in out_low:
        if other not in (key, "loss") and not (name == "af_dcd" and other == "loss_ctr"):
            assert value(out_low, other) == pytest.approx(value(out_high, other), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# QSD

S3 = np.array([[[0.2, -1.0, 0.5, 1.5], [1.0, 0.3, -0.4, 0.0], [-0.7, 0.8, 0.9, -0.2]]])  # (1, 3, 4)
T3 = np.array([[[0.5, -0.3, 0.1, 0.9], [-1.2, 0.4, 0.6, 0.2], [0.3, 0.3, -0.8, 0.1]]])
S_CLS = np.array([[0.4, -0.6, 1.1, 0.1]])
T_CLS = np.array([[0.2, 0.1, -0.5, 0.7]])


def np_retrieval(student: np.ndarray, teacher: np.ndarray, heads: int, tau: float) -> np.ndarray:
    """softmax(LN(S) T^T / tau) LN(S), per head on channel slices (identity projections)."""
    q = v = np_ln(student)[0]
    out = np.zeros_like(q)
    width = q.shape[-1] // heads
    for h in range(heads):
        cols = slice(h * width, (h + 1) * width)
        attn = np_softmax(q[:, cols] @ teacher[0][:, cols].T / tau, axis=-1)
        out[:, cols] = attn @ v[:, cols]
    return out[None]


@pytest.mark.parametrize("heads", [1, 2])
def test_qsd_cls_and_feature_terms_by_hand(heads: int) -> None:
    tau, w_cls, w_feat = 2.0, 0.5, 3.0
    options = {
        "mask_patch": False,
        "temperature": tau,
        "num_heads": heads,
        "cls_weight": w_cls,
        "feature_weight": w_feat,
    }
    loss = build_loss("qsd", options, 4, 4)
    make_identity(loss)
    out = loss(features(S3, grid=(1, 3), cls=S_CLS), features(T3, grid=(1, 3), cls=T_CLS), None, images_for(1))

    pred_cls = np_ln(S_CLS)
    expected_cls = ((pred_cls - T_CLS) ** 2).mean()
    pred = np.concatenate([pred_cls[:, None], np_retrieval(S3, T3, heads, tau)], axis=1)
    target = np.concatenate([T_CLS[:, None], T3], axis=1)
    expected_feat = ((pred - target) ** 2).mean()

    assert set(out) == {"loss", "loss_cls", "loss_feat"}
    assert value(out, "loss_cls") == pytest.approx(w_cls * expected_cls, rel=1e-5)
    assert value(out, "loss_feat") == pytest.approx(w_feat * expected_feat, rel=1e-5)
    assert value(out, "loss") == pytest.approx(w_cls * expected_cls + w_feat * expected_feat, rel=1e-5)


def test_qsd_without_cls_token_leaves_it_out_of_the_feature_term() -> None:
    loss = build_loss("qsd", {"cls_token": False, "mask_patch": False}, 4, 4)
    make_identity(loss)
    out = loss(features(S3, grid=(1, 3), cls=S_CLS), features(T3, grid=(1, 3), cls=T_CLS), None, images_for(1))
    assert set(out) == {"loss", "loss_feat"}
    assert value(out, "loss_feat") == pytest.approx(((np_retrieval(S3, T3, 1, 1.0) - T3) ** 2).mean(), rel=1e-5)


def test_qsd_mask_term_by_hand() -> None:
    m = np.array([0.3, -0.9, 1.2, 0.6])
    student = StubStudent(S3, (1, 3), S_CLS)
    teacher = features(T3, grid=(1, 3), cls=T_CLS)

    # every patch masked: all queries and values are LN(m), so every token retrieves LN(m)
    loss = build_loss("qsd", {"cls_token": False, "feature": False, "mask_ratio": 1.0, "mask_probability": 1.0}, 4, 4)
    make_identity(loss)
    with torch.no_grad():
        loss.mask_token.copy_(torch.tensor(m))
    out = loss(features(S3, grid=(1, 3), cls=S_CLS), teacher, student, images_for(1))
    assert set(out) == {"loss", "loss_mask"}
    assert value(out, "loss_mask") == pytest.approx(((np_ln(m) - T3) ** 2).mean(), rel=1e-5)

    # nothing masked: the masked pass is the plain student, retrieved through its own head
    loss = build_loss("qsd", {"cls_token": False, "feature": False, "mask_ratio": 0.0}, 4, 4)
    make_identity(loss)
    out = loss(features(S3, grid=(1, 3), cls=S_CLS), teacher, student, images_for(1))
    assert value(out, "loss_mask") == pytest.approx(((np_retrieval(S3, T3, 1, 1.0) - T3) ** 2).mean(), rel=1e-5)


def test_qsd_vanishes_when_student_is_teacher() -> None:
    # Zero-mean, unit-variance, mutually orthogonal tokens: LN leaves them (almost) unchanged and, at a
    # low temperature, each token retrieves itself.
    tokens = np.array([[[1.0, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]])
    cls = np.array([[1.0, 1, -1, -1]])
    loss = build_loss("qsd", {"mask_patch": False, "temperature": 0.05}, 4, 4)
    make_identity(loss)
    out = loss(features(tokens, grid=(1, 3), cls=cls), features(tokens, grid=(1, 3), cls=cls), None, images_for(1))
    assert value(out, "loss") < 1e-8
    shuffled = features(tokens[:, [1, 2, 0]], grid=(1, 3), cls=cls)
    assert value(loss(shuffled, features(tokens, grid=(1, 3), cls=cls), None, images_for(1)), "loss") > 0.1


def test_qsd_builds_only_enabled_heads() -> None:
    loss = build_loss("qsd", {"mask_patch": False, "cls_token": False}, 32, 48)
    assert loss.mask_token is None
    assert set(loss.heads[0].keys()) == {"feature"}
    two = build_loss("qsd", {"student_layers": [5, -1], "teacher_layers": [11, -1]}, 32, 48)
    assert len(two.heads) == 2 and two.student_layers == (5, -1) and two.teacher_layers == (11, -1)


def test_qsd_needs_class_tokens_for_the_cls_term() -> None:
    loss = build_loss("qsd", {"mask_patch": False}, 4, 4)
    with pytest.raises(ValueError, match="teacher has no class token"):
        loss(features(S3, grid=(1, 3), cls=S_CLS), features(T3, grid=(1, 3)), None, images_for(1))


# ---------------------------------------------------------------------------------------------------
# Proteus


def test_proteus_by_hand() -> None:
    s = np.stack([S3[0], S3[0][::-1]])  # (2, 3, 4)
    t = np.stack([T3[0], T3[0] * 0.5])
    s_cls, t_cls = np.stack([S_CLS[0], -S_CLS[0]]), np.stack([T_CLS[0], T_CLS[0]])
    m = np.array([0.3, -0.9, 1.2, 0.6])
    options = {"mask_ratio": 1.0, "mask_probability": 0.5, "token_weight": 2.0, "feature_weight": 0.5}
    loss = build_loss("proteus", options, 4, 4)
    make_identity(loss)
    with torch.no_grad():
        loss.mask_token.copy_(torch.tensor(m))
    out = loss(
        features(s, grid=(1, 3), cls=s_cls), features(t, grid=(1, 3), cls=t_cls), StubStudent(s, (1, 3)), images_for(2)
    )
    expected_token = ((np_ln(s_cls) - t_cls) ** 2).mean()
    pred = np.concatenate([np_ln(s_cls)[:, None], np_ln(s)], axis=1)
    expected_feat = ((pred - np.concatenate([t_cls[:, None], t], axis=1)) ** 2).mean()
    expected_patch = ((np_ln(m) - t[0]) ** 2).mean()  # only the first image is masked, all of its patches
    assert value(out, "loss_token") == pytest.approx(2.0 * expected_token, rel=1e-5)
    assert value(out, "loss_feat") == pytest.approx(0.5 * expected_feat, rel=1e-5)
    assert value(out, "loss_patch") == pytest.approx(expected_patch, rel=1e-5)


def test_proteus_vanishes_when_student_is_teacher_and_patch_term_needs_masks() -> None:
    tokens = np.array([[[1.0, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]])
    cls = np.array([[1.0, 1, -1, -1]])
    loss = build_loss("proteus", {"patch_weight": 0.0}, 4, 4)
    make_identity(loss)
    out = loss(features(tokens, grid=(1, 3), cls=cls), features(tokens, grid=(1, 3), cls=cls), None, images_for(1))
    assert "loss_patch" not in out and value(out, "loss") < 1e-8
    unmasked = build_loss("proteus", {"mask_probability": 0.0}, 4, 4)
    out = unmasked(
        features(S3, grid=(1, 3), cls=S_CLS),
        features(T3, grid=(1, 3), cls=T_CLS),
        StubStudent(S3, (1, 3)),
        images_for(1),
    )
    assert value(out, "loss_patch") == 0.0


# ---------------------------------------------------------------------------------------------------
# MSE


def test_mse_by_hand_and_grid_alignment() -> None:
    s = np.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])  # 2x2 grid, 2 channels
    t = np.array([[[1.5, 2.0], [2.0, 4.0], [5.0, 7.0], [7.0, 6.0]]])
    loss = build_loss("mse", {"weight": 2.0}, 2, 2)
    make_identity(loss)
    out = loss(features(s, grid=(2, 2)), features(t, grid=(2, 2)), None, images_for(1))
    # squared differences: 0.25, 0, 1, 0, 0, 1, 0, 4 -> mean 6.25 / 8
    assert value(out, "loss_mse") == pytest.approx(2.0 * 6.25 / 8)
    assert value(loss(features(t, grid=(2, 2)), features(t, grid=(2, 2)), None, images_for(1)), "loss") == 0.0
    # a 1x1 student grid resamples to a constant 2x2 map
    single = np.array([[[2.0, 5.0]]])
    expected = ((np.array([2.0, 5.0]) - t) ** 2).mean()
    out = loss(features(single, grid=(1, 1)), features(t, grid=(2, 2)), None, images_for(1))
    assert value(out, "loss_mse") == pytest.approx(2.0 * expected)


# ---------------------------------------------------------------------------------------------------
# CWD


def np_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """s, t: (B, C, P) maps flattened over positions."""
    p_s, p_t = np_softmax(s / tau, axis=-1), np_softmax(t / tau, axis=-1)
    return tau**2 * (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()


def test_cwd_features_by_hand() -> None:
    s = np.array([[[0.5, 1.0], [2.0, -1.0], [0.0, 0.5], [1.5, 2.0]]])  # (B=1, N=4 on 2x2, C=2)
    t = np.array([[[1.0, 0.0], [0.5, 0.5], [2.0, 1.0], [0.0, 3.0]]])
    loss = build_loss("cwd", {"temperature": 2.0, "weight": 1.5}, 2, 2)
    make_identity(loss)
    out = loss(features(s, grid=(2, 2)), features(t, grid=(2, 2)), None, images_for(1))
    expected = np_cwd(s.transpose(0, 2, 1), t.transpose(0, 2, 1), 2.0)
    assert value(out, "loss_cwd") == pytest.approx(1.5 * expected, rel=1e-5)
    assert value(loss(features(t, grid=(2, 2)), features(t, grid=(2, 2)), None, images_for(1)), "loss") < 1e-6


def test_cwd_logits_by_hand_with_ignored_pixels() -> None:
    s = np.array([[[[0.5, 1.0, -0.5]], [[2.0, 0.0, 1.0]]]])  # (B=1, K=2, H=1, W=3)
    t = np.array([[[[1.0, -1.0, 0.0]], [[0.5, 1.5, 2.5]]]])
    loss = build_loss("cwd_logits", {"temperature": 4.0}, 32, 48, num_classes=2)
    s_t = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    out = loss(s_t, torch.tensor(t, dtype=torch.float32))
    assert value(out, "loss_cwd") == pytest.approx(3.0 * np_cwd(s[:, :, 0], t[:, :, 0], 4.0), rel=1e-5)
    ignore = torch.tensor([[[False, True, False]]])
    out = loss(s_t, torch.tensor(t, dtype=torch.float32), ignore)
    expected = 3.0 * np_cwd(s[:, :, 0][..., [0, 2]], t[:, :, 0][..., [0, 2]], 4.0)
    assert value(out, "loss_cwd") == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert s_t.grad[..., 1].abs().sum() == 0 and s_t.grad.abs().sum() > 0
    assert value(loss(s_t, s_t.detach()), "loss") < 1e-6


def test_logit_losses_check_shapes() -> None:
    loss = build_loss("vanilla_kd", {}, 32, 48, num_classes=3)
    with pytest.raises(ValueError, match="one shape"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="expected 3"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


# ---------------------------------------------------------------------------------------------------
# vanilla KD


def test_vanilla_kd_by_hand() -> None:
    # one image, 2 classes, 1x2 pixels; the second pixel is ignored
    s = torch.tensor([[[[1.0, 0.0]], [[-1.0, 2.0]]]], requires_grad=True)
    t = torch.tensor([[[[0.0, 3.0]], [[1.0, 0.0]]]])
    tau = 2.0
    loss = build_loss("vanilla_kd", {"temperature": tau, "weight": 0.5}, 32, 48)

    def kl(zs: list[float], zt: list[float]) -> float:
        qs = [math.exp(z / tau) / sum(math.exp(x / tau) for x in zs) for z in zs]
        qt = [math.exp(z / tau) / sum(math.exp(x / tau) for x in zt) for z in zt]
        return sum(b * math.log(b / a) for a, b in zip(qs, qt, strict=True))

    first, second = kl([1.0, -1.0], [0.0, 1.0]), kl([0.0, 2.0], [3.0, 0.0])
    out = loss(s, t)
    assert value(out, "loss_kd") == pytest.approx(0.5 * tau**2 * (first + second) / 2, rel=1e-5)
    out = loss(s, t, torch.tensor([[[False, True]]]))
    assert value(out, "loss_kd") == pytest.approx(0.5 * tau**2 * first, rel=1e-5)
    out["loss"].backward()
    assert s.grad[..., 1].abs().sum() == 0 and s.grad[..., 0].abs().sum() > 0
    assert value(loss(s, s.detach()), "loss") < 1e-7


# ---------------------------------------------------------------------------------------------------
# ViTKD


def test_vitkd_by_hand() -> None:
    s0 = np.array([[[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0], [0.0, 0.0]]])  # 2x2 grid, width 2
    t0 = np.array([[[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0], [1.0, -1.0]]])
    s1 = np.array([[[3.0, 1.0], [0.0, 1.0], [2.0, 2.0], [1.0, 0.0]]])
    t1 = np.array([[[0.5, -0.5], [1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]])
    m = np.array([0.7, -0.4])
    options = {"student_layers": [0, -1], "teacher_layers": [0, -1], "alpha": 0.1, "beta": 0.2, "mask_ratio": 1.0}
    loss = build_loss("vitkd", options, 2, 2)  # equal widths: identity projections, as in ViTKD
    make_identity(loss.generator)  # G(x) = ReLU(x)
    with torch.no_grad():
        loss.mask_token.copy_(torch.tensor(m))
    out = loss(features(s0, s1, grid=(2, 2)), features(t0, t1, grid=(2, 2)), None, images_for(1))
    expected_mimic = 0.1 * ((s0 - t0) ** 2).sum()
    expected_gen = 0.2 / 1.0 * ((np.maximum(m, 0) - t1) ** 2).sum()  # every token masked
    assert value(out, "loss_mimic") == pytest.approx(expected_mimic, rel=1e-5)
    assert value(out, "loss_gen") == pytest.approx(expected_gen, rel=1e-5)
    same = loss(features(t0, t1, grid=(2, 2)), features(t0, t1, grid=(2, 2)), None, images_for(1))
    assert value(same, "loss_mimic") == 0.0


def test_vitkd_generation_counts_masked_tokens_only() -> None:
    loss = build_loss("vitkd", {"student_layers": [-1], "teacher_layers": [-1], "mask_ratio": 0.5}, 2, 2)
    make_identity(loss.generator)
    with torch.no_grad():
        loss.mask_token.fill_(-5.0)  # ReLU(-5) = 0: masked tokens predict 0, visible ones themselves
    student, teacher = np.full((1, 4, 2), 3.0), np.ones((1, 4, 2))
    out = loss(features(student, grid=(2, 2)), features(teacher, grid=(2, 2)), None, images_for(1))
    # 2 of 4 tokens masked, each off by (1, 1); the visible ones (off by (2, 2)) do not count
    assert value(out, "loss_gen") == pytest.approx(3e-6 / 0.5 * 2 * 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Af-DCD


def test_af_dcd_by_hand() -> None:
    s = np.array([[[0.5, 1.0, 0.2, 0.8], [1.5, 0.1, 0.4, 0.3], [0.9, 0.6, 1.2, 0.0], [0.3, 0.7, 0.5, 1.1]]])
    t = np.array([[[0.4, 1.2, 0.0, 0.5], [1.0, 0.0, 0.9, 0.3], [0.2, 0.8, 1.0, 0.4], [0.6, 0.3, 0.1, 1.5]]])
    tau, lam_fd, lam_ctr = 0.5, 0.5, 2.0
    options = {
        "lambda_fd": lam_fd,
        "lambda_ctr": lam_ctr,
        "temperature": tau,
        "groups": 2,
        "pool_size": 1,
        "local_size": 2,
        "mask_ratio": 0.0,
    }
    loss = build_loss("af_dcd", options, 4, 4)
    make_identity(loss)  # align = identity; projector = ReLU = identity on these positive maps
    out = loss(features(s, grid=(2, 2)), features(t, grid=(2, 2)), None, images_for(1))
    assert value(out, "loss_fd") == pytest.approx(lam_fd * ((s - t) ** 2).sum(), rel=1e-5)

    # one 2x2 window; items (position p, group g) = 2-channel slices; negatives: other groups, any position
    items = [(p, g) for p in range(4) for g in range(2)]

    def vec(x: np.ndarray, p: int, g: int) -> np.ndarray:
        return x[0, p, 2 * g : 2 * g + 2]

    total_ce = 0.0
    for p, g in items:
        positive = -np.abs(vec(s, p, g) - vec(t, p, g)).sum() / tau
        negatives = [-np.abs(vec(s, p, g) - vec(t, q, h)).sum() / tau for q, h in items if h != g]
        total_ce += -positive + np.log(np.exp(positive) + np.exp(negatives).sum())
    assert value(out, "loss_ctr") == pytest.approx(lam_ctr * total_ce / 4, rel=1e-5)


def test_af_dcd_center_mask_hides_the_center() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(1, 9, 16)), rng.normal(size=(1, 9, 16))
    loss = build_loss("af_dcd", {"mask_mode": "center", "groups": 4}, 16, 16)
    base = value(loss(features(s, grid=(3, 3)), features(t, grid=(3, 3)), None, images_for(1)), "loss_fd")
    center, corner = s.copy(), s.copy()
    center[0, 4] += 10.0
    corner[0, 0] += 10.0
    assert value(loss(features(center, grid=(3, 3)), features(t, grid=(3, 3)), None, images_for(1)), "loss_fd") == (
        pytest.approx(base, rel=1e-6)
    )
    assert value(loss(features(corner, grid=(3, 3)), features(t, grid=(3, 3)), None, images_for(1)), "loss_fd") != (
        pytest.approx(base, rel=1e-3)
    )


# ---------------------------------------------------------------------------------------------------
# G2SD


def np_gelu(x: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x)


def np_smooth_l1(x: np.ndarray, beta: float) -> np.ndarray:
    return np.where(np.abs(x) < beta, 0.5 * x**2 / beta, np.abs(x) - 0.5 * beta)


@pytest.mark.parametrize("masked", [False, True])
def test_g2sd_by_hand(masked: bool) -> None:
    s = np.array([[[0.5, -1.0, 2.0], [1.5, 0.2, -0.3], [-2.0, 0.4, 1.0], [0.1, 0.1, 3.0]]])
    t = np.array([[[4.0, -1.0, 0.5], [0.0, 2.0, 1.0], [1.0, 1.0, -3.0], [2.0, 0.0, 0.5]]])
    m = np.array([1.0, -2.0, 0.5])
    options = {"decoder_dim": 3, "decoder_depth": 0, "decoder_heads": 1, "mask_ratio": 1.0 if masked else 0.0}
    loss = build_loss("g2sd", options, 3, 3)
    make_identity(loss)  # prediction = Linear(GELU(Linear(Linear(x)))) = GELU(x)
    with torch.no_grad():
        loss.mask_token.copy_(torch.tensor(m))
    out = loss(features(s, grid=(2, 2)), features(t, grid=(2, 2)), StubStudent(s, (2, 2)), images_for(1))
    student_in = np.broadcast_to(m, s.shape) if masked else s
    expected = np_smooth_l1(np_gelu(student_in) - np_ln(t, eps=1e-6), 2.0).mean()
    assert value(out, "loss_g2sd") == pytest.approx(expected, rel=1e-5)
