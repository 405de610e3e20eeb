"""Mask2Former head: the matcher and the set loss on a hand-computed 2-query, 2-class case, the pixel
decoder's deformable attention against a direct bilinear computation, the raw-token taps, ONNX export."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from gkd.cli import main
from gkd.compress.losses import build_loss
from gkd.compress.objectives import JointObjective
from gkd.export.runtimes import ReusedHostConstants
from gkd.models.backbone import Backbone
from gkd.models.checkpoint import load_segmentor
from gkd.models.decoders import DecoderConfig, build_decoder, default_layers
from gkd.models.mask2former import (
    Mask2FormerCriterion,
    QueryOutputs,
    label_map_targets,
    mask2former_config,
    semantic_scores,
)
from gkd.models.segmentor import Segmentor
from tests.helpers.paths import RECIPES_DIR, TINY_MASK2FORMER

# The four pixel centres of a 2x2 map as (x, y) in [0, 1], in row-major pixel order.
CENTRES = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])


def tiny_config(points: int = 4):
    return mask2former_config(num_classes=2, channels=32, queries=2, encoder_layers=1, decoder_layers=1, points=points)


@pytest.fixture
def points_at_pixel_centres(monkeypatch):
    """The matcher's and the loss's random points become the 2x2 pixel centres, cycled, so that every sampled
    value is a pixel's exact value and the losses can be computed by hand."""

    def centres(*size, device=None, **_):
        *lead, count, _two = size[0] if len(size) == 1 else size
        return CENTRES[torch.arange(count) % 4].expand(*lead, count, 2).clone()

    monkeypatch.setattr(torch, "rand", centres)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(logit: float, target: float) -> float:
    return softplus(-logit) if target else softplus(logit)


def dice(logits: list[float], targets: list[float]) -> float:
    probabilities = [sigmoid(v) for v in logits]
    overlap = 2 * sum(p * t for p, t in zip(probabilities, targets, strict=True))
    return 1 - (overlap + 1) / (sum(probabilities) + sum(targets) + 1)


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


# Image A: left column class 0, right column class 1; image B: class 1 everywhere. Pixels row-major.
LABELS = torch.tensor([[[0, 1], [0, 1]], [[1, 1], [1, 1]]])
TARGETS = {0: {0: [1, 0, 1, 0], 1: [0, 1, 0, 1]}, 1: {1: [1, 1, 1, 1]}}
MASK_LOGITS = [
    [[-2.0, 1.5, -1.0, 3.0], [2.5, -0.5, 1.0, -2.0]],  # A: query 0 looks like class 1, query 1 like class 0
    [[0.5, 2.0, 1.5, 1.0], [-1.0, -2.0, 0.3, -0.5]],  # B: query 0 covers the image, query 1 does not
]
CLASS_LOGITS = [
    [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]],  # A: the class scores alone would match the other way round
    [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]],  # B: query 1 is sure of class 1, query 0 says "no object"
]


def hand_cost(image: int, query: int, target_class: int) -> float:
    """2 * (-p_class) + 5 * mean BCE + 5 * dice over the four pixels."""
    logits, target = MASK_LOGITS[image][query], TARGETS[image][target_class]
    mean_bce = sum(bce(v, t) for v, t in zip(logits, target, strict=True)) / 4
    return -2 * softmax(CLASS_LOGITS[image][query])[target_class] + 5 * mean_bce + 5 * dice(logits, target)


def as_outputs() -> QueryOutputs:
    masks = torch.tensor(MASK_LOGITS).reshape(2, 2, 2, 2)
    return QueryOutputs(class_logits=[torch.tensor(CLASS_LOGITS)], mask_logits=[masks])


def test_label_map_targets_skip_ignored_pixels():
    classes, masks = label_map_targets(torch.tensor([[[0, 255], [2, 2]]]))
    assert classes[0].tolist() == [0, 2]
    assert masks[0].tolist() == [[[1, 0], [0, 0]], [[0, 0], [1, 1]]]


