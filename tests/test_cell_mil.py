import numpy as np
import pytest
import torch

from src.data.classes import NEGATIVE, NUM_CLASSES
from src.evaluation.cell_map import average_precision
from src.features import cell_classifier, cell_mil
from src.features.cell_features import N_FEATURES
from src.utils.io import UserInputError

CLS = 3


def test_field_probability_by_hand():
    cells = torch.tensor([[0.9], [0.1], [0.2], [0.6], [0.7]], dtype=torch.float64)
    field_index = torch.tensor([0, 0, 1, 1, 1])
    got = cell_mil.field_probability(cells, field_index, 3, threshold=0.3)
    shares = np.array([0.5, 0.5, 0.0])  # field 2 has no cells: share 0
    expected = 1 / (1 + np.exp(-cell_mil.POOL_SLOPE * (shares - 0.3)))
    assert np.allclose(got.numpy()[:, 0], expected)


def _minority_fields(rng, n_fields=40, cells_per_field=10, n_features=4):
    """Class CLS shows as a bright feature 0 (the others are noise). Half the fields show it in 70-100% of
    their cells and are labelled; the others in 0-20% and are not. Returns features, field index, field
    labels (majority rule), cell truth."""
    features, field_index, truth = [], [], []
    labels = np.zeros((n_fields, NUM_CLASSES))
    for field in range(n_fields):
        share = rng.uniform(0.7, 1.0) if field % 2 == 0 else rng.uniform(0.0, 0.2)
        positive = rng.random(cells_per_field) < share
        labels[field, CLS] = positive.mean() > 0.5
        rows = rng.normal(size=(cells_per_field, n_features))
        rows[:, 0] += 3 * positive
        features.append(rows), field_index.append(np.full(cells_per_field, field)), truth.append(positive)
    return np.concatenate(features), np.concatenate(field_index), labels, np.concatenate(truth)


def test_mil_finds_minority_cells_that_broadcast_labels_call_negative():
    features, field_index, labels, truth = _minority_fields(np.random.default_rng(0))
    model = cell_mil.fit_mil_model(features, field_index, labels, seed=0, n_models=2)
    assert model["classes"] == [CLS] and len(model["networks"]) == 2
    scores = cell_mil.predict_mil_model(model, features)
    in_labelled = labels[field_index, CLS] > 0
    assert average_precision(truth, scores[:, CLS], int(truth.sum())) > 0.95
    # the positive cells of unlabelled fields rank above the negative cells of labelled ones (trees fit
    # to the broadcast labels put them the other way round: 0.3-0.4 against 0.6-0.7)
    assert np.median(scores[~truth & in_labelled, CLS]) < 0.1 < 0.3 < np.median(scores[truth & ~in_labelled, CLS])
    # unfit classes give the share of labelled fields (0 here); Negative is not predicted
    assert np.all(scores[:, [c for c in range(NUM_CLASSES) if c != CLS]] == 0)
    again = cell_mil.predict_mil_model(cell_mil.fit_mil_model(features, field_index, labels, seed=0, n_models=2), features)
    assert np.array_equal(scores, again)  # seeded: the same fit


def test_numpy_prediction_by_hand_and_field_rate_of_unfit_classes():
    labels = np.zeros((4, NUM_CLASSES))
    labels[:, 5] = 1  # every field: nothing to learn, predicts 1
    labels[:2, CLS] = 1
    model = cell_mil.fit_mil_model(np.zeros((8, 2)), np.repeat(np.arange(4), 2), labels, n_models=1, epochs=1)
    assert model["classes"] == [CLS]
    # replace the fitted network by one computed by hand: relu(x @ W1 + b1) -> ... -> sigmoid
    model.update(mean=np.array([1.0, 0.0]), scale=np.array([2.0, 1.0]), low=np.array([-5.0, -2.0]), high=np.array([3.0, 5.0]))
    model["networks"] = [[(np.array([[1.0, -1.0], [0.5, 2.0]]), np.array([0.0, 1.0])),
                          (np.eye(2), np.zeros(2)), (np.array([[1.0], [-1.0]]), np.array([0.25]))]]
    x = np.array([[3.0, 1.0], [1.0, -2.0]])  # standardised: [1, 1] and [0, -2]
    hidden = np.maximum(np.array([[1.5, 2.0], [-1.0, -3.0]]), 0)
    logits = hidden @ np.array([1.0, -1.0]) + 0.25
    got = cell_mil.predict_mil_model(model, x)
    assert np.allclose(got[:, CLS], 1 / (1 + np.exp(-logits)))
    assert np.all(got[:, 5] == 1) and np.all(got[:, NEGATIVE] == 0)
    # beyond the training range a descriptor is held at the range's end: [9, 1] reads as [3, 1], [1, -7] as [1, -2]
    assert np.array_equal(cell_mil.predict_mil_model(model, np.array([[9.0, 1.0], [1.0, -7.0]])), got)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        cell_mil.fit_mil_model(np.zeros((5, 3)), np.zeros(4, int), np.zeros((1, NUM_CLASSES)))
    with pytest.raises(ValueError, match="outside"):
        cell_mil.fit_mil_model(np.zeros((2, 3)), np.array([0, 2]), np.zeros((2, NUM_CLASSES)))


def test_feature_model_with_mil_saves_and_loads(tmp_path):
    features, field_index, labels, _ = _minority_fields(np.random.default_rng(1), n_fields=12, n_features=N_FEATURES)
    targets = labels[field_index]
    classifier = cell_classifier.fit_cell_classifier(features, targets, max_iter=5, min_cells_per_leaf=5)
    classifier["mil"] = cell_mil.fit_mil_model(features, field_index, labels, n_models=1, epochs=20)
    cell_classifier.save(classifier, tmp_path / "model.joblib")
    loaded = cell_classifier.load(tmp_path / "model.joblib")
    assert np.array_equal(cell_classifier.predict_cell_classifier(loaded, features),
                          cell_classifier.predict_cell_classifier(classifier, features))
    cell_classifier.save(dict(classifier, format=1), tmp_path / "old.joblib")  # before the MIL part
    with pytest.raises(UserInputError, match="this version"):
        cell_classifier.load(tmp_path / "old.joblib")
