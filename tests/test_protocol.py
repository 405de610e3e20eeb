"""The GKD authors' protocol around the loss: every pixel reaches the encoder, patch-16 conversion of
patch-14 weights (timm's resampling), normalised EVA02 tokens, the released checkpoints' layouts, fresh QSD
heads and per-phase patch size / transforms in stage 1, repeated augmentation and the poly power."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from timm.layers import resample_patch_embed

from gkd.cli import main
from gkd.compress.config import OptimConfig
from gkd.compress.losses import build_loss
from gkd.compress.optim import lr_factor
from gkd.compress.sampling import ResumableSampler
from gkd.compress.trainer import Trainer
from gkd.data.base import to_sample
from gkd.data.transforms import ImageNetTransformConfig, build_imagenet_transform
from gkd.models.checkpoint import load_encoder
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.weights import WeightsMismatchError, load_weights
from gkd.models.zoo import create_backbone, with_patch_size
from gkd.utils.runtime import DistInfo
from tests.helpers.paths import TINY_RECIPE

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    module.load_state_dict({k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in state.items()})
    return module.eval()


@pytest.mark.parametrize("name", ["dinov2_vits14", "eva02_small"])
def test_patch14_model_at_512_uses_every_pixel(name):
    encoder = randomize(create_backbone(name, **TINY))
    head, layers = build_decoder(DecoderConfig(name="linear"), 32, 2, 3)
    segmentor = Segmentor(encoder, head, layers).eval()
    images = torch.rand(1, 3, 512, 512)
    edges = {"rows": (slice(None), slice(None), slice(504, None), slice(None))}
    edges["columns"] = (slice(None), slice(None), slice(None), slice(504, None))
    with torch.no_grad():
        reference = segmentor(images)
        for where in edges.values():
            changed = images.clone()
            changed[where] = 1 - changed[where]  # only the last 8 rows / columns differ
            assert (segmentor(changed) - reference).abs().max() > 1e-3
    assert segmentor.encoder(images).grid == (37, 37)


def patchwise_resize(images: torch.Tensor, patch: int, new_patch: int) -> torch.Tensor:
    """Each ``patch x patch`` tile resized alone to ``new_patch`` (bicubic, antialias: the resize timm's
    ``resample_patch_embed`` inverts), tiles put back on the same grid."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    tiles = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(-1, 1, patch, patch)
    tiles = F.interpolate(tiles, size=(new_patch, new_patch), mode="bicubic", antialias=True, align_corners=False)
    tiles = tiles.reshape(b, gh, gw, c, new_patch, new_patch).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(b, c, gh * new_patch, gw * new_patch)


@pytest.mark.parametrize("name", ["dinov2_vits14", "eva02_small"])
def test_patch16_conversion_matches_timm_and_keeps_the_features(tmp_path, name):
    original = randomize(create_backbone(name, **TINY))
    path = tmp_path / "weights.safetensors"
    save_file(original.model.state_dict(), str(path))
    converted = create_backbone(name, path, patch_size=16, **TINY).eval()
    assert converted.patch_size == 16
    expected = resample_patch_embed(original.model.patch_embed.proj.weight, [16, 16])  # timm's own function
    torch.testing.assert_close(converted.model.patch_embed.proj.weight, expected)
    torch.testing.assert_close(converted.model.pos_embed, original.model.pos_embed)  # same grid: not resampled
    # the same 16x16 token grid: 224 px at patch 14 vs each tile enlarged to 16 px (256 px) at patch 16
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        before = original(images, layers=(0, -1))
        after = converted(patchwise_resize(images, 14, 16), layers=(0, -1))
    assert after.grid == before.grid == (16, 16)
    for a, b in zip(after.patch_tokens + after.cls_tokens, before.patch_tokens + before.cls_tokens, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)
    # and the in-memory conversion (stage 1a -> 1b) gives the same weights as converting on load
    torch.testing.assert_close(with_patch_size(original, 16).model.state_dict(), converted.model.state_dict())