def test_matcher_takes_the_hand_computed_cheapest_assignment(points_at_pixel_centres):
    criterion = Mask2FormerCriterion(tiny_config())
    outputs = as_outputs()
    classes, masks = label_map_targets(LABELS)
    indices = criterion.hf_loss.matcher(outputs.mask_logits[0], outputs.class_logits[0], masks, classes)
    # Image A: the swapped assignment (query 0 -> class 1) costs less than the identity, by hand.
    identity = hand_cost(0, 0, 0) + hand_cost(0, 1, 1)
    swapped = hand_cost(0, 0, 1) + hand_cost(0, 1, 0)
    assert swapped < identity
    assert dict(zip(indices[0][0].tolist(), indices[0][1].tolist(), strict=True)) == {0: 1, 1: 0}
    # Image B: one target (class 1); query 0's mask wins over query 1's confident class.
    assert hand_cost(1, 0, 1) < hand_cost(1, 1, 1)
    assert (indices[1][0].tolist(), indices[1][1].tolist()) == ([0], [0])


def test_set_loss_matches_the_hand_computation(points_at_pixel_centres):
    criterion = Mask2FormerCriterion(tiny_config())
    losses = criterion(as_outputs(), LABELS)
    # Class loss: CE over all four queries; matched queries target their class, B's query 1 "no object" (x 0.1).
    terms = [(0, 0, 1, 1.0), (0, 1, 0, 1.0), (1, 0, 1, 1.0), (1, 1, 2, 0.1)]
    ce = sum(w * -math.log(softmax(CLASS_LOGITS[i][q])[c]) for i, q, c, w in terms) / sum(t[3] for t in terms)
    # Mask losses per matched mask on 4 points: the most uncertain pixel (min |logit|) 3 times + pixel 0.
    bce_sum = dice_sum = 0.0
    for image, query, target_class in [(0, 0, 1), (0, 1, 0), (1, 0, 1)]:
        logits, target = MASK_LOGITS[image][query], TARGETS[image][target_class]
        uncertain = min(range(4), key=lambda p: abs(logits[p]))
        picked = [uncertain] * 3 + [0]
        bce_sum += sum(bce(logits[p], target[p]) for p in picked) / 4
        dice_sum += dice([logits[p] for p in picked], [target[p] for p in picked])
    num_masks = 3
    assert losses["loss_class"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(bce_sum / num_masks, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice_sum / num_masks, rel=1e-5)
    expected = 2 * ce + 5 * bce_sum / num_masks + 5 * dice_sum / num_masks
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    # Deep supervision: every layer's outputs add their own loss.
    twice = QueryOutputs(class_logits=as_outputs().class_logits * 2, mask_logits=as_outputs().mask_logits * 2)
    assert criterion(twice, LABELS)["loss"].item() == pytest.approx(2 * expected, rel=1e-5)


def test_semantic_scores_sum_class_probabilities_over_query_masks():
    class_logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 1.0, -1.0]]])
    mask_logits = torch.tensor([[[[0.5]], [[-1.5]]]])
    scores = semantic_scores(class_logits, mask_logits)[0, :, 0, 0]
    p0, p1 = softmax([2.0, 0.0, 1.0]), softmax([0.0, 1.0, -1.0])
    for k in range(2):
        assert scores[k].item() == pytest.approx(p0[k] * sigmoid(0.5) + p1[k] * sigmoid(-1.5), rel=1e-6)


def direct_deformable_attention(attention, queries, positions, reference, shapes) -> torch.Tensor:
    """Deformable DETR's multi-scale deformable attention written out point by point: each head's value at
    ``reference + offset / (W, H)`` by explicit bilinear interpolation (pixel centres at (i + 0.5) / W,
    zero outside the map), weighted by the softmax over levels x points, then the output projection."""
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    batch, count, width = queries.shape
    head_dim = width // heads
    with torch.no_grad():
        value = attention.value_proj(queries).view(batch, count, heads, head_dim)
        offsets = attention.sampling_offsets(queries + positions).view(batch, count, heads, levels, points, 2)
        weights = attention.attention_weights(queries + positions).view(batch, count, heads, levels * points)
        weights = weights.softmax(-1).view(batch, count, heads, levels, points)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(levels)]
    output = torch.zeros(batch, count, heads, head_dim)
    for b in range(batch):
        for q in range(count):
            for h in range(heads):
                for level, (height, width_l) in enumerate(shapes):
                    for p in range(points):
                        x = (reference[b, q, level, 0] + offsets[b, q, h, level, p, 0] / width_l) * width_l - 0.5
                        y = (reference[b, q, level, 1] + offsets[b, q, h, level, p, 1] / height) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < height and 0 <= xx < width_l:
                                corner = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                sampled = value[b, starts[level] + yy * width_l + xx, h]
                                output[b, q, h] += weights[b, q, h, level, p] * corner * sampled
    with torch.no_grad():
        return attention.output_proj(output.reshape(batch, count, width))


