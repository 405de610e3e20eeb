"""The model zoo: named teacher/student specs on timm, resolved through one registry (`SPECS`).

A spec is data, like timm's ``pretrained_cfg``: the timm architecture, its shape, family, normalisation and
default input size. Any other timm ViT (``VisionTransformer`` or ``Eva``) works by its timm name. Every
backbone is built with ``dynamic_img_size=True`` (position embeddings resampled per input size, so 512 and
518 both work) and without a classifier; weights come only from local files (`gkd.models.weights`).

Configured weights: ``$GKD_WEIGHTS_DIR`` holds ``<spec>.safetensors|.pth|.pt|.bin`` files or Hugging Face
snapshots ``<spec>/``; ``gkd-compress zoo`` lists them, and a recipe's relative ``weights:`` path that does
not exist as given is looked up there (``weights: dinov2_vitl14.pth``). Nothing is loaded unless a recipe
or caller names the weights.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from gkd.models.backbone import Backbone, is_supported_vit
from gkd.models.weights import WEIGHTS_DIR_ENV, configured_weights, load_state, load_weights

TEACHER, STUDENT = "teacher", "student"
Family = Literal["dinov2", "eva02", "deit", "dino"]


@dataclass(frozen=True)
class ModelSpec:
    """A named teacher/student backbone: the timm architecture and what it is (shape, input, normalisation)."""

    name: str
    arch: str
    family: Family
    roles: tuple[str, ...]
    patch_size: int
    embed_dim: int
    depth: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_registers: int = 0
    notes: str = ""

    def timm_kwargs(self, patch_size: int | None = None, **overrides: Any) -> dict[str, Any]:
        """``timm.create_model`` kwargs: the spec's defaults, then ``overrides`` (e.g. tiny test widths).

        Args:
            patch_size: build the model at this patch size instead of the spec's (GKD runs every backbone at
                patch 16 at 512); ``img_size`` then keeps the spec's token grid, so the position embedding is
                loaded unresampled and resampled once, per input size, at run time.
            overrides: further timm kwargs; they win over the defaults.
        """
        kwargs: dict[str, Any] = {"img_size": self.img_size, "dynamic_img_size": True, "num_classes": 0}
        if patch_size is not None and patch_size != self.patch_size:
            kwargs.update(patch_size=patch_size, img_size=self.img_size // self.patch_size * patch_size)
        return {**kwargs, **overrides}


# What the models of a family share: patch, pre-training input size and normalisation (timm's pretrained_cfg).
_IMAGENET = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
_FAMILIES: dict[str, dict[str, Any]] = {
    "dinov2": {"patch_size": 14, "img_size": 518, **_IMAGENET},
    "eva02": {"patch_size": 14, "img_size": 224, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
    "deit": {"patch_size": 16, "img_size": 224, **_IMAGENET},
    "dino": {"patch_size": 16, "img_size": 224, **_IMAGENET},
}


def _spec(
    name: str, arch: str, family: Family, roles: tuple[str, ...], size: tuple[int, int], **extra: Any
) -> ModelSpec:
    """A spec with its family's patch, input size and normalisation; ``size`` is ``(embed_dim, depth)``."""
    embed_dim, depth = size
    return ModelSpec(name, arch, family, roles, embed_dim=embed_dim, depth=depth, **_FAMILIES[family], **extra)


_DINOV2_SIZES = {"s": ("small", 384, 12), "b": ("base", 768, 12), "l": ("large", 1024, 24), "g": ("giant", 1536, 40)}


def _dinov2(size: str, registers: bool) -> ModelSpec:
    width, embed_dim, depth = _DINOV2_SIZES[size]
    notes = (
        f"DINOv2 ViT-{size.upper()}/14 (LVD-142M)"
        + (", 4 registers" if registers else "")
        + ("; giant uses a SwiGLU MLP" if size == "g" else "")
    )
    return _spec(
        f"dinov2_vit{size}14" + ("_reg" if registers else ""),
        f"vit_{width}_patch14_" + ("reg4_dinov2" if registers else "dinov2"),
        "dinov2",
        (TEACHER, STUDENT) if size in ("s", "b") else (TEACHER,),
        (embed_dim, depth),
        num_registers=4 if registers else 0,
        notes=notes,
    )


