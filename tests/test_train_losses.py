"""Each loss against a slow reference written with Python loops and the formulas of losses.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.train.losses import (LOSSES, focal_loss, get_loss, hard_log_loss, soft_bce_loss, soft_hard_log_loss,
                              symmetric_lovasz_loss)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, t: float) -> float:
    p = _sigmoid(x)
    return -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))


def ref_focal(x: np.ndarray, t: np.ndarray, gamma: float = 2.0) -> float:
    total = 0.0
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            total += _bce(x[i, c], t[i, c]) * _sigmoid(-x[i, c] * (2 * t[i, c] - 1)) ** gamma
    return total / x.shape[0]


def ref_soft_bce(x: np.ndarray, t: np.ndarray) -> float:
    return sum(_bce(x[i, c], t[i, c]) for i in range(x.shape[0]) for c in range(x.shape[1])) / x.shape[0]


def ref_hard_log(x: np.ndarray, t: np.ndarray) -> float:
    per_class = []
    for c in range(x.shape[1]):
        positives = [i for i in range(x.shape[0]) if t[i, c] >= 0.5]
        negatives = [i for i in range(x.shape[0]) if t[i, c] < 0.5]
        k = min(len(positives) + math.ceil(len(negatives) / 2), math.ceil(0.75 * len(negatives)))
        hardest = sorted(negatives, key=lambda i: -x[i, c])[:k]
        chosen = positives + hardest
        per_class.append(sum(_bce(x[i, c], t[i, c]) for i in chosen) / len(chosen))
    return sum(per_class) / len(per_class)


def ref_soft_hard_log(x: np.ndarray, t: np.ndarray) -> float:
    per_class = []
    for c in range(x.shape[1]):
        positives = [i for i in range(x.shape[0]) if t[i, c] > 0.75]
        negatives = [i for i in range(x.shape[0]) if t[i, c] < 0.25]
        chosen = (sorted(positives, key=lambda i: x[i, c])[:math.ceil(0.2 * len(positives))]
                  + sorted(negatives, key=lambda i: -x[i, c])[:math.ceil(0.2 * len(negatives))])
        if chosen:
            per_class.append(sum(_bce(x[i, c], t[i, c]) for i in chosen) / len(chosen))
    return sum(per_class) / len(per_class) if per_class else 0.0


def _jaccard_loss_of_error_set(errors: set[int], positives: set[int]) -> float:
    """Delta_J(M) = 1 - |P minus M| / |P union M| (0 for an empty union)."""
    union = positives | errors
    return 0.0 if not union else 1.0 - len(positives - errors) / len(union)


def ref_lovasz_hinge(logits: list[float], labels: list[int]) -> float:
    """Lovasz extension of the Jaccard loss evaluated at the hinge errors, from the set function."""
    errors = [1.0 - x * (2 * y - 1) for x, y in zip(logits, labels)]
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    positives = {i for i, y in enumerate(labels) if y == 1}
    total, previous, chosen = 0.0, 0.0, set()
    for i in order:
        chosen.add(i)
        current = _jaccard_loss_of_error_set(chosen, positives)
        total += max(errors[i], 0.0) * (current - previous)
        previous = current
    return total


def ref_symmetric_lovasz(x: np.ndarray, t: np.ndarray) -> float:
    values = []
    for i in range(x.shape[0]):
        labels = [int(v >= 0.5) for v in t[i]]
        values.append(0.5 * (ref_lovasz_hinge(list(x[i]), labels)
                             + ref_lovasz_hinge(list(-x[i]), [1 - y for y in labels])))
    return sum(values) / len(values)


REFERENCES = {"focal": (focal_loss, ref_focal), "soft_bce": (soft_bce_loss, ref_soft_bce),
              "hard_log": (hard_log_loss, ref_hard_log), "soft_hard_log": (soft_hard_log_loss, ref_soft_hard_log),
              "lovasz": (symmetric_lovasz_loss, ref_symmetric_lovasz)}
COMPOSITES = {
    "FocalSymmetricLovaszHardLogLoss": ((0.5, ref_focal), (0.5, ref_symmetric_lovasz), (0.5, ref_hard_log)),
    "FocalSymmetricLovaszSoftHardLogLoss": ((0.5, ref_focal), (0.5, ref_symmetric_lovasz), (0.5, ref_soft_hard_log)),
    "FocalSymmetricHardLogLoss": ((1.0, ref_focal), (0.25, ref_soft_hard_log)),
    "SoftCEHardLogLoss": ((1.0, ref_soft_bce), (0.25, ref_soft_hard_log)),
    "FocalLoss": ((1.0, ref_focal),),
    "HardLogLoss": ((1.0, ref_hard_log),),
    "SymmetricLovaszLoss": ((1.0, ref_symmetric_lovasz),),
}


def _inputs(kind: str, seed: int, n: int = 7, c: int = 19) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2.0, size=(n, c))
    if kind == "binary":
        t = (rng.random((n, c)) < 0.3).astype(np.float64)
        t[:, 0] = 1.0  # a class positive in every image
        t[0, :] = 0.0  # an image without any label
    else:
        t = rng.choice([0.0, 0.1, 0.2, 0.5, 0.8, 0.95, 1.0], size=(n, c))
    return x, t


@pytest.mark.parametrize("kind", ["binary", "soft"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_equals_slow_reference(name: str, kind: str, seed: int) -> None:
    fast, slow = REFERENCES[name]
    x, t = _inputs(kind, seed)
    value = fast(torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert float(value) == pytest.approx(slow(x, t), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composites_are_the_documented_weighted_sums(name: str) -> None:
    x, t = _inputs("binary", 3)
    expected = sum(weight * ref(x, t) for weight, ref in COMPOSITES[name])
    logits = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    value = get_loss(name)(logits, torch.tensor(t, dtype=torch.float32))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_finite_for_extreme_logits_and_small_batches(name: str) -> None:
    for n in (1, 3):
        logits = (torch.randn(n, 19) * 60).requires_grad_(True)
        targets = (torch.rand(n, 19) < 0.2).float()
        value = get_loss(name)(logits, targets)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_soft_hard_log_loss_without_confident_labels_is_zero_with_a_gradient() -> None:
    logits = torch.randn(4, 19, requires_grad=True)
    value = soft_hard_log_loss(logits, torch.full((4, 19), 0.5))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.isfinite(logits.grad).all()


def test_focal_weight_down_weights_easy_examples() -> None:
    targets = torch.ones(1, 19)
    easy, hard = focal_loss(torch.full((1, 19), 4.0), targets), focal_loss(torch.full((1, 19), -4.0), targets)
    assert float(hard) > 100 * float(easy)


def test_lovasz_perfect_margin_is_zero() -> None:
    targets = (torch.rand(5, 19) < 0.3).float()
    assert float(symmetric_lovasz_loss((targets * 2 - 1) * 3.0, targets)) == 0.0


def test_unknown_loss_name() -> None:
    with pytest.raises(ValueError, match="known"):
        get_loss("NoSuchLoss")