def test_pixel_decoder_deformable_attention_matches_a_direct_computation():
    torch.manual_seed(0)
    head, _ = build_decoder(
        DecoderConfig(name="mask2former", channels=32, queries=4, pixel_decoder_layers=1, decoder_layers=1), 32, 4, 3
    )
    attention = head.pixel_decoder.encoder.layers[0].self_attn
    with torch.no_grad():  # offsets large enough to leave the maps (zero padding) and to cross pixels
        attention.sampling_offsets.weight.normal_(0, 0.5)
        attention.attention_weights.weight.normal_(0, 0.5)
    shapes = [(3, 4), (2, 3), (1, 2)]
    count = sum(h * w for h, w in shapes)
    queries, positions = torch.randn(2, count, 32), torch.randn(2, count, 32)
    reference = torch.rand(2, count, 3, 2)
    with torch.no_grad():
        output, _ = attention(
            queries,
            encoder_hidden_states=queries,
            position_embeddings=positions,
            reference_points=reference,
            spatial_shapes_list=shapes,
        )
    expected = direct_deformable_attention(attention, queries, positions, reference, shapes)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def tiny_segmentor() -> Segmentor:
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True, "img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2}
    backbone = Backbone("tiny", "vit_small_patch16_224", kwargs, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    config = DecoderConfig(name="mask2former", channels=32, queries=6, pixel_decoder_layers=1, decoder_layers=2)
    return Segmentor(backbone, *build_decoder(config, 32, 4, 3)).eval()


def test_authors_taps_are_raw_block_outputs():
    assert default_layers(12, "mask2former") == (3, 5, 7, 11)
    assert default_layers(24, "mask2former") == (7, 11, 15, 23)
    segmentor = tiny_segmentor()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        raw = segmentor.encode(images)
        normalised = segmentor.encoder(images, layers=segmentor.layers)
        assert not torch.allclose(raw.patch_tokens[0], normalised.patch_tokens[0])
        torch.testing.assert_close(segmentor.encoder.normalise(raw).patch_tokens[0], normalised.patch_tokens[0])


def test_the_heads_host_made_constants_are_reused_so_a_cuda_graph_can_capture_it():
    """transformers' pixel decoder builds its feature shapes with ``torch.tensor(list, device=...)`` in every
    forward, a host-to-device copy a CUDA graph cannot record; the graph runtime's `ReusedHostConstants` makes
    them once during warm-up and hands the same tensors to the captured call. (Checked here on CPU, where the
    same calls pass through the mode.)"""
    segmentor, images = tiny_segmentor(), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = segmentor(images)
        constants = ReusedHostConstants(torch.device("cpu"))
        with constants:
            first = segmentor(images)
            made = constants.made
            kept = {key: tensor.clone() for key, tensor in constants.tensors.items()}
            second = segmentor(images)
    assert made >= 2  # the pixel decoder's spatial shapes and each deformable layer's offset normaliser
    assert constants.made == made  # the second (captured) call makes none: every one is found again
    assert all(torch.equal(constants.tensors[key], tensor) for key, tensor in kept.items())
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_reused_constants_never_return_another_value():
    constants = ReusedHostConstants(torch.device("cpu"))
    with constants:
        a = torch.tensor([[16, 16], [8, 8]], dtype=torch.long, device="cpu")
        b = torch.tensor([[16, 16], [8, 8]], dtype=torch.long, device="cpu")
        c = torch.tensor([[16, 16], [8, 9]], dtype=torch.long, device="cpu")
        d = torch.tensor([[16, 16], [8, 8]], dtype=torch.float32, device="cpu")
        host = torch.tensor([1, 2])  # no device named: not a device constant
        # two 0-d tensors that print alike: their values, not their printed form, must decide
        close = [torch.tensor(1.0 + 1e-9, dtype=torch.float64), torch.tensor(1.0 + 2e-9, dtype=torch.float64)]
        from_tensors = [torch.tensor([value], dtype=torch.float64, device="cpu") for value in close]
    assert a is b and c.tolist() == [[16, 16], [8, 9]] and d.dtype == torch.float32 and d is not a
    assert constants.made == 3 and host.device.type == "cpu"  # a, c, d; the host tensor is left alone
    assert repr(close[0]) == repr(close[1]) and from_tensors[1].item() - from_tensors[0].item() == pytest.approx(1e-9)


def test_one_stage_feature_distillation_feeds_the_loss_normalised_tokens():
    """The joint schedule takes raw taps for Mask2Former and hands the distillation loss the ViT's normalised
    tokens, as every other decoder's run does; the set loss and the distillation loss both train the student."""
    segmentor = tiny_segmentor().train()
    teacher = tiny_segmentor().encoder
    loss = build_loss("mse", {}, 32, 32)
    objective = JointObjective(segmentor, loss, teacher, weight=1.0, teacher_dtype=torch.float32)
    seen = {}
    original = loss.forward

    def recording(student_features, *args):
        seen["tokens"] = student_features.patch_tokens[-1].detach()
        return original(student_features, *args)

    loss.forward = recording
    images, labels = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    outputs = objective({"image": images, "label": labels})
    outputs["loss"].backward()
    expected = segmentor.encoder(images, layers=loss.student_layers).patch_tokens[-1]
    torch.testing.assert_close(seen["tokens"], expected.detach())
    assert {"loss_class", "loss_mask", "loss_dice", "distill_loss"} <= set(outputs)
    assert segmentor.encoder.model.blocks[0].attn.qkv.weight.grad is not None


def test_camvid_head_comparison_recipe_plans_both_heads_without_a_teacher(tmp_path):
    from gkd.compare import plan
    from gkd.recipe import load_recipe

    recipe = load_recipe(RECIPES_DIR / "camvid_day2dusk_mask2former.yaml")
    jobs = plan(recipe, tmp_path, methods=["no_kd", "no_kd_mask2former"])
    assert [(job.method, job.seed) for job in jobs] == [
        (method, seed) for method in ("no_kd", "no_kd_mask2former") for seed in (0, 1, 2)
    ]
    decoders = {job.method: job.recipe.models.decoder for job in jobs}
    assert decoders["no_kd"].name == "uper"
    assert (decoders["no_kd_mask2former"].name, decoders["no_kd_mask2former"].points) == ("mask2former", 1296)
    assert {job.recipe.compare.no_kd.steps for job in jobs} == {150}


@pytest.mark.slow
def test_tiny_mask2former_recipe_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(TINY_MASK2FORMER), "--out", str(out), "--device", "cpu"]) == 0
    segmentor, metadata = load_segmentor(out / "segmentor.safetensors")
    assert metadata["decoder"]["name"] == "mask2former" and segmentor.layers == (0, 1, 2, 3)
    report = json.loads((out / "report.json").read_text())
    for model in ("teacher", "no_kd", "student"):
        assert set(report["models"][model]["miou"]) == {"source", "dusk", "fog"}
    artifacts = report["export"]["artifacts"]
    assert artifacts["onnx/fp32"]["ops"]["GridSample"] == 3  # deformable attention, one per level, no custom op
    assert artifacts["onnx/fp32"]["parity"]["max_abs_diff"] < 1e-3
    assert artifacts["onnx/int8"]["parity"]["argmax_agreement"] > 0.5
    assert {"torch/fp32", "onnxruntime/fp32", "onnxruntime/int8"} <= set(report["benchmark"]["runtimes"])
