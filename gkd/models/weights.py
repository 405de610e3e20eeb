"""Local weight files -> timm models: the one place where checkpoint key names are converted.

Formats (nothing is ever downloaded):

- timm layout: ``.safetensors``, ``.pth`` / ``.pt`` / ``.bin`` (a state dict, possibly under ``state_dict``,
  ``model`` or ``module``), including a student encoder written by `gkd.models.checkpoint.save_encoder`.
- Layouts timm's own ``checkpoint_filter_fn`` converts, reused as is: the official DINOv2 release
  (facebookresearch names: ``mask_token``, ``register_tokens``, ``pos_embed`` with the class slot, giant's
  ``mlp.w12/w3``) through ``timm.models.vision_transformer.checkpoint_filter_fn``, and the original EVA02 MIM
  layout (``q_proj``, ``mlp.w1/w2/w3``, ``ffn_ln``, ``rope.*``, ``lm_head``) through
  ``timm.models.eva.checkpoint_filter_fn``.
- The GKD authors' checkpoints (github.com/Younger-hua/GKD): a stage-1 distillation checkpoint (the student
  under ``model`` / ``student.backbone.``) or a task-learning mmseg checkpoint (``state_dict`` / ``backbone.``),
  both in the DINOv2 code's names; only the student encoder is read.
- Hugging Face (transformers) key names, a snapshot directory (``config.json`` + ``model.safetensors``,
  ``pytorch_model.bin`` or a sharded ``*.index.json``) or a single file: ``Dinov2Model``,
  ``Dinov2WithRegistersModel``, ``DeiTModel`` and ``ViTModel`` (with or without their ``dinov2.``,
  ``dinov2_with_registers.``, ``deit.``, ``vit.`` classification prefixes). timm has no filter for these, so
  `hf_to_timm_names` renames them by hand (the inverse of transformers' ``convert_dinov2_to_hf.py``,
  ``convert_dinov2_with_registers_to_hf.py``, ``convert_deit_timm_to_pytorch.py`` and
  ``convert_vit_timm_to_pytorch.py``) into the layout timm's filter takes next.

Decisions: DeiT's ``embeddings.distillation_token`` becomes timm's ``dist_token``, so a distilled DeiT
loads into timm's distilled architecture (``deit_small_distilled_patch16_224``) and is refused by a plain
DeiT, whose position embedding has one prefix slot fewer. Keys no backbone uses are dropped explicitly and
reported (`LoadReport.dropped`, logged): pre-training mask tokens, EVA02's MIM head and RoPE tables,
classifier heads and poolers absent from the model. Everything else must fit: a missing, unexpected or
mis-shaped key raises `WeightsMismatchError` listing them; there is no partial load. A position embedding
of another grid is resampled (timm's ``resample_abs_pos_embed``, inside its filter) and reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import eva, vision_transformer
from torch import nn

from gkd.utils.io import corrupt_safetensors

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "GKD_WEIGHTS_DIR"
"""Directory of configured weights: ``<spec>.safetensors|.pth|.pt|.bin`` files or ``<spec>/`` HF snapshots."""

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "deit", "vit")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HF_PREFIXES = ("dinov2_with_registers.", "dinov2.", "deit.", "vit.", "")
_HF_HEADS = ("classifier.", "cls_classifier.", "distillation_classifier.", "pooler.")
_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# encoder.layer.N.<module>.<param> -> blocks.N.<module>.<param>; DINOv2 names map to the official release's
# (``w12``/``w3``, ``ls1.gamma``), which timm's filter then converts like the official checkpoint.
_HF_LAYER_MODULES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)")
# Keys timm's filters drop on purpose (pre-training only, or recomputed buffers); reported, never silent.
_DROPPED_BY_TIMM = re.compile(r"mask_token|lm_head\..+|rope\..+|pre_logits\..+")
_HEADS = ("head.", "head_dist.")
# The GKD code's checkpoints (github.com/Younger-hua/GKD): stage-1 ``checkpoint_*.pth`` hold ``model`` =
# ``student.backbone.*`` (+ teacher and QSD heads, not loaded); its task-learning (mmseg) checkpoints hold
# ``state_dict`` = ``backbone.*`` + ``decode_head.*``. Only the student encoder is taken from either.
_RELEASE_PREFIXES = {"student.backbone.": "gkd-distillation", "backbone.": "gkd-segmentation"}


class WeightsMismatchError(RuntimeError):
    """A checkpoint that does not fit the architecture it is loaded into."""


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` did: the layout it read, keys it dropped, and conversions worth knowing."""

    source: str
    layout: str
    dropped: tuple[str, ...]
    notes: tuple[str, ...]


