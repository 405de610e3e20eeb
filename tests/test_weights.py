"""Loading local checkpoints of every supported layout into timm models.

Each test builds a tiny reference model with random weights, rewrites its timm state dict into another
layout with the explicit mappings below (written from transformers' conversion scripts and the official
DINOv2 / EVA02 key names, independently of `gkd.models.weights`), loads it back and compares tensors and
features with the reference.
"""

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from gkd.models.weights import WeightsMismatchError, load_weights, read_state_dict

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0, "dynamic_img_size": True}

# timm block keys -> transformers keys (after "encoder.layer.N."), for Dinov2Model and ViTModel/DeiTModel.
DINOV2_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
}
VIT_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HF_EMBEDDINGS = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "dist_token": "embeddings.distillation_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def tiny_model(arch: str, img_size: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny timm model with every tensor random (norms and layer scales too, so swapped keys show)."""
    model = timm.create_model(arch, pretrained=False, img_size=img_size, **{**TINY, **kwargs})
    generator = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()})
    return model.eval()


def assert_same_model(model: torch.nn.Module, reference: torch.nn.Module, size: int) -> None:
    torch.testing.assert_close(model.state_dict(), reference.state_dict())
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(images), reference.forward_features(images))


def timm_to_official(state: dict, registers: bool, swiglu: bool) -> dict:
    """timm DINOv2 -> the facebookresearch release: the class slot back in ``pos_embed`` (with registers
    timm folds it into ``cls_token``), ``register_tokens``, a ``mask_token``, SwiGLU as ``w12``/``w3``."""
    out = dict(state)
    width = state["cls_token"].shape[-1]
    if registers:
        slot = 0.1 * torch.randn(1, 1, width)
        out["cls_token"] = state["cls_token"] - slot
        out["pos_embed"] = torch.cat([slot, state["pos_embed"]], dim=1)
        out["register_tokens"] = out.pop("reg_token")
    out["mask_token"] = torch.randn(1, width)
    if swiglu:
        out = {re.sub(r"mlp\.fc1\.", "mlp.w12.", re.sub(r"mlp\.fc2\.", "mlp.w3.", k)): v for k, v in out.items()}
    return out


def to_hf(state: dict, block_names: dict, prefix: str = "") -> dict:
    """timm / official names -> transformers names: embeddings, ``encoder.layer.N``, q/k/v split."""
    out = {}
    for key, value in state.items():
        if key in HF_EMBEDDINGS:
            out[prefix + HF_EMBEDDINGS[key]] = value
            continue
        block, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
        layer = f"{prefix}encoder.layer.{block}."
        module, param = rest.rsplit(".", 1)
        if module == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
                out[f"{layer}attention.attention.{part}.{param}"] = chunk
        elif module in ("ls1", "ls2"):
            out[f"{layer}layer_scale{module[-1]}.lambda1"] = value
        else:
            out[f"{layer}{block_names[module]}.{param}"] = value
    return out


