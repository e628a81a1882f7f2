import numpy as np
import pytest

from src.data.classes import NEGATIVE, NUM_CLASSES
from src.evaluation.cell_map import average_precision
from src.predict.choose_fusion import WEIGHT_GRID, choose_weights, per_image_max
from src.predict.predict_submission import read_fusion_weights
from src.utils.io import UserInputError


def constructed_example(rng, n_images=80, cells_per_image=6):
    """Class 0: the cell model is noisy across images, the image-level model knows the image label
    (fusion helps). Class 1: the cell model's best cell sees the label, the image-level prediction is
    noise (fusion hurts)."""
    n = n_images * cells_per_image
    image_of = np.repeat(np.arange(n_images), cells_per_image)
    labels = rng.random((n_images, NUM_CLASSES)) < 0.4
    labels[:, 2:] = False
    cell = rng.random((n, NUM_CLASSES)) * 0.2
    cell[:, 0] += 0.3 * labels[image_of, 0] + rng.normal(0, 0.3, n)
    cell[:, 1] += 0.6 * labels[image_of, 1] * (rng.random(n) < 0.5) + rng.normal(0, 0.05, n)
    image = rng.random((n_images, NUM_CLASSES)) * 0.2
    image[:, 0] = 0.8 * labels[:, 0] + 0.1 * rng.random(n_images)
    image[:, 1] = rng.random(n_images)
    return np.clip(cell, 0, 1), image[image_of], image_of, labels


def slow_image_ap(cell, image, image_of, labels, cls, weight):
    """Image-level AP of the per-image maximum of the fused confidences, one image at a time."""
    scores = np.array([max((1 - weight) * cell[k, cls] + weight * image[k, cls] for k in np.flatnonzero(image_of == i))
                       for i in range(len(labels))])
    return average_precision(labels[:, cls], scores, int(labels[:, cls].sum()))


def test_choose_weights_fuses_where_the_image_level_model_helps_only():
    cell, image, image_of, labels = constructed_example(np.random.default_rng(0))
    table = choose_weights(cell, image, image_of, labels)
    weights = table.set_index("class")["weight"]
    assert weights[0] > 0 and weights[1] == 0
    assert weights[NEGATIVE] == 0 and (weights[2:] == 0).all()  # no labelled image: nothing to fuse
    # the chosen weight is the grid's best, checked by scoring every weight one image at a time
    scores = [slow_image_ap(cell, image, image_of, labels, 0, w) for w in WEIGHT_GRID]
    assert weights[0] == WEIGHT_GRID[int(np.argmax(scores))]
    assert table.loc[0, "ap_fused"] == pytest.approx(max(scores))
    assert table.loc[1, "ap_cell"] == pytest.approx(slow_image_ap(cell, image, image_of, labels, 1, 0.0))
    # a gain under min_gain keeps fusion off
    gain = max(scores) - scores[0]
    assert choose_weights(cell, image, image_of, labels, min_gain=gain + 1e-9).set_index("class")["weight"][0] == 0


def test_per_image_max_equals_a_loop():
    rng = np.random.default_rng(3)
    image_of = np.sort(rng.integers(0, 5, 40))
    image_of[:5] = np.arange(5)  # every image has a cell
    image_of.sort()
    values = rng.random((40, 3))
    expected = np.array([values[image_of == i].max(axis=0) for i in range(5)])
    assert np.array_equal(per_image_max(values, image_of, 5), expected)


def test_fusion_weights_file_round_trip_and_bad_file(tmp_path):
    cell, image, image_of, labels = constructed_example(np.random.default_rng(1))
    table = choose_weights(cell, image, image_of, labels)
    path = tmp_path / "fusion_weights.csv"
    table.to_csv(path, index=False)
    assert np.array_equal(read_fusion_weights(path), table["weight"].to_numpy())
    table.iloc[:5].to_csv(path, index=False)
    with pytest.raises(UserInputError):
        read_fusion_weights(path)
    with pytest.raises(UserInputError):
        read_fusion_weights(tmp_path / "missing.csv")
    bad = table.copy()
    bad.loc[0, "weight"] = 1.5
    bad.to_csv(path, index=False)
    with pytest.raises(UserInputError):
        read_fusion_weights(path)
