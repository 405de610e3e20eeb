"""Memory a frozen DINOv2 teacher takes on each rank: bf16 weights and no_grad activations, estimated.

The model is built by timm on the meta device (no memory, no weights file): parameters are counted there; the
activations are estimated analytically from its shapes. Under ``no_grad`` a block's inputs are freed once its
output exists, so the peak is the resident output features plus the largest block's working set:
``x`` (N x D), its LayerNorm, then either the attention's ``qkv`` (3 N D) and output (N D) -- with scaled-dot-
product attention that never materialises the N x N scores (flash / memory-efficient kernels) -- or the MLP's
hidden activations (``fc1`` output and its activation). The "math attention" column adds the B x H x N x N
bf16 scores for kernels that do materialise them. Nothing here was measured on a GPU: allocator caching,
cuBLAS workspaces and fragmentation come on top.

    python benchmarks/teacher_memory.py --img-size 512 --patch-size 16 --batch 8
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

MODELS = {"DINOv2-L": "vit_large_patch14_dinov2", "DINOv2-g": "vit_giant_patch14_dinov2"}
BF16 = 2
GIB = 2**30


def estimate(timm_name: str, img_size: int, patch_size: int, batch: int, kept_layers: int) -> dict[str, float]:
    """Parameters and bf16 memory (GiB) of ``timm_name`` at ``img_size`` with ``patch_size`` patches."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, img_size=img_size, patch_size=patch_size)
    params = sum(p.numel() for p in model.parameters())
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    mlp = model.blocks[0].mlp
    fc1_out = mlp.fc1.out_features
    hidden = fc1_out // 2 if type(mlp).__name__ == "SwiGLUPacked" else fc1_out  # gated: fc1 holds two halves
    tokens = (img_size // patch_size) ** 2 + model.num_prefix_tokens
    attention = 2 * tokens * dim + 3 * tokens * dim + tokens * dim  # x, LayerNorm, qkv, attention output
    feed_forward = 2 * tokens * dim + fc1_out * tokens + hidden * tokens  # x, LayerNorm, fc1, activation
    kept = kept_layers * tokens * dim  # the block outputs the distillation losses read
    activations = batch * BF16 * (kept + max(attention, feed_forward))
    scores = batch * BF16 * heads * tokens**2
    return {
        "params_m": params / 1e6,
        "weights_gib": params * BF16 / GIB,
        "activations_gib": activations / GIB,
        "math_attention_gib": (activations + scores) / GIB,
        "tokens": tokens,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=16, help="GKD runs every backbone at patch 16")
    parser.add_argument("--batch", type=int, default=8, help="images per rank")
    parser.add_argument("--kept-layers", type=int, default=4, help="block outputs kept for the losses")
    args = parser.parse_args(argv)
    print(f"estimated on the meta device, not measured on a GPU; batch {args.batch} per rank, bf16")
    print("| teacher | params | tokens | weights | activations (SDPA) | activations (math attention) |")
    print("|---|---|---|---|---|---|")
    for label, name in MODELS.items():
        row = estimate(name, args.img_size, args.patch_size, args.batch, args.kept_layers)
        print(
            f"| {label} ({name}) | {row['params_m']:.0f} M | {row['tokens']} | {row['weights_gib']:.2f} GiB | "
            f"{row['activations_gib']:.2f} GiB | {row['math_attention_gib']:.2f} GiB |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