def test_patch_size_conversion_needs_asking_for(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(create_backbone("dinov2_vits14", **TINY).model.state_dict(), str(path))
    model = create_backbone("dinov2_vits14", patch_size=16, **TINY).model
    with pytest.raises(WeightsMismatchError, match="another patch size"):
        load_weights(model, path)
    report = load_weights(model, path, resample_patch=True)
    assert report.notes == ("patch embedding (14, 14) -> (16, 16) (timm resample_patch_embed)",)


@pytest.mark.parametrize("name", ["eva02_small", "dinov2_vits14"])
def test_tokens_are_final_normalised(name):
    backbone = create_backbone(name, **TINY).eval()
    norm = backbone.final_norm
    assert isinstance(norm, torch.nn.LayerNorm)
    if name.startswith("eva02"):
        assert isinstance(backbone.model.norm, torch.nn.Identity) and norm is backbone.model.fc_norm
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(0.5)
        features = backbone(torch.rand(2, 3, 56, 56), layers=(0, -1))
    for tokens in [*features.patch_tokens, *features.cls_tokens]:
        torch.testing.assert_close(tokens.mean(-1), torch.full(tokens.shape[:-1], 0.5), atol=1e-4, rtol=0)
        torch.testing.assert_close(tokens.std(-1, correction=0), torch.full(tokens.shape[:-1], 2.0), atol=1e-2, rtol=0)


@pytest.mark.parametrize(("prefix", "wrapper"), [("student.backbone.", "model"), ("backbone.", "state_dict")])
def test_released_gkd_checkpoints_load_into_the_student(tmp_path, prefix, wrapper):
    """The GKD code's stage-1 checkpoint (``model`` / ``student.backbone.*``, DINOv2-code names, with the teacher
    and the QSD heads beside) and its mmseg task-learning checkpoint (``state_dict`` / ``backbone.*``)."""
    student = randomize(create_backbone("deit_small", img_size=64, **TINY))
    state = {f"{prefix}{key}": value for key, value in student.model.state_dict().items()}
    state[f"{prefix}mask_token"] = torch.zeros(1, 32)  # the DINOv2 code's student has one
    state["teacher.backbone.pos_embed"] = torch.zeros(1, 5, 48)
    state["decode_head.conv_seg.weight"] = torch.zeros(19, 32, 1, 1)
    path = tmp_path / "gkd_release.pth"
    torch.save({wrapper: state, "epoch": 299}, path)
    loaded = create_backbone("deit_small", path, img_size=64, **TINY)
    torch.testing.assert_close(loaded.model.state_dict(), student.model.state_dict())


def test_zoo_lists_the_tiny_and_dino_students(capsys):
    assert main(["zoo"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["deit_tiny"][3] == "deit_tiny_patch16_224"
    assert rows["dino_vits16"][2:4] == ["dino", "vit_small_patch16_224.dino"]
    assert rows["dino_vitb16"][2:4] == ["dino", "vit_base_patch16_224.dino"]


def test_imagenet_transform_is_timms():
    config = ImageNetTransformConfig(input_size=32)
    transform = build_imagenet_transform(config)
    names = [type(step).__name__ for step in transform.pipeline.transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[-1] == "RandomErasing"
    image = (torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()
    sample = transform(to_sample(image, image[..., 0], "x.png"))
    assert sample["image"].shape == (3, 32, 32) and "label" not in sample
    bare = build_imagenet_transform(ImageNetTransformConfig(input_size=32, auto_augment=None, re_prob=0.0))
    assert "RandAugment" not in [type(step).__name__ for step in bare.pipeline.transforms]


def test_repeated_augmentation_uses_timms_sampler_with_one_seed_per_copy():
    sampler = ResumableSampler(10, seed=0, info=DistInfo(rank=0, world_size=1, local_rank=0), repeats=3)
    drawn = list(sampler)
    indices = [index for index, _ in drawn]
    assert len(drawn) == 10 and indices[:3] == [indices[0]] * 3  # timm keeps the epoch length, copies in a row
    assert len({seed for _, seed in drawn[:3]}) == 3
    plain = list(ResumableSampler(10, seed=0, info=DistInfo(rank=0, world_size=1, local_rank=0)))
    assert sorted(index for index, _ in plain) == list(range(10))


def test_poly_power():
    config = OptimConfig(steps=100, schedule="poly", poly_power=0.9)
    assert lr_factor(50, config) == pytest.approx(0.5**0.9)
    assert lr_factor(50, OptimConfig(steps=100, schedule="poly")) == pytest.approx(0.5)


@pytest.mark.slow
def test_stages_follow_the_authors(tmp_path, monkeypatch):
    """1a at patch 14 on timm-augmented crops with repeated augmentation, 1b back at patch 16 with fresh QSD
    heads and the student carried over, the saved encoder at the recipe's patch 16; stage 2 validated every 3
    steps, with the best and the last checkpoints both evaluated."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(TINY_RECIPE),
                "models": {"teacher": {"patch_size": 16}, "student": {"patch_size": 16}},
                "data": {"proxy_transform": {"input_size": 56}, "distill_transform": {"input_size": 112}},
                "distill": {"task_agnostic_patch_size": 14, "task_agnostic": {"repeated_augmentation": 3}},
                "head": {"schedule": "poly", "poly_power": 0.9, "validate_every": 3},
            }
        )
    )
    out = tmp_path / "run"
    assert main(["train-teacher", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    records, original = {}, Trainer.fit

    def recording(self):
        objective = self.objective
        batch = next(iter(self.loader))
        start = {k: v.clone() for k, v in objective.loss.state_dict().items()}
        student_start = {k: v.clone() for k, v in objective.student.model.state_dict().items()}
        result = original(self)
        records[self.name] = {
            "image": tuple(batch["image"].shape[-2:]),
            "patch": (objective.student.patch_size, objective.teacher.patch_size),
            "loss_start": start,
            "loss_end": {k: v.clone() for k, v in objective.loss.state_dict().items()},
            "student_start": student_start,
            "student_end": objective.student,
            "sampler_repeats": self.sampler.repeats,
        }
        return result

    monkeypatch.setattr(Trainer, "fit", recording)
    assert main(["distill", "--out", str(out), "--device", "cpu"]) == 0
    task, domain = records["distill_task_agnostic"], records["distill_domain_agnostic"]
    assert (task["image"], task["patch"], task["sampler_repeats"]) == ((56, 56), (14, 14), 3)
    assert (domain["image"], domain["patch"], domain["sampler_repeats"]) == ((112, 112), (16, 16), 1)
    # fresh heads in 1b: not 1a's trained ones, but what a newly built, seeded loss starts from
    torch.manual_seed(0 + 3 + 1)
    fresh = build_loss("qsd", {}, 32, 48, 8).state_dict()
    torch.testing.assert_close(domain["loss_start"], fresh)
    assert not torch.equal(domain["loss_start"]["mask_token"], task["loss_end"]["mask_token"])
    # the student goes on from where 1a left it, converted back to patch 16
    carried = with_patch_size(task["student_end"], 16).model.state_dict()
    torch.testing.assert_close(domain["student_start"], carried)
    saved = load_encoder(out / "student_encoder.safetensors")
    assert saved.patch_size == 16 and timm.models.get_pretrained_cfg(saved.timm_arch) is not None

    monkeypatch.setattr(Trainer, "fit", original)
    assert main(["train-head", "--out", str(out), "--device", "cpu"]) == 0
    history = [json.loads(line) for line in (out / "logs" / "head_validation.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history] == [3, 6]
    assert set(history[0]["miou"]) == {"source", "dusk", "fog"}
    assert (out / "segmentor_best.safetensors").is_file()
    assert main(["evaluate", "--out", str(out), "--device", "cpu"]) == 0
    models = json.loads((out / "eval.json").read_text())["models"]
    best = max(history, key=lambda entry: entry["mean_target_miou"])
    assert models["student_best"]["domains"]["fog"]["miou"] == pytest.approx(best["miou"]["fog"])
    assert models["student"]["domains"]["fog"]["miou"] == pytest.approx(history[-1]["miou"]["fog"])
