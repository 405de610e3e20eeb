"""Parity of an exported artifact with PyTorch fp32, judged the way deployment tools judge it.

Polygraphy-style: an artifact's logits pass when every |difference| is within ``atol + rtol * range``, where
``range`` is the spread (max - min) of the reference logits, so one tolerance fits models whose logits span 5
or 50; when the argmax class agrees on at least ``min_argmax_agreement`` of the pixels; and when every logit
is finite. Each precision has its own defaults (`gkd.export.config.ParityConfig`), chosen to hold on CPU and
on GPU (where convolutions run in TF32 and AOTInductor picks other kernels than eager: ~1e-3 of the logit
range). Reduced precisions are also judged by their mIoU drop in the benchmark stage.
"""

from __future__ import annotations

import numpy as np

from gkd.export.precisions import ParityTolerance


class ParityError(RuntimeError):
    """An artifact's output cannot be compared with PyTorch's at all (another shape)."""


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max / mean |difference|, the reference logits' range, and the fraction of pixels whose argmax agrees."""
    if candidate.shape != reference.shape:
        raise ParityError(f"logits of shape {candidate.shape}, PyTorch's {reference.shape}")
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    finite = bool(np.isfinite(candidate).all())
    difference = np.abs(reference - candidate) if finite else np.full(reference.shape, np.inf)
    return {
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
        "reference_range": float(reference.max() - reference.min()),
        "argmax_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "finite": finite,
    }


def judge(comparison: dict, tolerance: ParityTolerance) -> dict:
    """``comparison`` (from `compare_logits`) with the tolerance applied: ``passed`` and, when not, ``reason``."""
    limit = tolerance.atol + tolerance.rtol * comparison["reference_range"]
    reasons = []
    if not comparison["finite"]:
        reasons.append("non-finite logits")
    elif comparison["max_abs_diff"] > limit:
        reasons.append(
            f"max |logit difference| {comparison['max_abs_diff']:.3g} > {limit:.3g} "
            f"(atol {tolerance.atol:g} + rtol {tolerance.rtol:g} x logit range {comparison['reference_range']:.3g})"
        )
    if comparison["argmax_agreement"] < tolerance.min_argmax_agreement:
        reasons.append(f"argmax agreement {comparison['argmax_agreement']:.4f} < {tolerance.min_argmax_agreement:g}")
    judged = {**comparison, "limit": limit, "tolerance": tolerance.model_dump(), "passed": not reasons}
    if reasons:
        judged["reason"] = "; ".join(reasons)
    return judged
