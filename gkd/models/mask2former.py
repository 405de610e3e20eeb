"""Mask2Former (Cheng et al., CVPR 2022) on a plain ViT, as the GKD authors build it.

The ViT's raw (un-normalised) outputs of four blocks ([3, 5, 7, 11] of a 12-block ViT) are resampled
x4 / x2 / x1 / x0.5 into a pyramid (mmseg's ``Feature2Pyramid``), a multi-scale deformable-attention
pixel decoder fuses its three coarsest levels and adds the finest through an FPN step, and a masked-attention
transformer decoder turns ``queries`` learned queries into (class, mask) pairs. Training matches queries
to the classes present in each image (Hungarian, scipy) and supervises each matched pair with
cross-entropy + sigmoid BCE + dice on sampled points, at every decoder layer. Inference is semantic:
``scores[k] = sum_q softmax(class_q)[k] * sigmoid(mask_q)``, the ``(B, K, h, w)`` output every runtime reads.

The pixel decoder, the transformer decoder and the loss with its matcher are Hugging Face ``transformers``'
Mask2Former modules (optional extra ``mask2former``): their deformable attention is the pure-PyTorch
``grid_sample`` formulation (no custom CUDA op), so it trains on CPU and exports to ONNX; this file adds
only what they lack for a plain ViT: the pyramid, the class head, semantic inference and the conversion of
a label map into per-class target masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

try:
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former import modeling_mask2former as hf
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "decoder 'mask2former' needs Hugging Face transformers: pip install 'gkd-compress[mask2former]'"
    ) from error

from gkd.data.base import IGNORE_INDEX

# The loss weights and point sampling of Mask2Former's semantic-segmentation configs (and the GKD authors'),
# by their `Mask2FormerConfig` names.
LOSS_SETTINGS = {
    "class_weight": 2.0,
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "no_object_weight": 0.1,
    "oversample_ratio": 3.0,
    "importance_sample_ratio": 0.75,
}


class Feature2Pyramid(nn.Module):
    """Four ViT maps at stride p -> strides p/4, p/2, p, 2p, width unchanged (mmseg's ``Feature2Pyramid``)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2),
            nn.BatchNorm2d(embed_dim),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


@dataclass
class QueryOutputs:
    """Per decoder layer (the prediction before the first layer included, the final one last):
    ``class_logits[i]`` ``(B, Q, K + 1)`` (last = no object) and ``mask_logits[i]`` ``(B, Q, h, w)``."""

    class_logits: list[torch.Tensor]
    mask_logits: list[torch.Tensor]


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former's semantic inference: ``(B, K, h, w)`` class scores from one layer's query outputs."""
    probabilities = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", probabilities, mask_logits.sigmoid())


def mask2former_config(
    num_classes: int, channels: int, queries: int, encoder_layers: int, decoder_layers: int, points: int
) -> Mask2FormerConfig:
    """A ``transformers`` config with Mask2Former's semantic defaults at width ``channels``.

    Args:
        num_classes: classes, without the no-object class.
        channels: pixel- and transformer-decoder width (256 in the paper); feed-forward widths scale with it.
        queries: learned queries (100).
        encoder_layers: deformable-attention layers of the pixel decoder (6).
        decoder_layers: masked-attention decoder layers (9).
        points: points per mask for the matcher and the mask losses (112 * 112 = 12544).
    """
    if channels % 32:
        raise ValueError(f"decoder.channels {channels}: mask2former's GroupNorm(32) needs a multiple of 32")
    return Mask2FormerConfig(
        backbone_config=None,
        use_pretrained_backbone=False,
        num_labels=num_classes,
        num_queries=queries,
        hidden_dim=channels,
        feature_size=channels,
        mask_feature_size=channels,
        encoder_layers=encoder_layers,
        # transformers counts the prediction before the first layer as a layer.
        decoder_layers=decoder_layers + 1,
        encoder_feedforward_dim=4 * channels,
        dim_feedforward=8 * channels,
        num_attention_heads=8,
        # transformers also uses `dropout` as layer-drop probability; Mask2Former trains without either.
        dropout=0.0,
        feature_strides=[4, 8, 16, 32],
        common_stride=4,
        train_num_points=points,
        **LOSS_SETTINGS,
    )


class Mask2FormerHead(nn.Module):
    """Pyramid + deformable pixel decoder + masked-attention decoder; ``forward`` gives semantic scores.

    ``takes_raw_tokens``: the segmentor feeds this head the blocks' outputs without the ViT's final norm.
    """

    takes_raw_tokens = True

    def __init__(self, embed_dim: int, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.pyramid = Feature2Pyramid(embed_dim)
        self.pixel_decoder = hf.Mask2FormerPixelDecoder(config, feature_channels=[embed_dim] * 4)
        # transformers creates `level_embed` with the legacy `torch.Tensor(...)` constructor, which ignores a
        # `torch.device` context (the pre-flight check builds models on "meta"); recreate it where the rest is.
        self.pixel_decoder.level_embed = nn.Parameter(torch.empty(self.pixel_decoder.level_embed.shape))
        self.transformer = hf.Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.class_head = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.criterion = Mask2FormerCriterion(config)
        _initialise(self, config)

    def forward_queries(self, maps: list[torch.Tensor]) -> QueryOutputs:
        """Class and mask logits of every decoder layer for four ViT maps ``(B, C, h, w)``."""
        if len(maps) != 4:
            raise ValueError(f"Mask2FormerHead takes 4 encoder layers, got {len(maps)}")
        pixels = self.pixel_decoder(self.pyramid(maps))
        decoded = self.transformer(list(pixels.multi_scale_features), pixels.mask_features)
        return QueryOutputs(
            class_logits=[self.class_head(hidden.transpose(0, 1)) for hidden in decoded.intermediate_hidden_states],
            mask_logits=list(decoded.masks_queries_logits),
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.semantic(self.forward_queries(maps))

    def semantic(self, outputs: QueryOutputs) -> torch.Tensor:
        """Semantic scores ``(B, K, h, w)`` from the last decoder layer's queries."""
        return semantic_scores(outputs.class_logits[-1], outputs.mask_logits[-1])

    def loss(self, outputs: QueryOutputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The set loss of ``outputs`` against ``(B, H, W)`` label maps (see `Mask2FormerCriterion`)."""
        return self.criterion(outputs, labels)


def label_map_targets(labels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, the classes present (ignore excluded) and their binary masks ``(n, H, W)`` float."""
    classes, masks = [], []
    for label in labels:
        present = torch.unique(label)
        present = present[present != IGNORE_INDEX]
        classes.append(present)
        masks.append((label[None] == present[:, None, None]).float())
    return classes, masks


class Mask2FormerCriterion(nn.Module):
    """Mask2Former's semantic set loss, summed with its weights over every decoder layer (deep supervision).

    Per layer: Hungarian matching (scipy's ``linear_sum_assignment``) of queries to the classes in each
    image, on the cost ``2 * (-p_class) + 5 * BCE + 5 * dice`` over ``points`` random points; then
    ``2 * CE`` over all queries (unmatched ones to the no-object class, weighted 0.1) ``+ 5 * BCE + 5 * dice``
    of the matched masks on ``points`` points picked by uncertainty (3x oversampled, 75 % importance),
    both normalised by the number of target masks. Ignored pixels belong to no target mask.
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.hf_loss = hf.Mask2FormerLoss(config, weight_dict={})
        # A constant of the loss, not a weight of the model: keep it out of segmentor files.
        self.hf_loss.register_buffer("empty_weight", self.hf_loss.empty_weight, persistent=False)
        self.weights = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }

    def forward(self, outputs: QueryOutputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        classes, masks = label_map_targets(labels)
        totals = dict.fromkeys(self.weights, 0.0)
        # The image-level losses are float32 whatever the autocast dtype (sigmoid BCE and dice in fp16 underflow).
        with torch.autocast(labels.device.type, enabled=False):
            for class_logits, mask_logits in zip(outputs.class_logits, outputs.mask_logits, strict=True):
                layer = self.hf_loss(mask_logits.float(), class_logits.float(), masks, classes)
                for key in totals:
                    totals[key] = totals[key] + layer[key]
        total = sum(self.weights[key] * value for key, value in totals.items())
        return {
            "loss": total,
            "loss_class": totals["loss_cross_entropy"].detach(),
            "loss_mask": totals["loss_mask"].detach(),
            "loss_dice": totals["loss_dice"].detach(),
        }


def _initialise(head: Mask2FormerHead, config: Mask2FormerConfig) -> None:
    # transformers initialises these modules in `Mask2FormerPreTrainedModel._init_weights` (the original's
    # scheme: the deformable attention's sampling-offset grid, zero attention weights, xavier decoder layers,
    # N(0, 1) level embeddings), which only runs inside its PreTrainedModel; apply it to our modules.
    owner = SimpleNamespace(config=config)
    initialised = (
        hf.Mask2FormerPixelDecoder,
        hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
        hf.Mask2FormerMaskedAttentionDecoderLayer,
        hf.Mask2FormerTransformerModule,
    )
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, initialised):
                hf.Mask2FormerPreTrainedModel._init_weights(owner, module)
