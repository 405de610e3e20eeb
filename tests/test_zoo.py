"""The zoo: specs against timm, full-size parameter counts, grids at 512/518, names, recipe config, and the
saved student encoder loading back into a plain timm model."""

import json

import pytest
import timm
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gkd.models.backbone import Backbone
from gkd.models.checkpoint import load_encoder, save_encoder
from gkd.models.zoo import (
    SPECS,
    ModelConfig,
    count_params,
    create_backbone,
    create_backbone_from_config,
    format_zoo_table,
    zoo_rows,
)

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def randomize(backbone: Backbone, seed: int = 0) -> Backbone:
    generator = torch.Generator().manual_seed(seed)
    state = backbone.model.state_dict()
    backbone.model.load_state_dict({k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in state.items()})
    return backbone.eval()


def vit_params(width: int, depth: int, patch: int, img: int, registers: int, layer_scale: bool) -> int:
    """Parameters of a pre-norm ViT backbone (no head), counted by hand: patch conv, class/register tokens,
    position embedding (DINOv2 with registers has no class slot), blocks, final norm."""
    tokens = (img // patch) ** 2 + (0 if registers else 1)
    block = 2 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width
    block += (4 * width * width + 4 * width) + (4 * width * width + width) + (2 * width if layer_scale else 0)
    return (3 * patch * patch * width + width) + width + registers * width + tokens * width + depth * block + 2 * width


@pytest.mark.parametrize("name", list(SPECS))
def test_spec_matches_its_timm_architecture(name):
    spec = SPECS[name]
    with torch.device("meta"):
        model = timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs())
    config = timm.models.get_pretrained_cfg(spec.arch)
    assert (tuple(config.mean), tuple(config.std)) == (spec.mean, spec.std)
    assert config.input_size[-1] == spec.img_size
    assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size)
    assert (model.embed_dim, len(model.blocks)) == (spec.embed_dim, spec.depth)
    assert model.num_prefix_tokens == 1 + spec.num_registers


@pytest.mark.parametrize(
    ("name", "width", "depth", "model_card"),
    [
        ("dinov2_vits14", 384, 12, 22.1),
        ("dinov2_vitb14", 768, 12, 86.6),
        ("dinov2_vitl14", 1024, 24, 304.4),
        ("dinov2_vitl14_reg", 1024, 24, 304.4),
        ("deit_small", 384, 12, 22.1),
        ("deit_base", 768, 12, 86.6),
    ],
)
def test_full_size_parameter_counts(name, width, depth, model_card):
    """timm on the meta device = the count by hand = timm's model card ("Params (M)", which counts DeiT's
    1000-class head; our backbones have none)."""
    spec = SPECS[name]
    expected = vit_params(
        width, depth, spec.patch_size, spec.img_size, spec.num_registers, layer_scale=spec.family == "dinov2"
    )
    assert count_params(spec.arch, spec.timm_kwargs()) == expected
    head = 1000 * width + 1000 if spec.family == "deit" else 0
    assert round((expected + head) / 1e6, 1) == model_card


def test_zoo_rows_and_table(tmp_path, monkeypatch):
    (tmp_path / "deit_small.safetensors").write_bytes(b"")
    (tmp_path / "dinov2_vitl14").mkdir()
    (tmp_path / "dinov2_vitl14" / "config.json").write_text("{}")
    monkeypatch.setenv("GKD_WEIGHTS_DIR", str(tmp_path))
    rows = {row["name"]: row for row in zoo_rows({"eva02_base": "/models/eva02_b.pt"})}
    assert list(rows) == list(SPECS)
    assert rows["dinov2_vitl14"] == {
        "name": "dinov2_vitl14",
        "arch": "vit_large_patch14_dinov2",
        "role": "teacher",
        "family": "dinov2",
        "params_m": 304.37,
        "patch_size": 14,
        "embed_dim": 1024,
        "depth": 24,
        "img_size": 518,
        "weights": str(tmp_path / "dinov2_vitl14"),
        "notes": "DINOv2 ViT-L/14 (LVD-142M)",
    }
    assert rows["deit_small"]["weights"] == str(tmp_path / "deit_small.safetensors")
    assert rows["eva02_base"]["weights"] == "/models/eva02_b.pt"
    assert rows["dinov2_vitb14"]["role"] == "teacher/student"
    assert rows["eva02_small"]["weights"] is None
    table = format_zoo_table(list(rows.values())).splitlines()
    assert table[0].split()[:4] == ["name", "role", "family", "timm"]
    assert len(table) == 2 + len(SPECS)
    assert table[2].split()[-1] == "-"
    assert "85.80" in table[-1]  # deit_base


@pytest.mark.parametrize(
    ("name", "size", "grid", "patch_size"),
    [
        ("dinov2_vits14_reg", 512, (37, 37), None),  # 512 is stretched to 518: no pixel dropped
        ("dinov2_vits14_reg", 518, (37, 37), None),
        ("eva02_small", 512, (37, 37), None),
        ("deit_small", 512, (32, 32), None),
        ("dinov2_vits14_reg", 512, (32, 32), 16),  # GKD's patch-16 conversion: an exact 32x32 grid at 512
        ("eva02_small", 512, (32, 32), 16),
    ],
)
def test_grids_through_backbone_forward(name, size, grid, patch_size):
    backbone = create_backbone(name, patch_size=patch_size, **TINY).eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, size, size), layers=(0, -1))
    assert features.grid == grid
    assert [tuple(t.shape) for t in features.patch_tokens] == [(1, grid[0] * grid[1], 32)] * 2
    assert features.cls.shape == (1, 32)


