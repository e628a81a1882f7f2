"""Per-class gradient-boosted trees on the cell descriptors of `cell_features`, fit to soft targets.

A soft target t in [0, 1] is fit as two weighted rows, (x, 1) with weight t and (x, 0) with weight
1 - t: the log loss of those two rows is the cross-entropy against t. Negative is not fit: like the
CNN's, it is min over classes of (1 - P_c), applied where the predictions are used.

`relabel_targets` is one multiple-instance step on weak targets: the classifier's out-of-fold
predictions (folds of whole images) become the targets, and in a field labelled with a class each
cell's target for it is its prediction over the best prediction among the field's cells, so the
cells that look least like the class in a field labelled with it stop teaching that they show it.

A saved model may also carry a multiple-instance MLP (`cell_mil`, key "mil", fit to the image labels
alone); `predict_cell_classifier` then returns the mean of the trees and the MLP.
"""
from __future__ import annotations

import os
from pathlib import Path

import joblib
import numpy as np
from joblib import Parallel, delayed
from sklearn.ensemble import HistGradientBoostingClassifier

from src.data.classes import NEGATIVE, NUM_CLASSES
from src.features import cell_mil
from src.features.cell_features import FEATURE_NAMES
from src.utils.io import UserInputError, atomic_path

FORMAT = 2  # 2: the optional "mil" part
MIN_TARGET = 0.05  # a class whose targets stay within this of 0 (or of 1) has nothing to learn: its mean
# Each leaf holds at least this many cells: weak targets of a class seen in a few fields are not
# memorised cell by cell. 60 chosen on style 1 among 5, 20, 40, 60, 80, 120 (README); at 5 the trees
# gave single cells of other classes confident scores that drowned the CNN's sharp ones.
MIN_CELLS_PER_LEAF = 60


def _fit_one(features: np.ndarray, target: np.ndarray, seed: int, max_iter: int, learning_rate: float,
             min_cells_per_leaf: int) -> HistGradientBoostingClassifier:
    # a cell is two rows with equal features, so they share every leaf: rows per leaf = 2 x cells
    model = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=15,
                                           min_samples_leaf=2 * min_cells_per_leaf, l2_regularization=1.0,
                                           early_stopping=False, random_state=seed)
    outcome = np.r_[np.ones(len(features)), np.zeros(len(features))]
    return model.fit(np.concatenate([features, features]), outcome, sample_weight=np.r_[target, 1 - target] + 1e-6)


def fit_cell_classifier(features: np.ndarray, targets: np.ndarray, seed: int = 0, max_iter: int = 150,
                        learning_rate: float = 0.05, workers: int = 1,
                        min_cells_per_leaf: int = MIN_CELLS_PER_LEAF) -> dict:
    """One classifier per class from (N, F) features and (N, 19) soft targets, `workers` classes at a
    time, each tree leaf holding at least `min_cells_per_leaf` cells; Negative is None, and a class
    whose targets never leave [0, MIN_TARGET) or (1 - MIN_TARGET, 1] is its mean target (a float).
    The result is what `predict_cell_classifier` and `save` take."""
    if features.ndim != 2 or features.shape[1] != len(FEATURE_NAMES) or len(features) != len(targets):
        raise ValueError(f"features {features.shape} and targets {targets.shape} do not match "
                         f"({len(FEATURE_NAMES)} features per cell)")
    clipped = np.clip(targets.astype(np.float64), 0, 1)
    classes = [cls for cls in range(NUM_CLASSES) if cls != NEGATIVE and clipped[:, cls].max() >= MIN_TARGET
               and clipped[:, cls].min() <= 1 - MIN_TARGET]
    fitted = Parallel(n_jobs=max(workers, 1))(
        delayed(_fit_one)(features, clipped[:, cls], seed, max_iter, learning_rate, min_cells_per_leaf)
        for cls in classes)
    models: list[HistGradientBoostingClassifier | float | None] = [
        None if cls == NEGATIVE else float(clipped[:, cls].mean()) if len(clipped) else 0.0 for cls in range(NUM_CLASSES)]
    for cls, model in zip(classes, fitted):
        models[cls] = model
    return {"format": FORMAT, "feature_names": list(FEATURE_NAMES), "models": models, "mil": None}


def out_of_fold_predictions(features: np.ndarray, targets: np.ndarray, image_ids: np.ndarray, n_folds: int = 3,
                            seed: int = 0, **fit_options) -> np.ndarray:
    """(N, 19) predictions of each cell by a classifier fit without its image's fold (images are dealt
    to `n_folds` folds in a seeded random order); `fit_options` go to `fit_cell_classifier`."""
    images = np.unique(image_ids)
    fold_of_image = dict(zip(np.random.default_rng(seed).permutation(images), np.arange(len(images)) % n_folds))
    fold = np.array([fold_of_image[image_id] for image_id in image_ids])
    predictions = np.zeros((len(features), NUM_CLASSES))
    for k in range(n_folds):
        held_out = fold == k
        if held_out.any() and not held_out.all():
            classifier = fit_cell_classifier(features[~held_out], targets[~held_out], seed, **fit_options)
            predictions[held_out] = predict_cell_classifier(classifier, features[held_out])
    return predictions


def relabel_targets(predictions: np.ndarray, image_ids: np.ndarray, image_labels: np.ndarray) -> np.ndarray:
    """New (N, 19) targets from out-of-fold `predictions`: where the cell's image is labelled with the
    class (`image_labels` (N, 19), the image's multi-hot label on each of its cells), the prediction
    over the highest prediction among the image's cells; elsewhere the prediction itself."""
    _, image_index = np.unique(image_ids, return_inverse=True)
    best = np.zeros((image_index.max() + 1 if len(image_index) else 0, predictions.shape[1]))
    np.maximum.at(best, image_index, predictions)
    relative = predictions / np.maximum(best[image_index], 1e-6)
    return np.clip(np.where(image_labels > 0, relative, predictions), 0, 1)


def predict_cell_classifier(classifier: dict, features: np.ndarray) -> np.ndarray:
    """(N, 19) probabilities of the trees, averaged with the multiple-instance MLP's where the
    classifier carries one; Negative is 0 here."""
    probabilities = np.zeros((len(features), NUM_CLASSES))
    if len(features) == 0:
        return probabilities
    for cls, model in enumerate(classifier["models"]):
        if isinstance(model, float):
            probabilities[:, cls] = model
        elif model is not None:
            probabilities[:, cls] = model.predict_proba(features)[:, 1]
    if classifier.get("mil") is not None:
        probabilities = 0.5 * (probabilities + cell_mil.predict_mil_model(classifier["mil"], features))
    return probabilities


def save(classifier: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        joblib.dump(classifier, tmp)


def load(path: str | os.PathLike) -> dict:
    """A classifier saved by `save`; a missing, damaged or other-format file is a UserInputError."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} not found (run src.train.train_cell_features)")
    try:
        classifier = joblib.load(path)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is not ours
        raise UserInputError(f"{path}: not a cell feature model ({type(error).__name__}: {error})") from None
    if (not isinstance(classifier, dict) or classifier.get("format") != FORMAT
            or classifier.get("feature_names") != list(FEATURE_NAMES) or len(classifier.get("models", ())) != NUM_CLASSES):
        raise UserInputError(f"{path}: not a cell feature model of this version (retrain with src.train.train_cell_features)")
    return classifier
