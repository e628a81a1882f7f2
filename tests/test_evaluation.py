import cv2
import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as coco_mask

from src.evaluation import cell_map as metric
from src.evaluation.rle import decode_mask, encode_mask, label_mask_to_rles, mask_string_to_rle


def test_rle_round_trip_is_exact():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (64, 48), (256, 256)]:
        mask = rng.random(shape) < 0.3
        assert np.array_equal(decode_mask(encode_mask(mask), *shape), mask)
    empty = np.zeros((30, 20), bool)
    assert not decode_mask(encode_mask(empty), 30, 20).any()


def test_challenge_sample_string_decodes():
    mask = decode_mask("eNoLCAgIMAEABJkBdQ==", 2048, 2048)
    assert mask.shape == (2048, 2048) and not mask.any()
    assert encode_mask(mask) == "eNoLCAgIMAEABJkBdQ=="


def test_fortran_order_matters():
    mask = np.zeros((4, 6), bool)
    mask[0, 1:4] = True  # a horizontal run: column-major RLE counts differ from row-major ones
    counts = mask_string_to_rle(encode_mask(mask), 4, 6)["counts"]
    assert counts == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    assert np.array_equal(decode_mask(encode_mask(mask), 4, 6), mask)


def truth_image(label_mask, classes_by_cell):
    rles = label_mask_to_rles(label_mask)
    ids = sorted(classes_by_cell)
    return metric.TruthImage(*label_mask.shape, [rles[i] for i in ids], [set(classes_by_cell[i]) for i in ids])


def prediction(image_id, cls, confidence, mask):
    return metric.Prediction(image_id, cls, confidence, mask_string_to_rle(encode_mask(mask), *mask.shape))


@pytest.fixture
def two_cells():
    label_mask = np.zeros((20, 30), np.uint16)
    label_mask[2:12, 2:12] = 1       # 100 px, class 0
    label_mask[2:12, 15:25] = 2      # 100 px, class 0 and 16
    label_mask[14:19, 2:12] = 3      # 50 px, class 16 only
    return label_mask, {"img": truth_image(label_mask, {1: [0], 2: [0, 16], 3: [16]})}


def test_perfect_predictions_score_one(two_cells):
    label_mask, truth = two_cells
    predictions = [prediction("img", 0, 0.9, label_mask == 1), prediction("img", 0, 0.8, label_mask == 2),
                   prediction("img", 16, 0.7, label_mask == 2), prediction("img", 16, 0.6, label_mask == 3)]
    table = metric.cell_map(predictions, truth)
    assert metric.mean_ap(table) == pytest.approx(1.0)
    assert table.loc[table["n_true"] > 0, "class"].tolist() == [0, 16]


def test_shuffled_confidences_by_hand(two_cells):
    label_mask, truth = two_cells
    # class 0: hit (0.9), false positive on cell 3 (0.8), hit (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # envelope 1, 2/3, 2/3 -> AP = 0.5 * 1 + 0.5 * 2/3 = 5/6
    predictions = [prediction("img", 0, 0.9, label_mask == 1), prediction("img", 0, 0.8, label_mask == 3),
                   prediction("img", 0, 0.7, label_mask == 2)]
    table = metric.cell_map(predictions, truth)
    assert table.loc[0, "AP"] == pytest.approx(5 / 6)
    assert table.loc[16, "AP"] == 0.0  # class 16 has true cells and no predictions
    assert metric.mean_ap(table) == pytest.approx(5 / 12)
    # the same predictions with the false positive ranked last: AP 1
    reordered = [predictions[0], prediction("img", 0, 0.1, label_mask == 3), predictions[2]]
    assert metric.cell_map(reordered, truth).loc[0, "AP"] == pytest.approx(1.0)


def test_iou_just_under_and_over_threshold(two_cells):
    label_mask, truth = two_cells
    over = np.zeros_like(label_mask, bool)
    over[2:8, 2:12] = True            # 60 of cell 1's 100 px: IoU 0.60 -> hit
    under = np.zeros_like(label_mask, bool)
    under[2:8, 2:12] = True
    under[7, 11] = False              # 59 px: IoU 0.59 -> miss
    assert metric.cell_map([prediction("img", 0, 0.5, over)], truth).loc[0, "AP"] == pytest.approx(0.5)
    assert metric.cell_map([prediction("img", 0, 0.5, under)], truth).loc[0, "AP"] == 0.0


