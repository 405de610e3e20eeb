"""The trainer's optimisation: AdamW parameter groups (no decay on biases, norms and tokens; layer-wise lr
decay over ViT blocks) and the warm-up + cosine / poly learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from gkd.compress.config import OptimConfig

_NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token", "register_tokens")


def param_groups(module: nn.Module, config: OptimConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and tokens; optional layer-wise lr decay where
    parameter names carry ViT block indices (``blocks.<i>.``)."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    depth = 1 + max((_block_index(name) for name, _ in named), default=-1)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in named:
        decay = 0.0 if param.ndim <= 1 or any(token in name for token in _NO_DECAY_NAMES) else config.weight_decay
        scale = 1.0
        if config.layer_decay is not None and depth:
            layer = _layer_id(name, depth)
            scale = config.layer_decay ** (depth + 1 - layer)
        groups.setdefault((decay, scale), []).append(param)
    return [{"params": ps, "weight_decay": wd, "lr": config.lr * s, "lr_scale": s} for (wd, s), ps in groups.items()]


def _block_index(name: str) -> int:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "blocks" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def _layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for everything after the blocks (heads, projectors)."""
    block = _block_index(name)
    if block >= 0:
        return block + 1
    if any(key in name for key in ("patch_embed", *_NO_DECAY_NAMES)):
        return 0
    return depth + 1


def lr_factor(step: int, config: OptimConfig) -> float:
    """Linear warm-up, then cosine / poly (``poly_power``; mmseg's PolyLR, whose configs use 0.9) decay to
    ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = (1 - progress) ** config.poly_power
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def build_optimizer(
    groups: list[dict], config: OptimConfig, fused: bool
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` (`param_groups`) and its schedule (`lr_factor`), stepped once per optimizer step."""
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return optimizer, scheduler
