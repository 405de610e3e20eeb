"""Vanilla (logit) knowledge distillation, Hinton et al., "Distilling the Knowledge in a Neural
Network" (2015), applied pixel-wise to segmentation logits.

With ``q^t = softmax(z^t / tau)`` and ``q^s = softmax(z^s / tau)`` over the ``K`` classes at each pixel
``p`` and ``V`` the pixels not ignored::

    L_kd = w * tau^2 * (1 / |V|) * sum_{p in V} sum_k q^t_k(p) * (log q^t_k(p) - log q^s_k(p))

(the KL term of Hinton et al.'s Sec. 2, whose ``tau^2`` keeps gradient magnitudes independent of the
temperature; the GKD poster's "Problem Formulation" writes the same term as ``beta * H(sigma(z; tau), ...)``).
Defaults ``tau = 1``, ``w = 1``: the logit-KD settings of the segmentation KD codebases the CWD and
Af-DCD baselines come from (``--kd-temperature 1.0``, ``--lambda-kd 1.0`` in their ``train_kd.py``); GKD
does not state its own. The teacher is a segmentor trained on the labeled source domain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gkd.compress.losses.base import LogitDistillLoss, masked_mean


class VanillaKDLoss(LogitDistillLoss):
    """Pixel-wise KL(teacher || student) of temperature-softened class distributions, times tau^2."""

    term = "loss_kd"  # temperature and weight default to 1 (LogitDistillLoss.Options)

    def divergence(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        tau = self.options.temperature
        log_q_s = F.log_softmax(student_logits / tau, dim=1)
        log_q_t = F.log_softmax(teacher_logits / tau, dim=1)
        per_pixel = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1)
        return tau**2 * masked_mean(per_pixel, valid)
