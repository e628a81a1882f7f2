import numpy as np
import pytest

from src.data.classes import NEGATIVE, NUM_CLASSES
from src.evaluation.cell_map import average_precision
from src.predict.choose_fusion import WEIGHT_GRID, choose_weights, match_truth
from src.predict.predict_submission import read_fusion_weights
from src.utils.io import UserInputError


def test_match_truth_by_iou():
    truth = np.zeros((20, 20), np.uint16)
    truth[0:10, 0:10] = 1
    truth[10:20, 10:20] = 2
    cells = np.zeros_like(truth)
    cells[0:10, 0:9] = 1      # IoU 0.9 with true cell 1
    cells[10:20, 10:15] = 2   # IoU 0.5 with true cell 2: no match
    cells[0:5, 12:18] = 3     # over background only
    hits = match_truth(cells, truth, {1: {4, 7}, 2: {0}})
    assert hits.shape == (3, NUM_CLASSES)
    assert set(np.flatnonzero(hits[0])) == {4, 7}
    assert not hits[1].any() and not hits[2].any()


def constructed_example(rng, n_images=60, cells_per_image=8):
    """Class 0: the truth is set per image, the cell model is noisy, the image-level model knows the image
    (fusion helps). Class 1: the truth varies cell by cell, the cell model sees it, the image-level
    prediction is noise (fusion hurts)."""
    n = n_images * cells_per_image
    image_of = np.repeat(np.arange(n_images), cells_per_image)
    image_has_0 = rng.random(n_images) < 0.5
    hits = np.zeros((n, NUM_CLASSES), bool)
    hits[:, 0] = image_has_0[image_of] & (rng.random(n) < 0.9)
    hits[:, 1] = rng.random(n) < 0.4
    cell = rng.random((n, NUM_CLASSES)) * 0.2
    cell[:, 0] += 0.35 * hits[:, 0] + rng.normal(0, 0.25, n)
    cell[:, 1] += 0.6 * hits[:, 1] + rng.normal(0, 0.1, n)
    image = rng.random((n, NUM_CLASSES)) * 0.2
    image[:, 0] = (0.8 * image_has_0 + 0.1 * rng.random(n_images))[image_of]
    image[:, 1] = rng.random(n_images)[image_of]
    return np.clip(cell, 0, 1), image, hits, hits.sum(axis=0)


def test_choose_weights_fuses_where_the_image_level_model_helps_only():
    cell, image, hits, n_true = constructed_example(np.random.default_rng(0))
    table = choose_weights(cell, image, hits, n_true)
    weights = table.set_index("class")["weight"]
    assert weights[0] > 0 and weights[1] == 0
    assert weights[NEGATIVE] == 0 and (weights[2:] == 0).all()  # no true cells: nothing to fuse
    # the chosen weight is the grid's best, checked by scoring every weight directly
    scores = [average_precision(hits[:, 0], (1 - w) * cell[:, 0] + w * image[:, 0], int(n_true[0])) for w in WEIGHT_GRID]
    assert weights[0] == WEIGHT_GRID[int(np.argmax(scores))]
    assert table.loc[0, "ap_fused"] == pytest.approx(max(scores))
    # a gain under min_gain keeps fusion off
    gain = max(scores) - scores[0]
    assert choose_weights(cell, image, hits, n_true, min_gain=gain + 1e-9).set_index("class")["weight"][0] == 0


def test_fusion_weights_file_round_trip_and_bad_file(tmp_path):
    cell, image, hits, n_true = constructed_example(np.random.default_rng(1))
    table = choose_weights(cell, image, hits, n_true)
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
