"""QSD, query-based soft distillation: the distillation loss of GKD (Lv et al., "Generalizable Knowledge
Distillation from Vision Foundation Models for Semantic Segmentation", CVPR 2026, arXiv 2603.02554).

"Student features act as queries to teacher representations to selectively retrieve transferable
spatial knowledge" (abstract). Per layer pair, with student tokens ``S`` (``(B, N, C_s)``, resampled
onto the teacher grid), teacher tokens ``T`` (``(B, N, C_t)``) and class tokens ``s_cls``, ``t_cls``,
a retrieval head ``R`` (one per term) is::

    Q = W_q LN_q(S) + b_q,   K = T,   V = W_v LN_v(S) + b_v              (C_s -> C_t projections)
    R(S, T) = softmax( Q K^T / tau ) V          (softmax over the N teacher positions; h heads split C_t)

i.e. every student token attends over the teacher's spatial positions and retrieves, as a soft
mixture, the (projected) student tokens sitting where the teacher's tokens match its query. The
terms, each a mean squared error over batch, tokens and channels::

    L_cls  = MSE( W_c LN_c(s_cls) + b_c , t_cls )                               (CLS token)
    L_feat = MSE( [W_c LN_c(s_cls) + b_c ; R_feat(S, T)] , [t_cls ; T] )        (Feature)
    L_mask = MSE( R_mask(S_masked, T) , T )                                       (Mask Patch)
    L_QSD  = w_cls L_cls + w_feat L_feat + w_mask L_mask

``S_masked`` are the student's tokens of a second pass in which ``int(N_s * mask_ratio)`` random
patches of the first ``int(B * mask_probability)`` images are replaced by a learned mask token (the
other images pass unmasked); ``L_mask`` covers every patch, visible or masked. With several layer
pairs each term is averaged over the pairs.

Sources, part by part:

* Confirmed from the authors' released code (github.com/Younger-hua/GKD,
  ``general_distillation/distillation_models_deit.py``: class ``QSD`` and ``MetaArch.forward``;
  ``train_script/*.sh``): queries from ``LayerNorm + Linear`` of the student tokens, keys the raw teacher
  tokens, values ``LayerNorm + Linear`` of the student tokens; one head; *no* scaling of ``Q K^T``
  (here: ``tau = 1``); a separate head for each of the three terms; the three MSE terms above, the
  feature term concatenating the CLS token with the patch tokens, the mask term over all patches of
  the masked pass; last-layer normalised tokens; defaults ``lambda_token = lambda_fea = lambda_patch = 1``,
  ``mask_probability = 0.5``, ``mask_ratio = 0.5`` (masks on the first samples of the batch) for both
  task-agnostic (ImageNet) and domain-agnostic (source) distillation.
* Equivalent rewrite: the released token head is a QSD head applied to a single query and a single
  key, whose softmax is identically 1; it reduces to its value projection ``W_c LN_c(.)``, which is
  what is built here (so no parameter goes without a gradient).
* Choices of this implementation (not in the paper or code): ``temperature`` and ``num_heads`` as
  options (the code's values, 1 and 1, are the defaults); the switches ``cls_token`` / ``feature`` /
  ``mask_patch`` mirror the rows of the paper's Table 5 ablation — with ``cls_token`` off the CLS token
  also leaves the feature term (in the released code it is always there); where the grids still differ
  they are aligned by bilinear resampling of the student tokens (the released code, and the paper recipes
  through ``patch_size``, convert the patch embeddings so they coincide); the paper's method-section
  equations could not be read here,
  so their notation is not reproduced.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from gkd.compress.losses.base import LayerPairOptions, ln_linear
from gkd.compress.losses.token_terms import TermNames, TokenTermsLoss


class QueryRetrieval(nn.Module):
    """``R(S, T) = softmax(Q K^T / tau) V`` with ``Q``, ``V`` projected from the student, ``K = T``.

    Args:
        student_dim: the student's token width ``C_s``.
        teacher_dim: the teacher's token width ``C_t`` (the width of ``Q``, ``K``, ``V``).
        num_heads: ``h``, heads splitting ``C_t``.
        temperature: ``tau``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_heads: int, temperature: float) -> None:
        super().__init__()
        if teacher_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide the teacher width {teacher_dim}")
        self.num_heads = num_heads
        self.temperature = temperature
        self.query = ln_linear(student_dim, teacher_dim)
        self.value = ln_linear(student_dim, teacher_dim)

    def attention(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, h, N, N)`` soft assignment of each student token (row) to the teacher positions."""
        q = self._split(self.query(student_tokens))
        k = self._split(teacher_tokens)
        # Unscaled dot products of wide tokens are large: keep the softmax out of reduced precision.
        with torch.autocast(q.device.type, enabled=False):
            return (q.float() @ k.float().transpose(-2, -1) / self.temperature).softmax(dim=-1)

    def forward(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        attn = self.attention(student_tokens, teacher_tokens)
        v = self._split(self.value(student_tokens))
        with torch.autocast(v.device.type, enabled=False):
            retrieved = attn @ v.float()
        b, _, n, _ = retrieved.shape
        return retrieved.transpose(1, 2).reshape(b, n, -1)

    def _split(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        return tokens.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)


class QSDLoss(TokenTermsLoss):
    """Query-based soft distillation (CLS token, feature and mask-patch terms, each switchable)."""

    NAMES = TermNames("qsd", ("loss_cls", "loss_feat", "loss_mask"), "cls", "mask", masked_only=False)

    class Options(LayerPairOptions):
        cls_token: bool = Field(True, description="CLS-token term (Table 5, 'CLS Token')")
        cls_weight: float = Field(1.0, ge=0, description="lambda_token of the released code")
        feature: bool = Field(True, description="query-retrieved feature term (Table 5, 'Feature')")
        feature_weight: float = Field(1.0, ge=0, description="lambda_fea of the released code")
        mask_patch: bool = Field(True, description="masked-patch term (Table 5, 'Mask Patch')")
        mask_weight: float = Field(1.0, ge=0, description="lambda_patch of the released code")
        temperature: float = Field(1.0, gt=0, description="softmax(Q K^T / temperature); released code: 1")
        num_heads: int = Field(1, ge=1, description="retrieval heads splitting the teacher width")
        mask_ratio: float = Field(0.5, ge=0, le=1, description="fraction of patches masked in a masked image")
        mask_probability: float = Field(0.5, ge=0, le=1, description="fraction of the batch that is masked")

        @model_validator(mode="after")
        def _some_term(self) -> QSDLoss.Options:
            if not (self.cls_token or self.feature or self.mask_patch):
                raise ValueError("cls_token, feature, mask_patch: switch at least one QSD term on")
            return self

    def head_switches(self) -> dict[str, bool]:
        return {"cls": self.options.cls_token, "feature": self.options.feature, "mask": self.options.mask_patch}

    def new_head(self, key: str, student_dim: int, teacher_dim: int) -> nn.Module:
        if key == "cls":
            return ln_linear(student_dim, teacher_dim)
        return QueryRetrieval(student_dim, teacher_dim, self.options.num_heads, self.options.temperature)

    def cls_term(self) -> bool:
        return self.options.cls_token

    def predict(self, head: nn.Module, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return head(tokens, target)

    def weights(self) -> tuple[float, float, float]:
        return self.options.cls_weight, self.options.feature_weight, self.options.mask_weight