def configured_weights(name: str) -> Path | None:
    """The weights configured for spec ``name``: ``$GKD_WEIGHTS_DIR/<name>{.safetensors,.pth,.pt,.bin}`` or an
    HF snapshot ``$GKD_WEIGHTS_DIR/<name>/``; ``None`` if absent."""
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if not root:
        return None
    candidates = [Path(root) / f"{name}{suffix}" for suffix in WEIGHT_SUFFIXES] + [Path(root) / name]
    return next((path for path in candidates if path.is_file() or (path / "config.json").is_file()), None)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a weight file or HF snapshot directory and the layout they are in, HF names already
    renamed (`hf_to_timm_names`). Layouts: ``huggingface:<model_type>``, ``dinov2-official``, or ``timm``
    (timm's own, or another layout its filter converts, such as the original EVA02 one)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights {path} not found")
    state = _read_file(path)
    hf_type = _hf_model_type(state)
    if hf_type is not None:
        return hf_to_timm_names(state), f"huggingface:{hf_type}"
    for prefix, layout in _RELEASE_PREFIXES.items():
        if f"{prefix}patch_embed.proj.weight" in state:
            # the GKD release: the student inside a distillation or a segmentation checkpoint, in the DINOv2
            # code's names (timm's filter converts them as for the official DINOv2 release)
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}, layout
    return state, "dinov2-official" if "mask_token" in state and "blocks.0.ls1.gamma" in state else "timm"