def write_hf_snapshot(directory, state: dict, model_type: str, shards: int = 1) -> None:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32}))
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
        return
    keys = sorted(state)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        save_file({k: state[k] for k in part}, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# -- timm layout --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch",
    ["vit_small_patch14_reg4_dinov2", "eva02_small_patch14_224", "eva02_base_patch14_224", "deit_small_patch16_224"],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_timm_layout_files(tmp_path, arch, suffix):
    reference = tiny_model(arch, img_size=112)
    path = tmp_path / f"encoder{suffix}"
    state = reference.state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    elif suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint: unwrapped
    else:
        torch.save(state, path)
    model = tiny_model(arch, img_size=112, seed=1)
    report = load_weights(model, path)
    assert (report.layout, report.dropped) == ("timm", ())
    assert_same_model(model, reference, 112)


def test_pth_is_memory_mapped_and_the_legacy_format_still_loads(tmp_path, monkeypatch):
    reference = tiny_model("deit_small_patch16_224", img_size=112)
    zip_file, legacy_file = tmp_path / "zip.pth", tmp_path / "legacy.pth"
    torch.save(reference.state_dict(), zip_file)
    torch.save(reference.state_dict(), legacy_file, _use_new_zipfile_serialization=False)
    calls, real_load = [], torch.load

    def spy(path, **options):
        calls.append((Path(path).name, options.get("mmap", False)))
        return real_load(path, **options)

    monkeypatch.setattr(torch, "load", spy)
    for path in (zip_file, legacy_file):
        model = tiny_model("deit_small_patch16_224", img_size=112, seed=1)
        load_weights(model, path)
        assert_same_model(model, reference, 112)
    # the zip file mapped; the legacy one refused the mapping and was read whole
    assert calls == [("zip.pth", True), ("legacy.pth", True), ("legacy.pth", False)]


# -- official DINOv2 release ----------------------------------------------------------------------------
def test_dinov2_official_pth_with_registers(tmp_path, caplog):
    reference = tiny_model("vit_small_patch14_reg4_dinov2", img_size=518)  # the release's 37x37 grid
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    official = timm_to_official(reference.state_dict(), registers=True, swiglu=False)
    assert official["pos_embed"].shape == (1, 37 * 37 + 1, 32)
    torch.save(official, path)
    model = tiny_model("vit_small_patch14_reg4_dinov2", img_size=518, seed=1)
    with caplog.at_level("INFO", logger="gkd.models.weights"):
        report = load_weights(model, path)
    assert report.layout == "dinov2-official"
    assert report.dropped == ("mask_token",)
    assert "mask_token" in caplog.text
    assert_same_model(model, reference, 70)


def test_dinov2_official_resampled_to_the_model_grid(tmp_path):
    reference = tiny_model("vit_small_patch14_reg4_dinov2", img_size=518)
    path = tmp_path / "official.pth"
    torch.save(timm_to_official(reference.state_dict(), registers=True, swiglu=False), path)
    model = tiny_model("vit_small_patch14_reg4_dinov2", img_size=224, seed=1)
    report = load_weights(model, path)
    expected = resample_abs_pos_embed(reference.pos_embed, new_size=(16, 16), num_prefix_tokens=0)
    torch.testing.assert_close(model.pos_embed, expected)
    torch.testing.assert_close(model.cls_token, reference.cls_token)
    assert report.notes == ("pos_embed (1, 1370, 32) -> (1, 256, 32) (the model's 16x16 grid)",)


# -- Hugging Face ----------------------------------------------------------------------------------------
def test_hf_snapshot_dinov2_with_registers(tmp_path):
    reference = tiny_model("vit_small_patch14_reg4_dinov2", img_size=70)
    official = timm_to_official(reference.state_dict(), registers=True, swiglu=False)
    hf = to_hf(official, DINOV2_BLOCK, prefix="dinov2_with_registers.")  # ...ForImageClassification
    hf |= {"classifier.weight": torch.randn(10, 64), "classifier.bias": torch.randn(10)}
    write_hf_snapshot(tmp_path / "dinov2-with-registers-small", hf, "dinov2_with_registers")
    model = tiny_model("vit_small_patch14_reg4_dinov2", img_size=70, seed=1)
    report = load_weights(model, tmp_path / "dinov2-with-registers-small")
    assert report.layout == "huggingface:dinov2_with_registers"
    assert set(report.dropped) == {"classifier.weight", "classifier.bias", "mask_token"}
    assert_same_model(model, reference, 70)


def test_hf_dinov2_giant_swiglu_bin(tmp_path):
    reference = tiny_model("vit_giant_patch14_dinov2", img_size=56)
    hf = to_hf(timm_to_official(reference.state_dict(), registers=False, swiglu=True), DINOV2_BLOCK)
    assert "encoder.layer.0.mlp.weights_in.weight" in hf
    directory = tmp_path / "dinov2-giant"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "dinov2", "use_swiglu_ffn": True}))
    torch.save(hf, directory / "pytorch_model.bin")
    model = tiny_model("vit_giant_patch14_dinov2", img_size=56, seed=1)
    assert load_weights(model, directory).layout == "huggingface:dinov2"
    assert_same_model(model, reference, 56)


@pytest.mark.parametrize("prefix", ["", "deit.", "vit."])
def test_hf_deit_and_vit_names(tmp_path, prefix):
    reference = tiny_model("deit_small_patch16_224", img_size=64)
    hf = to_hf(reference.state_dict(), VIT_BLOCK, prefix=prefix)
    hf |= {"pooler.dense.weight": torch.randn(32, 32), "pooler.dense.bias": torch.randn(32)}
    path = tmp_path / "model.safetensors"  # a single file, no config.json: recognised by its key names
    save_file(hf, str(path))
    model = tiny_model("deit_small_patch16_224", img_size=64, seed=1)
    report = load_weights(model, path)
    assert (report.layout, set(report.dropped)) == ("huggingface:vit", {"pooler.dense.weight", "pooler.dense.bias"})
    assert_same_model(model, reference, 64)


