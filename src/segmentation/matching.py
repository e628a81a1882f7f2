"""Matching a predicted cell mask against a reference mask by IoU (the challenge's rule: IoU >= 0.6).

With a threshold above 0.5 each reference cell can match at most one predicted cell and vice
versa, so "best IoU per reference cell >= threshold" is already a one-to-one matching.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def iou_matrix(reference: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(n_reference, n_predicted) IoU of every pair of labels (labels 1..max; absent labels give 0 rows)."""
    if reference.shape != predicted.shape:
        raise ValueError(f"mask shapes differ: {reference.shape} vs {predicted.shape}")
    n_ref, n_pred = int(reference.max()), int(predicted.max())
    pairs = reference.astype(np.int64).ravel() * (n_pred + 1) + predicted.ravel()
    joint = np.bincount(pairs, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)
    ref_area = joint.sum(axis=1)[1:, None]
    pred_area = joint.sum(axis=0)[None, 1:]
    intersection = joint[1:, 1:]
    union = ref_area + pred_area - intersection
    return np.divide(intersection, union, out=np.zeros(intersection.shape, np.float64), where=union > 0)


@dataclass(frozen=True)
class MatchStats:
    """Per-image match statistics. `mean_iou` is the mean best IoU over reference cells."""

    n_reference: int
    n_predicted: int
    matched: int              # reference cells with a predicted cell at IoU >= threshold
    mean_iou: float
    unmatched_predicted: int  # predicted cells with no reference cell at IoU >= threshold ("spurious")

    @property
    def match_rate(self) -> float:
        return self.matched / self.n_reference if self.n_reference else 1.0

    @property
    def spurious_rate(self) -> float:
        return self.unmatched_predicted / self.n_predicted if self.n_predicted else 0.0


def match_masks(reference: np.ndarray, predicted: np.ndarray, threshold: float = 0.6) -> MatchStats:
    """Match statistics of `predicted` against `reference` (both label masks of the same shape)."""
    ious = iou_matrix(reference, predicted)
    ref_present = np.bincount(reference.ravel(), minlength=ious.shape[0] + 1)[1:] > 0
    pred_present = np.bincount(predicted.ravel(), minlength=ious.shape[1] + 1)[1:] > 0
    ious = ious[ref_present][:, pred_present]
    best_ref = ious.max(axis=1) if ious.shape[1] else np.zeros(ious.shape[0])
    best_pred = ious.max(axis=0) if ious.shape[0] else np.zeros(ious.shape[1])
    return MatchStats(n_reference=int(ious.shape[0]), n_predicted=int(ious.shape[1]),
                      matched=int((best_ref >= threshold).sum()),
                      mean_iou=float(best_ref.mean()) if best_ref.size else float("nan"),
                      unmatched_predicted=int((best_pred < threshold).sum()))
