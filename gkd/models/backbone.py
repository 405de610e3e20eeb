"""`Backbone`: a timm ViT behind the one feature interface (`ViTFeatures`).

Images enter in ``[0, 1]`` RGB; each backbone normalises with its own mean/std, so a teacher and a
student with different pre-processing (EVA02 uses CLIP statistics, DINOv2/DeiT ImageNet's) can share
one batch, and an exported segmentor takes raw ``[0, 1]`` input.

Every pixel counts: an input whose size is not a multiple of the patch (512 at patch 14) is resized up to
the next multiple (bilinear), so the token grid is ``ceil(H / p) x ceil(W / p)`` and covers the whole image.
GKD avoids the mismatch altogether by running every backbone at patch 16 (``ModelConfig.patch_size``).

Tokens are the final-normalised ones of every requested layer. timm moves the final LayerNorm of models
with average pooling (EVA02) into ``fc_norm`` and leaves ``norm`` an identity, so for those ``fc_norm`` is
applied here: EVA02 tokens are normalised like DINOv2's, as the GKD authors distil them.

Position embeddings at other input sizes are resampled as each model's own code does. timm resamples bicubically
with antialiasing, as the official DINOv2 models with registers do; the official DINOv2 models without
registers (``dinov2_vit*14``, also the GKD authors' copy of that code) interpolate bicubically without
antialiasing, with a scale factor ``(new_grid + 0.1) / old_grid`` (``interpolate_offset``, a kludge kept for
their checkpoints' sake). timm has no option for that, so `official_dinov2_pos_embed` replaces those models'
``_pos_embed`` (the two give different embeddings at every resampled size: ``tests/test_pos_embed.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from types import MethodType
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import is_exporting
from torch import nn

from gkd.models import convstem  # noqa: F401  (registers vit_convstem16 with timm)
from gkd.models.features import ViTFeatures

DINOV2_INTERPOLATE_OFFSET = 0.1
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.eva", "gkd.models.convstem")


def resample_dinov2_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """``pos_embed`` ``(1, prefix + old_h * old_w, C)`` resampled to ``grid`` as the official DINOv2 models without
    registers do it: bicubic, no antialiasing, scale factor ``(grid + 0.1) / old_grid`` (the prefix kept)."""
    if tuple(grid) == tuple(old_grid) and not is_exporting():
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    patches = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    scale = tuple(float(new + DINOV2_INTERPOLATE_OFFSET) / old for new, old in zip(grid, old_grid, strict=True))
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def official_dinov2_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` for a DINOv2 model without registers (class token, position embedding
    with a class slot, ``dynamic_img_size``), resampling by `resample_dinov2_pos_embed`."""
    batch, height, width, dim = x.shape
    pos_embed = resample_dinov2_pos_embed(self.pos_embed, (height, width), self.patch_embed.grid_size, 1)
    x = torch.cat([self.cls_token.expand(batch, -1, -1), x.view(batch, -1, dim)], dim=1)
    return self.pos_drop(x + pos_embed)


def official_dinov2_pos_embed_at(model: nn.Module, grid: tuple[int, int]) -> torch.Tensor | None:
    """The position embedding ``model`` adds at ``grid`` if it resamples as official DINOv2 does (see
    `official_dinov2_pos_embed`), else ``None`` (timm's own resampling applies)."""
    if vars(model).get("_pos_embed") is None:
        return None
    return resample_dinov2_pos_embed(model.pos_embed.detach(), grid, model.patch_embed.grid_size, 1)


def _uses_official_dinov2_resampling(arch: str, model: nn.Module) -> bool:
    """A timm DINOv2 architecture without registers, built with ``dynamic_img_size`` (the zoo's default)."""
    return (
        arch.split(".")[0].endswith("_dinov2")
        and getattr(model, "reg_token", None) is None
        and getattr(model, "dynamic_img_size", False)
        and not getattr(model, "no_embed_class", True)
    )


def is_supported_vit(arch: str) -> bool:
    """Whether timm builds ``arch`` as a ``VisionTransformer`` (incl. DeiT) or ``Eva``, the models `Backbone` taps."""
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__ in _VIT_MODULES


