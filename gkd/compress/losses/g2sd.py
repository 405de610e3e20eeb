"""G2SD, generic stage: Huang et al., "Generic-to-Specific Distillation of Masked Autoencoders",
CVPR 2023 (Sec. 3.2, generic distillation).

A fraction ``r`` of the student's input patches is masked; a light transformer decoder ``D`` on top of
the student's tokens, with a prediction MLP ``P`` (``Linear -> GELU -> Linear``, to the teacher width),
predicts the teacher's features of *all* patches, visible and masked::

    Y     = P( D( W_e S_masked + b_e ) )                       (resampled onto the teacher grid)
    L_g2sd = w * mean_{b,n,c} smoothL1_beta( Y - LN(T) )

``LN`` is a LayerNorm without affine parameters (eps 1e-6) on the teacher tokens, ``smoothL1_beta``
the Huber-type loss with ``beta = 2``. Defaults are the paper's and its code's
(github.com/pengzhiliang/G2SD, ``G2SD/engine_distill.py``, ``G2SD/GD.sh``, ``models_mae.py``): ``r = 0.75``,
decoder width 256, 4 blocks, 8 heads (``mae_vit_small_patch16_dec256d4b``), ``beta = 2``. The released
code weights its second, encoder-side term by 0; it is left out.

Adaptations to this toolkit (not in the paper): the teacher is a vision foundation model, not an MAE,
so the targets are its (last-layer) tokens rather than an MAE decoder's hidden features; masked
patches are replaced by a learned mask token at the student's input (SimMIM-style, through
``Backbone``'s masking) instead of being dropped from the encoder, so the decoder needs neither extra
mask tokens nor its own position embedding (each token already carries its position).
``decoder_depth: 0`` leaves only the embedding and the prediction MLP. The specific (task) stage of
G2SD is logit distillation from a fine-tuned teacher: use ``vanilla_kd`` for it. This loss uses only
its own masked pass; of the caller's unmasked ``student_feats`` only the layers and grid are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.models.vision_transformer import Block
from torch import nn

from gkd.compress.losses.base import (
    FeatureDistillLoss,
    SingleLayerOptions,
    masked_student_pass,
    student_on_teacher_grid,
    total,
)
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures


class G2SDLoss(FeatureDistillLoss):
    """Masked-student, light-decoder prediction of the teacher's features of every patch."""

    class Options(SingleLayerOptions):
        mask_ratio: float = Field(0.75, ge=0, le=1)
        decoder_dim: int = Field(256, ge=1)
        decoder_depth: int = Field(4, ge=0)
        decoder_heads: int = Field(8, ge=1)
        beta: float = Field(2.0, gt=0, description="smooth-L1 transition point")
        weight: float = Field(1.0, ge=0)

        @model_validator(mode="after")
        def _heads_divide(self) -> G2SDLoss.Options:
            if self.decoder_dim % self.decoder_heads:
                raise ValueError(f"decoder_heads {self.decoder_heads} does not divide decoder_dim {self.decoder_dim}")
            return self

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        self.mask_token = nn.Parameter(torch.zeros(student_dim))
        self.decoder_embed = nn.Linear(student_dim, options.decoder_dim)
        self.decoder = nn.Sequential(
            *(Block(options.decoder_dim, options.decoder_heads, qkv_bias=True) for _ in range(options.decoder_depth))
        )
        self.predictor = nn.Sequential(
            nn.Linear(options.decoder_dim, teacher_dim), nn.GELU(), nn.Linear(teacher_dim, teacher_dim)
        )

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        opts = self.options
        masked, _ = masked_student_pass(student, images, student_feats, opts.mask_ratio, 1.0, self.mask_token)
        predicted = self.predictor(self.decoder(self.decoder_embed(masked.patch_tokens[0])))
        predicted = student_on_teacher_grid(predicted, masked.grid, teacher_feats.grid)
        target = teacher_feats.patch_tokens[0].float()
        target = F.layer_norm(target, target.shape[-1:], eps=1e-6)
        return total({"loss_g2sd": opts.weight * F.smooth_l1_loss(predicted, target, beta=opts.beta)})