def test_spec_and_timm_names():
    backbone = create_backbone("eva02_small", img_size=56, **TINY)
    assert (backbone.timm_arch, backbone.patch_size, backbone.embed_dim) == ("eva02_small_patch14_224", 14, 32)
    assert backbone.mean.flatten().tolist() == pytest.approx(SPECS["eva02_small"].mean)
    plain = create_backbone("vit_small_patch16_224", img_size=64, **TINY)  # any timm ViT, its own mean/std
    assert plain.mean.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert plain.timm_kwargs == {"dynamic_img_size": True, "num_classes": 0, "img_size": 64, **TINY}
    with pytest.raises(ValueError, match=r"dinov2_vits14.*any timm ViT name also works"):
        create_backbone("dinov2_vits16")
    with pytest.raises(ValueError, match=r"timm model but not a ViT"):
        create_backbone("resnet18")


def test_model_config(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="unknown model 'dinov3_vitl16'"):
        ModelConfig(name="dinov3_vitl16")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ModelConfig(name="deit_small", pretrained=True)
    reference = randomize(create_backbone("deit_small", img_size=64, **TINY))
    save_file(reference.model.state_dict(), str(tmp_path / "deit_small.safetensors"))
    monkeypatch.setenv("GKD_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    config = ModelConfig(name="deit_small", weights="deit_small.safetensors", kwargs={"img_size": 64, **TINY})
    assert config.weights == tmp_path / "deit_small.safetensors"  # found in $GKD_WEIGHTS_DIR
    backbone = create_backbone_from_config(config)
    torch.testing.assert_close(backbone.model.state_dict(), reference.model.state_dict())
    with pytest.raises(FileNotFoundError, match=r"elsewhere\.pth"):
        create_backbone_from_config(ModelConfig(name="deit_small", weights="elsewhere.pth"))


@pytest.mark.parametrize("name", ["deit_small", "dinov2_vits14_reg", "eva02_small"])
def test_saved_encoder_loads_into_plain_timm(tmp_path, name):
    student = randomize(create_backbone(name, img_size=112, **TINY))
    path = tmp_path / "student_encoder.safetensors"
    save_encoder(student, path, {"recipe_model": {"name": name}})
    assert [p.name for p in tmp_path.iterdir()] == ["student_encoder.safetensors"]  # atomic: no temp files left

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    arch, kwargs = json.loads(metadata["arch"]), json.loads(metadata["timm_kwargs"])
    assert (arch, json.loads(metadata["recipe_model"])) == (SPECS[name].arch, {"name": name})
    plain = timm.create_model(arch, **kwargs).eval()  # plain timm, no gkd code
    plain.load_state_dict(load_file(str(path)), strict=True)
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(images), student.model.forward_features(images))
        loaded = load_encoder(path).eval()
        expected, actual = student(images, layers=(0, 1)), loaded(images, layers=(0, 1))
    assert (loaded.name, loaded.timm_arch) == (name, SPECS[name].arch)
    for a, b in zip(actual.patch_tokens + actual.cls_tokens, expected.patch_tokens + expected.cls_tokens, strict=True):
        assert torch.equal(a, b)


def test_loading_an_encoder_leaves_the_random_state_alone(tmp_path):
    """train-head loads the distilled encoder after seeding its head: the load must not draw random numbers."""
    path = tmp_path / "encoder.safetensors"
    save_encoder(create_backbone("deit_small", img_size=64, **TINY), path)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    load_encoder(path)
    assert torch.equal(torch.rand(4), expected)


def test_conv_stem_vit(tmp_path):
    """vit_convstem16: four 3x3 stride-2 convolutions instead of the patchify stem, a stride-16 token grid, saved
    and loaded like any timm ViT; its patch size cannot be changed."""
    backbone = create_backbone("vit_convstem16", img_size=[64, 96], **TINY).eval()
    stem = backbone.model.patch_embed.backbone
    assert [conv.conv.stride for conv in stem] == [(2, 2)] * 4
    assert [conv.conv.out_channels for conv in stem] == [4, 8, 16, 32]  # embed_dim // 8, // 4, // 2, embed_dim
    assert backbone.patch_size == 16
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 72, 100), layers=(-1,))  # stretched up to 80 x 112: 5 x 7 tokens
    assert features.grid == (5, 7) and tuple(features.patch_tokens[0].shape) == (2, 35, 32)
    path = tmp_path / "encoder.safetensors"
    save_encoder(backbone, path)
    loaded = load_encoder(path).eval()
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).patch_tokens[0], backbone(images).patch_tokens[0])
    with pytest.raises(ValueError, match="patch size cannot be changed"):
        create_backbone("vit_convstem16", patch_size=14, **TINY)