def hf_to_timm_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers' ViT/DeiT/DINOv2 keys to timm's (DINOv2: the official release's, which timm's
    filter converts). Query/key/value are concatenated into ``qkv``; keys that match no rule are kept as
    they are, so the strict check reports them."""
    prefix = _hf_prefix(state)
    if prefix is None:
        raise ValueError("not transformers key names (no embeddings.patch_embeddings.projection.weight)")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if (match := _HF_QKV.fullmatch(name)) is not None:
            block, part, param = match.groups()
            qkv.setdefault((int(block), param), {})[part] = value
        elif name in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[name]] = value
        elif (match := _HF_LAYER.fullmatch(name)) is not None and match.group(2) in _HF_LAYER_MODULES:
            block, module, param = match.groups()
            out[f"blocks.{block}.{_HF_LAYER_MODULES[module]}.{'gamma' if param == 'lambda1' else param}"] = value
        else:
            out[name] = value
    for (block, param), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsMismatchError(f"block {block}: attention {param} has only {sorted(parts)}")
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Raise `WeightsMismatchError` listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(
        f"{key} (file {tuple(state[key].shape)}, model {tuple(own[key].shape)})"
        for key in set(own) & set(state)
        if own[key].shape != state[key].shape
    )
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(
            f"{source} does not fit {_arch(model)}: missing keys: {_show(missing)}; "
            f"unexpected keys: {_show(unexpected)}; mis-shaped: {_show(misshaped)}"
        )


def load_weights(model: nn.Module, path: str | Path, resample_patch: bool = False) -> LoadReport:
    """Strictly load a local checkpoint (any supported layout) into a timm ``VisionTransformer`` / ``Eva``.

    Args:
        model: the timm model.
        path: weight file or Hugging Face snapshot directory.
        resample_patch: convert a patch embedding of another patch size (timm's ``resample_patch_embed``);
            without it another patch size is refused, as an accidental mismatch would be.
    """
    state, layout = read_state_dict(path)
    return load_state(model, state, path, resample_patch, layout)


def load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    resample_patch: bool = False,
    layout: str = "timm",
) -> LoadReport:
    """`load_weights` for tensors already read: layout conversion and resampling by timm's own filter, then a
    strict load.

    Args:
        model: the timm model.
        state: the checkpoint's tensors (``read_state_dict`` names).
        source: what the tensors came from, for messages.
        resample_patch: convert a patch embedding of another patch size instead of refusing it.
        layout: the layout ``read_state_dict`` reported.
    """
    state = dict(state)
    dropped = [key for key in state if key.startswith(_HF_HEADS) and layout.startswith("huggingface")]
    state = {key: value for key, value in state.items() if key not in dropped}
    _check_before_filter(model, state, source, resample_patch)
    filtered = _timm_filter(model, state, source)
    dropped += [key for key in state if _DROPPED_BY_TIMM.fullmatch(key) and key not in filtered]
    own = model.state_dict()
    heads = [key for key in filtered if key.startswith(_HEADS) and key not in own]
    dropped += heads
    filtered = {key: value for key, value in filtered.items() if key not in heads}
    check_fit(model, filtered, source)
    model.load_state_dict(filtered, strict=True)
    notes = []
    before, after = state.get("pos_embed"), filtered.get("pos_embed")
    if before is not None and after is not None and before.shape != after.shape:
        grid = "x".join(str(side) for side in model.patch_embed.grid_size)
        notes.append(f"pos_embed {tuple(before.shape)} -> {tuple(after.shape)} (the model's {grid} grid)")
    patch_before = state.get("patch_embed.proj.weight")
    patch_after = filtered["patch_embed.proj.weight"]
    if patch_before is not None and patch_before.shape[-2:] != patch_after.shape[-2:]:
        notes.append(
            f"patch embedding {tuple(patch_before.shape[-2:])} -> {tuple(patch_after.shape[-2:])} "
            "(timm resample_patch_embed)"
        )
    report = LoadReport(str(source), layout, tuple(dropped), tuple(notes))
    log.info(
        "loaded %s (%s layout) into %s; dropped unused keys: %s%s",
        source,
        layout,
        _arch(model),
        ", ".join(report.dropped) or "none",
        "".join(f"; {note}" for note in notes),
    )
    return report


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise corrupt_safetensors(path, error) from error
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unknown weight file type (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    try:
        loaded = _torch_load_mapped(path)
    except Exception as error:  # weights_only refuses pickled objects: say so instead of a pickle trace
        raise ValueError(f"{path}: not a plain tensor checkpoint ({error}); save its state dict alone") from error
    return _unwrap(loaded, path)


def _torch_load_mapped(path: Path) -> Any:
    """``torch.load`` memory-mapped (copy-on-write): only the tensors used are read from disk, so the pre-flight
    check, which loads into meta parameters, reads almost nothing of a multi-GB checkpoint and a real load holds one
    copy of the weights, not two. Files in torch's legacy (pre-1.6, non-zip) format cannot be mapped: read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (under ``state_dict``, ``model`` or ``module``)."""
    while isinstance(loaded, dict) and not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        inner = next(
            (loaded[key] for key in ("state_dict", "model", "module") if isinstance(loaded.get(key), dict)), None
        )
        if inner is None:
            raise ValueError(f"{path}: no state dict found (top-level keys: {_show(sorted(map(str, loaded)))})")
        loaded = inner
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _read_hf_dir(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is a directory without config.json (not a Hugging Face snapshot)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: Hugging Face model_type {model_type!r} not supported ({', '.join(HF_MODEL_TYPES)})")
    weights = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: none of {', '.join(HF_WEIGHT_FILES)}")
    if weights.name.endswith(".index.json"):
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        state = {key: value for shard in shards for key, value in _read_file(path / shard).items()}
    else:
        state = _read_file(weights)
    if _hf_model_type(state) is None:
        raise WeightsMismatchError(f"{weights}: no transformers embedding keys (embeddings.patch_embeddings...)")
    return hf_to_timm_names(state), f"huggingface:{model_type}"


def _hf_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """The prefix of transformers' embedding keys (``""`` for a bare model), ``None`` for other layouts."""
    return next((p for p in _HF_PREFIXES if f"{p}embeddings.patch_embeddings.projection.weight" in state), None)


def _hf_model_type(state: Mapping[str, torch.Tensor]) -> str | None:
    """``dinov2`` / ``vit`` (ViT and DeiT share names) for transformers key names, else ``None``."""
    prefix = _hf_prefix(state)
    if prefix is None:
        return None
    return "dinov2" if f"{prefix}encoder.layer.0.norm1.weight" in state else "vit"


def _check_before_filter(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, resample_patch: bool
) -> None:
    """Refuse what timm's filter would silently adapt (FlexiViT patch resampling, unless ``resample_patch``)
    or fail on obscurely."""
    own = model.state_dict()
    if "dist_token" in state and "dist_token" not in own:
        raise WeightsMismatchError(
            f"{source} is a distilled DeiT (unexpected key: dist_token); load it into timm's distilled "
            "architecture (e.g. deit_small_distilled_patch16_224) or use a non-distilled checkpoint"
        )
    patch, own_patch = state.get("patch_embed.proj.weight"), own["patch_embed.proj.weight"]
    if patch is not None and patch.ndim == 4 and patch.shape[-2:] != own_patch.shape[-2:] and not resample_patch:
        raise WeightsMismatchError(
            f"{source} does not fit {_arch(model)}: mis-shaped: patch_embed.proj.weight "
            f"(file {tuple(patch.shape)}, model {tuple(own_patch.shape)}): another patch size "
            "(set the model's patch_size to convert it)"
        )


def _timm_filter(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """timm's own ``checkpoint_filter_fn`` for the model's family (layout conversion, pos-embed resampling)."""
    filter_fn = eva.checkpoint_filter_fn if isinstance(model, eva.Eva) else vision_transformer.checkpoint_filter_fn
    try:
        return filter_fn(dict(state), model)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise WeightsMismatchError(
            f"{source} does not fit {_arch(model)}: timm's checkpoint filter failed ({error}); "
            f"checkpoint keys: {_show(sorted(state))}"
        ) from error


def _arch(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


def _show(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