class Backbone(nn.Module):
    """``timm.create_model(arch, **timm_kwargs)`` (random init) as ``self.model``, behind the feature interface.

    The architecture and its kwargs are kept (``timm_arch``, ``timm_kwargs``), so an encoder file records them
    and rebuilds the same model; ``self.model.state_dict()`` is exactly the timm model's, so a saved student
    encoder loads back into a plain ``timm.create_model(arch)``. `gkd.models.zoo.create_backbone` builds one
    from a zoo spec or timm name and loads weights.

    Args:
        name: the zoo spec or timm name the backbone was asked for (for messages and files).
        arch: the timm architecture: a ``VisionTransformer`` (incl. DeiT) or ``Eva``.
        timm_kwargs: ``timm.create_model`` kwargs (JSON values: they are written to encoder files).
        mean: per-channel normalisation mean; ``None`` = the timm model's ``pretrained_cfg``.
        std: per-channel normalisation std; ``None`` = the timm model's ``pretrained_cfg``.
    """

    def __init__(
        self,
        name: str,
        arch: str,
        timm_kwargs: Mapping[str, Any],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not is_supported_vit(arch):
            raise ValueError(
                f"{name} ({arch}) is not a timm ViT: a backbone is a VisionTransformer (incl. DeiT) or Eva"
            )
        self.model = timm.create_model(arch, pretrained=False, **timm_kwargs)
        if _uses_official_dinov2_resampling(arch, self.model):
            self.model._pos_embed = MethodType(official_dinov2_pos_embed, self.model)
        self.name = name
        self.timm_arch = arch
        self.timm_kwargs = dict(timm_kwargs)
        config = self.model.pretrained_cfg
        mean = mean or config.get("mean", IMAGENET_DEFAULT_MEAN)
        std = std or config.get("std", IMAGENET_DEFAULT_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        """Pixels per token side: the patch, or a conv stem's total stride (``vit_convstem16``: 16)."""
        return int(self.model.patch_embed.feat_ratio())

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_cls_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an input of ``height x width`` pixels (the input is resized up to fill it)."""
        return -(-height // self.patch_size), -(-width // self.patch_size)

    @property
    def final_norm(self) -> nn.Module:
        """The checkpoint's final LayerNorm: ``norm``, or ``fc_norm`` where timm moved it there (EVA02)."""
        norm, fc_norm = self.model.norm, getattr(self.model, "fc_norm", None)
        if isinstance(norm, nn.Identity) and fc_norm is not None and not isinstance(fc_norm, nn.Identity):
            return fc_norm
        return norm

    def resolve_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Negative layer indices count from the last block (``-1`` = last)."""
        for raw in layers:
            if not -self.depth <= raw < self.depth:
                raise ValueError(f"layer {raw} out of range for {self.name} with {self.depth} blocks")
        return tuple(i % self.depth for i in layers)

    def forward(
        self,
        images: torch.Tensor,
        layers: Sequence[int] = (-1,),
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        norm: bool = True,
    ) -> ViTFeatures:
        """Tokens of ``layers`` for ``images`` ``(B, 3, H, W)`` in ``[0, 1]``, each passed through the
        ViT's final norm unless ``norm=False`` (the raw block outputs; `normalise` normalises them later).

        With ``mask`` (``(B, N)`` bool over the patch grid) the embeddings of masked patches are
        replaced by ``mask_token`` (``(C,)``, owned by the caller, e.g. a distiller) before the
        position embedding, as in masked image modelling.

        Args:
            images: ``(B, 3, H, W)`` RGB in ``[0, 1]``; resized up to a multiple of the patch when needed.
            layers: block indices to tap (negative: from the last).
            mask: ``(B, N)`` bool, the patches to replace by ``mask_token``; ``None`` = no masking.
            mask_token: ``(C,)`` embedding for masked patches (required with ``mask``).
            norm: pass the tokens through the ViT's final norm.
        """
        layers = self.resolve_layers(layers)
        grid = self.grid_size(*images.shape[-2:])
        aligned = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        if tuple(images.shape[-2:]) != aligned:
            # timm's patch embedding takes multiples of the patch only; cropping the remainder would drop the
            # image's last rows/columns, so stretch the image up to the next multiple instead.
            images = F.interpolate(images, size=aligned, mode="bilinear", align_corners=False)
        x = (images - self.mean) / self.std
        with self._masked_patches(mask, mask_token):
            outputs = self.model.forward_intermediates(
                x,
                indices=list(layers),
                return_prefix_tokens=True,
                norm=norm,
                output_fmt="NLC",
                intermediates_only=True,
            )
        final_norm = self.final_norm if self.final_norm is not self.model.norm else None
        if norm and final_norm is not None:  # forward_intermediates applied timm's identity `norm`; apply the real one
            outputs = [(final_norm(spatial), final_norm(prefix)) for spatial, prefix in outputs]
        patch_tokens = [spatial for spatial, _ in outputs]
        cls_tokens = [prefix[:, 0] if self.has_cls_token else None for _, prefix in outputs]
        return ViTFeatures(patch_tokens=patch_tokens, cls_tokens=cls_tokens, grid=grid, layers=layers)

    def normalise(self, features: ViTFeatures) -> ViTFeatures:
        """Raw block outputs (``forward(..., norm=False)``) through the ViT's `final_norm`: the same tokens as
        ``forward(..., norm=True)`` (a per-token norm), without a second pass."""
        norm = self.final_norm
        return ViTFeatures(
            patch_tokens=[norm(tokens) for tokens in features.patch_tokens],
            cls_tokens=[None if cls is None else norm(cls) for cls in features.cls_tokens],
            grid=features.grid,
            layers=features.layers,
        )

    @contextmanager
    def _masked_patches(self, mask: torch.Tensor | None, mask_token: torch.Tensor | None):
        # timm's forward_intermediates has no masking argument; a forward hook on the patch embedding
        # swaps masked embeddings for the mask token and works the same for ViT and EVA02 (RoPE) blocks.
        if mask is None:
            yield
            return
        if mask_token is None:
            raise ValueError("a mask needs a mask_token")

        def replace(_module: nn.Module, _inputs: tuple, embeddings: torch.Tensor) -> torch.Tensor:
            flat_mask = mask.reshape(embeddings.shape[0], *embeddings.shape[1:-1], 1)
            return torch.where(flat_mask, mask_token.to(embeddings.dtype), embeddings)

        handle = self.model.patch_embed.register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()