def _eva02(width: str, embed_dim: int, depth: int) -> ModelSpec:
    roles = (TEACHER, STUDENT) if width != "large" else (TEACHER,)
    notes = f"EVA02-{width[0].upper()}/14 MIM (IN-22k); RoPE + SwiGLU, CLIP mean/std"
    return _spec(f"eva02_{width}", f"eva02_{width}_patch14_224", "eva02", roles, (embed_dim, depth), notes=notes)


def _deit(width: str, embed_dim: int) -> ModelSpec:
    """A 12-block DeiT/16 at 224: the F2L students."""
    notes = f"DeiT-{width[0].upper()}/16, ImageNet-1k init (F2L student)"
    return _spec(f"deit_{width}", f"deit_{width}_patch16_224", "deit", (STUDENT,), (embed_dim, 12), notes=notes)


def _dino(size: str, width: str, embed_dim: int) -> ModelSpec:
    """DINO v1 (Caron et al. 2021): the students of the GKD code's F2F scripts (dinov2_*_distill_dino_*.sh)."""
    notes = f"DINO v1 ViT-{size.upper()}/16 (self-supervised, ImageNet-1k; timm tag .dino)"
    return _spec(f"dino_vit{size}16", f"vit_{width}_patch16_224.dino", "dino", (STUDENT,), (embed_dim, 12), notes=notes)


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        *(_dinov2(size, registers) for registers in (False, True) for size in _DINOV2_SIZES),
        _eva02("small", 384, 12),
        _eva02("base", 768, 12),
        _eva02("large", 1024, 24),
        _deit("tiny", 192),
        _deit("small", 384),
        _deit("base", 768),
        _dino("s", "small", 384),
        _dino("b", "base", 768),
    )
}


def unknown_model_message(name: str) -> str:
    """Why ``name`` is refused, with close names, the zoo specs and the rule for timm names."""
    if timm.is_model(name):
        problem = f"{name!r} is a timm model but not a ViT (VisionTransformer, DeiT or Eva)"
    else:
        close = difflib.get_close_matches(name, [*SPECS, *timm.list_models()], n=3)
        problem = f"unknown model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
    return f"{problem}; zoo specs: {', '.join(SPECS)}; any timm ViT name also works (e.g. vit_small_patch16_224)"


def resolve_model(
    name: str, patch_size: int | None = None, **overrides: Any
) -> tuple[str, dict[str, Any], tuple | None, tuple | None]:
    """``(timm arch, timm kwargs, mean, std)`` for a spec or timm name; mean/std ``None`` = the timm config's.

    Args:
        name: zoo spec or timm ViT name.
        patch_size: another patch size than the architecture's (see `ModelSpec.timm_kwargs`).
        overrides: timm kwargs that win over the defaults.
    """
    spec = SPECS.get(name)
    if spec is not None:
        return spec.arch, spec.timm_kwargs(patch_size, **overrides), spec.mean, spec.std
    if not is_supported_vit(name):
        raise ValueError(unknown_model_message(name))
    kwargs: dict[str, Any] = {"dynamic_img_size": True, "num_classes": 0}
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    return name, {**kwargs, **overrides}, None, None


def create_backbone(
    name: str, weights: str | Path | None = None, patch_size: int | None = None, **model_kwargs: Any
) -> Backbone:
    """Build ``name`` with random init, or strictly load local ``weights`` (any layout `gkd.models.weights`
    reads).

    Args:
        name: zoo spec or timm ViT name.
        weights: a local checkpoint; ``None`` = random init.
        patch_size: build at this patch size; a checkpoint of the native patch size is then converted on load
            (timm's ``resample_patch_embed``, FlexiViT's pseudo-inverse resampling of the patch embedding).
        model_kwargs: timm kwargs overriding the spec's.
    """
    if weights is not None and not Path(weights).exists():
        raise FileNotFoundError(f"weights for {name}: {weights} not found")
    arch, timm_kwargs, mean, std = resolve_model(name, patch_size, **model_kwargs)
    backbone = Backbone(name, arch, timm_kwargs, mean, std)
    if weights is not None:
        load_weights(backbone.model, weights, resample_patch=patch_size is not None)
    return backbone