def test_duplicates_count_once(two_cells):
    label_mask, truth = two_cells
    # cell 1 predicted twice (0.9, 0.8), cell 2 once (0.7): hits 1, 0, 1 -> AP 5/6 as above, not 1
    predictions = [prediction("img", 0, 0.9, label_mask == 1), prediction("img", 0, 0.8, label_mask == 1),
                   prediction("img", 0, 0.7, label_mask == 2)]
    assert metric.cell_map(predictions, truth).loc[0, "AP"] == pytest.approx(5 / 6)


def test_average_precision_by_hand():
    hits = np.array([0, 1, 1, 0, 1], bool)
    confidences = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # precision 0, 1/2, 2/3, 1/2, 3/5 at recall 0, 1/4, 2/4, 2/4, 3/4 (4 true); envelope 2/3, 2/3, 2/3, 3/5, 3/5
    expected = 0.25 * 2 / 3 + 0.25 * 2 / 3 + 0.25 * 3 / 5
    assert metric.average_precision(hits, confidences, 4) == pytest.approx(expected)
    assert np.isnan(metric.average_precision(hits, confidences, 0))


def test_cli_on_submission_file(tmp_path, two_cells):
    label_mask, _ = two_cells
    truth_dir = tmp_path / "truth"
    (truth_dir / "masks").mkdir(parents=True)
    cv2.imwrite(str(truth_dir / "masks" / "img.png"), label_mask)
    pd.DataFrame({"ID": ["img"] * 3, "split": ["test"] * 3, "cell_id": [1, 2, 3], "labels": ["0", "0|16", "16"]}
                 ).to_csv(truth_dir / "cell_labels.csv", index=False)
    triples = [f"0 0.9 {encode_mask(label_mask == 1)}", f"0 0.8 {encode_mask(label_mask == 3)}",
               f"0 0.7 {encode_mask(label_mask == 2)}", f"16 1.0 {encode_mask(label_mask == 3)}",
               f"16 0.2 {encode_mask(label_mask == 2)}"]
    submission = tmp_path / "submission.csv"
    pd.DataFrame({"ID": ["img"], "ImageWidth": [30], "ImageHeight": [20],
                  "PredictionString": [" ".join(triples)]}).to_csv(submission, index=False)
    out = tmp_path / "table.csv"
    assert metric.main(["--submission", str(submission), "--truth", str(truth_dir), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table.loc[0, "AP"] == pytest.approx(5 / 6) and table.loc[16, "AP"] == pytest.approx(1.0)
    pd.DataFrame({"ID": ["img"], "ImageWidth": [30], "ImageHeight": [20], "PredictionString": ["0 0.5"]}
                 ).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(metric.UserInputError):
        metric.main(["--submission", str(tmp_path / "bad.csv"), "--truth", str(truth_dir)])


def test_bootstrap_difference_equals_scoring_each_resample_in_full(two_cells):
    label_mask, _ = two_cells
    cells_by_image = {"x": {1: [0], 2: [0, 16], 3: [16]}, "y": {1: [16], 2: [18], 3: [0]}, "z": {1: [18], 2: [0], 3: [0]}}
    truth = {image_id: truth_image(label_mask, cells) for image_id, cells in cells_by_image.items()}
    rng = np.random.default_rng(3)
    confidences = iter(rng.permutation(200) / 200)  # distinct, so ties never decide a rank

    def random_submission():
        return [prediction(image_id, cls, next(confidences), label_mask == cell)
                for image_id in truth for cell in (1, 2, 3) for cls in (0, 16, 18) if rng.random() < 0.6]

    baseline, challenger = random_submission(), random_submission()
    differences = metric.bootstrap_map_difference(baseline, challenger, truth, n_resamples=12, seed=7)

    draws, image_ids = np.random.default_rng(7), sorted(truth)
    for difference in differences:
        repeats = dict(zip(image_ids, draws.multinomial(3, np.full(3, 1 / 3))))
        copies = {f"{i}#{k}": truth[i] for i in image_ids for k in range(repeats[i])}

        def copied(predictions):
            return [metric.Prediction(f"{p.image_id}#{k}", p.cls, p.confidence, p.rle)
                    for p in predictions for k in range(repeats[p.image_id])]

        expected = (metric.mean_ap(metric.cell_map(copied(challenger), copies))
                    - metric.mean_ap(metric.cell_map(copied(baseline), copies)))
        assert difference == pytest.approx(expected)
    assert np.ptp(differences) > 0  # the resamples differ
    assert not metric.bootstrap_map_difference(baseline, baseline, truth, n_resamples=5).any()