def test_hf_distilled_deit_sharded_snapshot(tmp_path):
    reference = tiny_model("deit_small_distilled_patch16_224", img_size=64)
    hf = to_hf(reference.state_dict(), VIT_BLOCK, prefix="deit.")  # DeiTForImageClassificationWithTeacher
    hf |= {f"{head}.weight": torch.randn(10, 32) for head in ("cls_classifier", "distillation_classifier")}
    assert "deit.embeddings.distillation_token" in hf
    write_hf_snapshot(tmp_path / "deit-small-distilled", hf, "deit", shards=2)
    model = tiny_model("deit_small_distilled_patch16_224", img_size=64, seed=1)
    report = load_weights(model, tmp_path / "deit-small-distilled")
    assert set(report.dropped) == {"cls_classifier.weight", "distillation_classifier.weight"}
    assert_same_model(model, reference, 64)

    plain = tiny_model("deit_small_patch16_224", img_size=64)
    with pytest.raises(WeightsMismatchError, match=r"distilled DeiT.*dist_token"):
        load_weights(plain, tmp_path / "deit-small-distilled")


# -- EVA02 original (MIM) layout, converted by timm's eva filter --------------------------------------------
def test_eva02_original_layout(tmp_path):
    reference = tiny_model("eva02_base_patch14_224", img_size=56)
    renames = {
        "attn.q_proj.bias": "attn.q_bias",
        "attn.v_proj.bias": "attn.v_bias",
        "mlp.fc1_g.": "mlp.w1.",
        "mlp.fc1_x.": "mlp.w2.",
        "mlp.norm.": "mlp.ffn_ln.",
        "mlp.fc2.": "mlp.w3.",
        "fc_norm.": "norm.",
    }
    original = {}
    for key, value in reference.state_dict().items():
        for timm_name, eva_name in renames.items():
            key = key.replace(timm_name, eva_name)
        original[key] = value
    original |= {
        "mask_token": torch.randn(1, 1, 32),
        "lm_head.weight": torch.randn(64, 32),
        "lm_head.bias": torch.randn(64),
        "rope.freqs_cos": torch.randn(16, 16),
        "rope.freqs_sin": torch.randn(16, 16),
    }
    path = tmp_path / "eva02_B_pt_in21k_p14.pt"
    torch.save({"module": original}, path)
    model = tiny_model("eva02_base_patch14_224", img_size=56, seed=1)
    report = load_weights(model, path)
    assert set(report.dropped) == {"mask_token", "lm_head.weight", "lm_head.bias", "rope.freqs_cos", "rope.freqs_sin"}
    assert_same_model(model, reference, 56)


# -- checkpoints that do not fit -----------------------------------------------------------------------
def test_deeper_checkpoint_fails_naming_the_keys(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file(tiny_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=3).state_dict(), str(path))
    model = tiny_model("vit_small_patch14_reg4_dinov2", img_size=56, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys: blocks\.2\.attn\.proj\.bias") as error:
        load_weights(model, path)
    assert "missing keys: none" in str(error.value)
    torch.testing.assert_close(model.state_dict(), before)  # nothing loaded


def test_wider_checkpoint_lists_misshaped_keys(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(tiny_model("deit_small_patch16_224", img_size=64, embed_dim=48).state_dict(), path)
    model = tiny_model("deit_small_patch16_224", img_size=64)
    with pytest.raises(WeightsMismatchError, match=r"mis-shaped: .*blocks\.0\.attn\.proj\.bias \(file \(48,\), model"):
        load_weights(model, path)


def test_other_patch_size_is_refused_not_resampled(tmp_path):
    path = tmp_path / "patch16.safetensors"
    save_file(tiny_model("vit_small_patch16_224", img_size=64).state_dict(), str(path))
    model = tiny_model("vit_small_patch14_dinov2", img_size=56)
    with pytest.raises(WeightsMismatchError, match=r"patch_embed\.proj\.weight \(file \(32, 3, 16, 16\)"):
        load_weights(model, path)


def test_missing_keys_and_unknown_hf_names_are_listed(tmp_path):
    hf = to_hf(tiny_model("deit_small_patch16_224", img_size=64).state_dict(), VIT_BLOCK)
    del hf["encoder.layer.1.layernorm_after.bias"]
    hf["encoder.layer.0.adapter.weight"] = torch.randn(4)
    path = tmp_path / "model.safetensors"
    save_file(hf, str(path))
    with pytest.raises(WeightsMismatchError) as error:
        load_weights(tiny_model("deit_small_patch16_224", img_size=64), path)
    assert "missing keys: blocks.1.norm2.bias" in str(error.value)
    assert "unexpected keys: encoder.layer.0.adapter.weight" in str(error.value)


def test_unsupported_files(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="clip_vision_model"):
        read_state_dict(tmp_path / "clip")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weight file type"):
        read_state_dict(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pth")