def with_patch_size(backbone: Backbone, patch_size: int) -> Backbone:
    """``backbone`` rebuilt at ``patch_size`` with its current weights converted (patch embedding resampled by
    timm's ``resample_patch_embed``, everything else unchanged): GKD runs stage 1a at patch 14 on 224 crops and
    turns the student back to patch 16 for 1b. Returns ``backbone`` itself when the patch size already fits."""
    if backbone.patch_size == patch_size:
        return backbone
    arch, kwargs = backbone.timm_arch, dict(backbone.timm_kwargs)
    grid = kwargs.get("img_size", backbone.model.patch_embed.img_size[0])
    grid = grid[0] if isinstance(grid, (tuple, list)) else grid
    kwargs.update(patch_size=patch_size, img_size=grid // backbone.patch_size * patch_size)
    mean, std = backbone.mean.flatten().tolist(), backbone.std.flatten().tolist()
    converted = Backbone(backbone.name, arch, kwargs, mean, std)
    load_state(converted.model, backbone.model.state_dict(), f"{backbone.name} at patch {backbone.patch_size}", True)
    return converted.to(backbone.mean.device)


class ModelConfig(BaseModel):
    """A backbone in a recipe: a zoo spec or timm ViT name, optional local weights, timm kwargs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="zoo spec (dinov2_vitl14, deit_small, ...) or any timm ViT name")
    weights: Path | None = Field(
        None,
        description=f"local weights (file or HF snapshot dir); relative paths are also looked up in ${WEIGHTS_DIR_ENV}",
    )
    patch_size: int | None = Field(
        None,
        gt=0,
        description="run the backbone at this patch size (weights converted on load; GKD: 16 for every model at "
        "512); null = the architecture's own",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model kwargs overriding the spec's")

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name not in SPECS and not is_supported_vit(name):
            raise ValueError(unknown_model_message(name))
        return name

    @field_validator("weights")
    @classmethod
    def _find_weights(cls, weights: Path | None) -> Path | None:
        root = os.environ.get(WEIGHTS_DIR_ENV)
        if weights is None or weights.exists() or weights.is_absolute() or not root:
            return weights
        return Path(root) / weights if (Path(root) / weights).exists() else weights


def create_backbone_from_config(config: ModelConfig) -> Backbone:
    """`create_backbone` for a recipe's `ModelConfig`."""
    return create_backbone(config.name, config.weights, config.patch_size, **config.kwargs)


def count_params(arch: str, timm_kwargs: dict[str, Any]) -> int:
    """Parameters of ``timm.create_model(arch, **timm_kwargs)``, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **timm_kwargs)
    return sum(parameter.numel() for parameter in model.parameters())


def zoo_rows(weights: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per spec for ``gkd-compress zoo``; ``weights`` maps spec names to paths and takes precedence
    over ``$GKD_WEIGHTS_DIR`` (`configured_weights`)."""
    rows = []
    for spec in SPECS.values():
        path = (weights or {}).get(spec.name) or configured_weights(spec.name)
        rows.append(
            {
                "name": spec.name,
                "arch": spec.arch,
                "role": "/".join(spec.roles),
                "family": spec.family,
                "params_m": round(count_params(spec.arch, spec.timm_kwargs()) / 1e6, 2),
                "patch_size": spec.patch_size,
                "embed_dim": spec.embed_dim,
                "depth": spec.depth,
                "img_size": spec.img_size,
                "weights": str(path) if path is not None else None,
                "notes": spec.notes,
            }
        )
    return rows


_COLUMNS = {
    "name": "name",
    "role": "role",
    "family": "family",
    "arch": "timm arch",
    "params_m": "params (M)",
    "patch_size": "patch",
    "embed_dim": "dim",
    "depth": "depth",
    "img_size": "img",
    "weights": "weights",
}


def format_zoo_table(rows: list[dict[str, Any]]) -> str:
    """``zoo_rows`` as an aligned text table (numbers right-aligned, missing weights as ``-``)."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [list(_COLUMNS.values())] + [[cell(row[key]) for key in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    numeric = [key in ("params_m", "patch_size", "embed_dim", "depth", "img_size") for key in _COLUMNS]
    lines = [
        "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(line, widths, numeric, strict=True)
        )
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
