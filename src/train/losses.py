"""Multi-label losses on logits x and targets t in [0, 1], both (N, C); selected by name via `get_loss`.

Definitions (all computed in float32):

- focal (gamma 2, no alpha): BCE-with-logits(x, t) * sigmoid(-x * (2t - 1)) ** gamma, summed over the
  classes, averaged over the images. For binary t the weight is (1 - p_true) ** gamma.
- soft BCE: BCE-with-logits(x, t) summed over the classes, averaged over the images.
- hard log loss (hard-negative mining), per class c over the batch: positives P = {t >= 0.5},
  negatives Q = the rest. All of P plus the k negatives with the highest logits, where
  k = min(|P| + ceil(|Q| / 2), ceil(0.75 |Q|)): about as many negatives as positives plus half of the
  negatives, capped at three quarters of them. BCE against t averaged over the selected images, then
  averaged over the classes. Depends on the batch composition: with gradient accumulation it is
  mined per micro-batch.
- soft hard log loss (soft labels): positives t > 0.75, negatives t < 0.25; the hardest
  ceil(20%) of each (lowest-logit positives, highest-logit negatives); BCE against t averaged over
  the selection, then over the classes that have any selection (0 if none has).
- symmetric Lovasz hinge: the C labels of one image are C pixels of a binary segmentation;
  0.5 * (hinge(x, t) + hinge(-x, 1 - t)) per image (labels binarised at 0.5), averaged over images.
- composites: FocalSymmetricLovaszHardLogLoss = 0.5 focal + 0.5 symmetric Lovasz + 0.5 hard log;
  FocalSymmetricHardLogLoss = focal + 0.25 soft hard log; SoftCEHardLogLoss = soft BCE +
  0.25 soft hard log (the focal-free analogue of the previous one, for soft pseudo-labels);
  FocalSymmetricLovaszSoftHardLogLoss = 0.5 focal + 0.5 symmetric Lovasz + 0.5 soft hard log.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = torch.sigmoid(-logits * (2.0 * targets - 1.0)).pow(gamma)
    return (weight * bce).sum(dim=1).mean()


def soft_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return bce.sum(dim=1).mean()


def _top_k_per_column(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask of the k[c] highest `scores` among `candidates` in each column c (ties: lower row first)."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=0, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(order)
    ranks.scatter_(0, order, rows)
    return candidates & (ranks < k.unsqueeze(0))


def hard_negative_count(num_pos: torch.Tensor, num_neg: torch.Tensor) -> torch.Tensor:
    """k = min(|P| + ceil(|Q| / 2), ceil(0.75 |Q|)), per class."""
    half = torch.div(num_neg + 1, 2, rounding_mode="floor")
    cap = torch.div(3 * num_neg + 3, 4, rounding_mode="floor")
    return torch.minimum(num_pos + half, cap)


def _mean_bce_over_selection(logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    counts = selected.sum(dim=0)
    per_class = (bce * selected).sum(dim=0) / counts.clamp(min=1)
    used = counts > 0
    if not bool(used.any()):
        return logits.sum() * 0.0
    return per_class[used].mean()


def hard_log_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits, targets = logits.float(), targets.float()
    positives = targets >= 0.5
    negatives = ~positives
    k = hard_negative_count(positives.sum(dim=0), negatives.sum(dim=0))
    hard_negatives = _top_k_per_column(logits.detach(), negatives, k)
    return _mean_bce_over_selection(logits, targets, positives | hard_negatives)


def soft_hard_log_loss(logits: torch.Tensor, targets: torch.Tensor, fraction: float = 0.2,
                       positive_above: float = 0.75, negative_below: float = 0.25) -> torch.Tensor:
    logits, targets = logits.float(), targets.float()
    positives = targets > positive_above
    negatives = targets < negative_below

    def count(mask: torch.Tensor) -> torch.Tensor:
        return torch.ceil(mask.sum(dim=0).float() * fraction).long()

    hard_pos = _top_k_per_column(-logits.detach(), positives, count(positives))
    hard_neg = _top_k_per_column(logits.detach(), negatives, count(negatives))
    return _mean_bce_over_selection(logits, targets, hard_pos | hard_neg)


def _lovasz_gradient(sorted_labels: torch.Tensor) -> torch.Tensor:
    """Per row: increments of the Jaccard loss as the sorted pixels join the error set."""
    total = sorted_labels.sum(dim=1, keepdim=True)
    intersection = total - sorted_labels.cumsum(dim=1)
    union = total + (1.0 - sorted_labels).cumsum(dim=1)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_hinge_per_image(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge of each row (image), its columns being the pixels; labels binary. Returns (N,)."""
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    gradient = _lovasz_gradient(torch.gather(labels, 1, order))
    return (F.relu(errors_sorted) * gradient).sum(dim=1)


def symmetric_lovasz_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    labels = (targets.float() >= 0.5).float()
    both = lovasz_hinge_per_image(logits, labels) + lovasz_hinge_per_image(-logits, 1.0 - labels)
    return 0.5 * both.mean()


class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i(logits, targets)."""

    def __init__(self, *terms: tuple[float, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]):
        super().__init__()
        self.terms = terms

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = None
        for weight, loss in self.terms:
            value = weight * loss(logits, targets)
            total = value if total is None else total + value
        return total


LOSSES: dict[str, Callable[[], nn.Module]] = {
    "FocalLoss": lambda: WeightedSum((1.0, focal_loss)),
    "SoftBCELoss": lambda: WeightedSum((1.0, soft_bce_loss)),
    "HardLogLoss": lambda: WeightedSum((1.0, hard_log_loss)),
    "SoftHardLogLoss": lambda: WeightedSum((1.0, soft_hard_log_loss)),
    "SymmetricLovaszLoss": lambda: WeightedSum((1.0, symmetric_lovasz_loss)),
    "FocalSymmetricLovaszHardLogLoss": lambda: WeightedSum(
        (0.5, focal_loss), (0.5, symmetric_lovasz_loss), (0.5, hard_log_loss)),
    "FocalSymmetricLovaszSoftHardLogLoss": lambda: WeightedSum(
        (0.5, focal_loss), (0.5, symmetric_lovasz_loss), (0.5, soft_hard_log_loss)),
    "FocalSymmetricHardLogLoss": lambda: WeightedSum((1.0, focal_loss), (0.25, soft_hard_log_loss)),
    "SoftCEHardLogLoss": lambda: WeightedSum((1.0, soft_bce_loss), (0.25, soft_hard_log_loss)),
}


def get_loss(name: str) -> nn.Module:
    """The loss module called `name` (see LOSSES); unknown names raise ValueError listing the known ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]()


__all__ = ["focal_loss", "soft_bce_loss", "hard_log_loss", "soft_hard_log_loss", "symmetric_lovasz_loss",
           "lovasz_hinge_per_image", "hard_negative_count", "get_loss", "LOSSES", "WeightedSum"]
