"""Validation metrics of the image-level model: focal loss and macro mAP (plus a class-frequency baseline)."""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from src.train.losses import focal_loss


def macro_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean over the classes with at least one positive (target >= 0.5) of sklearn's average precision."""
    labels = np.asarray(targets) >= 0.5
    scores = np.asarray(scores, dtype=np.float64)
    per_class = []
    for column in range(labels.shape[1]):
        if labels[:, column].any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per_class.append(average_precision_score(labels[:, column], scores[:, column]))
    return float(np.mean(per_class)) if per_class else float("nan")


def class_frequency_map(train_targets: np.ndarray, valid_targets: np.ndarray) -> float:
    """Macro mAP on the validation set of a model that predicts every image's class frequencies of the
    training set (a constant per class: its AP equals the class's validation prevalence)."""
    prior = (np.asarray(train_targets) >= 0.5).mean(axis=0)
    return macro_average_precision(valid_targets, np.broadcast_to(prior, np.shape(valid_targets)))


def image_level_metrics(train_targets: np.ndarray | None = None) -> Callable[[np.ndarray, np.ndarray], dict]:
    """metrics_fn for `fit`: val_focal_loss, val_map and, given the training targets, val_map_prior
    (the class-frequency baseline)."""

    def metrics(logits: np.ndarray, targets: np.ndarray) -> dict:
        result = {"val_focal_loss": float(focal_loss(torch.from_numpy(logits), torch.from_numpy(targets))),
                  "val_map": macro_average_precision(targets, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))))}
        if train_targets is not None:
            result["val_map_prior"] = class_frequency_map(train_targets, targets)
        return result

    return metrics
