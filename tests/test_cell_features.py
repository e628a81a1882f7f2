import numpy as np
import pandas as pd
import pytest

from src.data.classes import NEGATIVE, NUM_CLASSES
from src.data.schema import OutputLayout
from src.features import cell_classifier
from src.features.cell_features import FEATURE_NAMES, N_FEATURES, cell_features, record_features
from src.data.bbox_records import build_record
from src.utils.io import UserInputError

INDEX = {name: k for k, name in enumerate(FEATURE_NAMES)}


def dotted_cell(dots: list[tuple[int, int]], background: int = 50, dot: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A 30 x 30 cell filling its box: flat green with single bright pixels, a blue nucleus disc of radius 6
    at the centre, flat red and yellow."""
    crop = np.zeros((30, 30, 4), np.uint8)
    crop[..., 0], crop[..., 3], crop[..., 1] = 80, 60, background
    yy, xx = np.mgrid[:30, :30]
    crop[..., 2] = np.where(np.hypot(yy - 15, xx - 15) <= 6, 180, 20)
    for y, x in dots:
        crop[y, x, 1] = dot
    return crop, np.ones((30, 30), bool)


def test_features_by_hand_on_a_dotted_cell():
    crop, mask = dotted_cell([(3, 3), (3, 26), (26, 3)])  # three dots, all outside the nucleus
    features = cell_features(crop, mask)
    assert features.shape == (N_FEATURES,) and features.dtype == np.float32
    assert features[INDEX["log_area"]] == pytest.approx(np.log1p(900))
    assert features[INDEX["log_q50"]] == pytest.approx(np.log1p(50))
    assert features[INDEX["log_max"]] == pytest.approx(np.log1p(200))
    assert features[INDEX["log_spot_count_k4"]] == pytest.approx(np.log1p(3))
    assert features[INDEX["spot_area_share_k8"]] == pytest.approx(3 / 900)
    assert features[INDEX["spot_nuclear_share_k4"]] == 0
    nucleus_pixels = int((np.hypot(*(np.mgrid[:30, :30] - 15)) <= 6).sum())
    assert features[INDEX["nuclear_area_share"]] == pytest.approx(nucleus_pixels / 900)
    assert features[INDEX["log_nuclear_mean"]] == pytest.approx(np.log1p(50))
    assert features[INDEX["corr_red"]] == 0  # a flat channel has no correlation
    inside, _ = dotted_cell([(15, 15)])
    assert cell_features(inside, mask)[INDEX["spot_nuclear_share_k4"]] == 1



def test_spot_shape_tells_dots_from_lines_and_finds_the_red_hub():
    dots, mask = dotted_cell([(4, 4), (4, 24), (24, 4)])  # three single-pixel dots outside the nucleus
    line, _ = dotted_cell([])
    line[4, 4:26, 1] = 200  # one straight line, also outside the nucleus
    dot_features, line_features = cell_features(dots, mask), cell_features(line, mask)
    assert dot_features[INDEX["spot_roundness"]] > 0.7 > 0.3 > line_features[INDEX["spot_roundness"]]
    assert dot_features[INDEX["log_cytoplasm_spot_count"]] == pytest.approx(np.log1p(3))
    assert line_features[INDEX["log_cytoplasm_spot_count"]] == pytest.approx(np.log1p(1))
    assert dot_features[INDEX["spot_red_ratio"]] == pytest.approx(1.0)  # flat red: the spots see its mean
    hub = dots.copy()
    hub[3:6, 3:6, 0] = 240  # the red stain peaks under one of the three dots
    ratio = cell_features(hub, mask)[INDEX["spot_red_ratio"]]
    red_mean = (80 * 891 + 240 * 9) / 900
    assert ratio == pytest.approx((((240 + 80 + 80) / 3) + 1) / (red_mean + 1), rel=1e-4)
    in_nucleus, _ = dotted_cell([(15, 15), (14, 18)])
    assert cell_features(in_nucleus, mask)[INDEX["log_cytoplasm_spot_count"]] == 0
    flat, _ = dotted_cell([])
    assert cell_features(flat, mask)[[INDEX["spot_roundness"], INDEX["spot_red_ratio"]]].tolist() == [0, 1]


def test_spot_counts_and_sizes_per_compartment():
    crop, mask = dotted_cell([(15, 15), (26, 26)])  # one single-pixel dot in the nucleus, one outside
    crop[12:14, 17:19, 1] = 200  # a 2 x 2 dot in the nucleus
    features = cell_features(crop, mask)
    assert features[INDEX["log_nuclear_spot_count"]] == pytest.approx(np.log1p(2))
    assert features[INDEX["log_cytoplasm_spot_count"]] == pytest.approx(np.log1p(1))
    assert features[INDEX["log_nuclear_spot_mean_area"]] == pytest.approx(np.log1p((1 + 4) / 2))
    assert features[INDEX["log_cytoplasm_spot_mean_area"]] == pytest.approx(np.log1p(1))
    nucleus = np.hypot(*(np.mgrid[:30, :30] - 15)) <= 6
    green_in_nucleus = crop[..., 1][nucleus].astype(float).sum()
    assert features[INDEX["nuclear_tophat_share"]] == pytest.approx(5 * 150 / green_in_nucleus, rel=1e-4)
    flat, _ = dotted_cell([])
    assert cell_features(flat, mask)[INDEX["nuclear_tophat_share"]] == 0

def test_features_separate_dim_from_bright_and_flat_from_dotted():
    flat, mask = dotted_cell([])
    dotted, _ = dotted_cell([(5, 5), (20, 22)])
    dim, _ = dotted_cell([], background=5)
    assert cell_features(flat, mask)[INDEX["log_spot_count_k4"]] == 0
    assert cell_features(dotted, mask)[INDEX["log_spot_count_k4"]] == pytest.approx(np.log1p(2))
    assert cell_features(dim, mask)[INDEX["log_q99"]] < cell_features(flat, mask)[INDEX["log_q99"]]
    assert not cell_features(np.zeros((5, 5, 4), np.uint8), np.zeros((5, 5), bool)).any()  # no pixels: zeros


def test_record_features_match_each_cell_and_check_the_field():
    field = np.zeros((40, 70, 4), np.uint8)
    field[..., 1] = np.arange(70, dtype=np.uint8)[None, :]
    field[..., 2] = 100
    labels = np.zeros((40, 70), np.int32)
    labels[5:30, 5:30], labels[8:38, 35:65] = 1, 2
    record = build_record("f", labels)
    rows = record_features(field, record)
    assert rows.shape == (2, N_FEATURES)
    for cell_i in range(record.n_cells):
        y0, x0, y1, x1 = record.box(cell_i)
        own = labels[y0:y1, x0:x1] == cell_i + 1
        assert np.array_equal(rows[cell_i], cell_features(field[y0:y1, x0:x1], own))
    with pytest.raises(ValueError, match="does not match"):
        record_features(field[:, :60], record)
    with pytest.raises(ValueError, match="uint8"):
        record_features(field.astype(np.float32), record)


def test_a_flat_cell_that_does_not_fill_its_box_has_no_spots():
    yy, xx = np.mgrid[:41, :41]
    disc = np.hypot(yy - 20, xx - 20) <= 18
    crop = np.zeros((41, 41, 4), np.uint8)
    crop[..., 1] = np.where(disc, 120, 0)
    crop[..., 2] = np.where(np.hypot(yy - 20, xx - 20) <= 7, 200, 30) * disc
    features = cell_features(crop, disc)
    assert features[INDEX["log_spot_count_k4"]] == 0 and features[INDEX["log_tophat_max"]] == 0
    crop[10, 20, 1] = 250  # one real dot inside the outline
    features = cell_features(crop, disc)
    assert features[INDEX["log_spot_count_k4"]] == pytest.approx(np.log1p(1))
    assert features[INDEX["log_tophat_max"]] == pytest.approx(np.log1p(130))


def test_soft_targets_are_fit_as_their_mean_and_labels_are_learnt():
    rng = np.random.default_rng(0)
    constant = np.zeros((200, N_FEATURES), np.float32)
    soft = np.zeros((200, NUM_CLASSES), np.float32)
    soft[:, 3] = rng.uniform(0, 1, 200)
    model = cell_classifier.fit_cell_classifier(constant, soft, max_iter=20)
    # identical features: no split helps, so the fitted probability is the cross-entropy optimum, mean(t)
    assert cell_classifier.predict_cell_classifier(model, constant[:1])[0, 3] == pytest.approx(soft[:, 3].mean(), abs=1e-3)
    assert model["models"][0] == 0.0 and model["models"][NEGATIVE] is None  # nothing to learn; Negative by rule
    everywhere = soft.copy()
    everywhere[:, 7] = 0.97  # positive in every cell: its mean, not 0
    model = cell_classifier.fit_cell_classifier(constant, everywhere, max_iter=5)
    assert cell_classifier.predict_cell_classifier(model, constant[:2])[:, 7] == pytest.approx([0.97, 0.97])
    features = rng.normal(size=(300, N_FEATURES)).astype(np.float32)
    hard = np.zeros((300, NUM_CLASSES), np.float32)
    hard[:, 5] = features[:, 7] > 0.3
    model = cell_classifier.fit_cell_classifier(features, hard, max_iter=50)
    probabilities = cell_classifier.predict_cell_classifier(model, features)
    assert probabilities[hard[:, 5] == 1, 5].min() > probabilities[hard[:, 5] == 0, 5].max()
    assert (probabilities[:, np.arange(NUM_CLASSES) != 5] == 0).all()
    with pytest.raises(ValueError, match="do not match"):
        cell_classifier.fit_cell_classifier(features[:, :5], hard)


def test_each_leaf_holds_at_least_the_given_cells():
    """More than half the cells per leaf: no split is allowed, so every cell gets the mean target; a
    small minimum learns the class. Each cell is two rows of the trees (its target and 1 - it)."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(300, N_FEATURES)).astype(np.float32)
    hard = np.zeros((300, NUM_CLASSES), np.float32)
    hard[:, 5] = features[:, 7] > 0.3
    unsplit = cell_classifier.fit_cell_classifier(features, hard, max_iter=30, min_cells_per_leaf=151)
    assert unsplit["models"][5].min_samples_leaf == 302
    assert cell_classifier.predict_cell_classifier(unsplit, features)[:, 5] == pytest.approx(hard[:, 5].mean(), abs=1e-3)
    learnt = cell_classifier.predict_cell_classifier(
        cell_classifier.fit_cell_classifier(features, hard, max_iter=30, min_cells_per_leaf=20), features)
    assert learnt[hard[:, 5] == 1, 5].min() > learnt[hard[:, 5] == 0, 5].max()


def test_saved_model_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(80, N_FEATURES)).astype(np.float32)
    targets = np.zeros((80, NUM_CLASSES), np.float32)
    targets[:, 2] = rng.uniform(size=80)
    model = cell_classifier.fit_cell_classifier(features, targets, max_iter=10)
    path = OutputLayout(tmp_path).feature_model_path("cell_features")
    cell_classifier.save(model, path)
    again = cell_classifier.load(path)
    assert np.array_equal(cell_classifier.predict_cell_classifier(again, features),
                          cell_classifier.predict_cell_classifier(model, features))
    (tmp_path / "text.joblib").write_text("not a model")
    with pytest.raises(UserInputError, match="not a cell feature model"):
        cell_classifier.load(tmp_path / "text.joblib")
    with pytest.raises(UserInputError, match="not found"):
        cell_classifier.load(tmp_path / "missing.joblib")
    cell_classifier.save(dict(model, feature_names=["other"]), tmp_path / "old.joblib")
    with pytest.raises(UserInputError, match="this version"):
        cell_classifier.load(tmp_path / "old.joblib")


def test_layout_features_by_hand():
    crop, mask = dotted_cell([])
    crop[..., 1] = 20
    crop[0, :, 1] = crop[-1, :, 1] = crop[:, 0, 1] = crop[:, -1, 1] = 220  # a bright outline: membrane-like
    features = cell_features(crop, mask)
    outer, inner = features[INDEX["depth_band0_rel"]], features[INDEX["depth_band3_rel"]]
    assert outer > 1 > inner
    assert inner == pytest.approx(21 / (crop[..., 1].mean() + 1))  # the centre band is all grey level 20
    far, _ = dotted_cell([(1, 14)])  # two pixels deep: in the outer band
    near, _ = dotted_cell([(15, 22)])  # just outside the radius-6 nucleus
    assert cell_features(far, mask)[INDEX["spot_nucleus_distance"]] > cell_features(near, mask)[INDEX["spot_nucleus_distance"]]
    assert cell_features(far, mask)[INDEX["spot_edge_share"]] == 1 and cell_features(near, mask)[INDEX["spot_edge_share"]] == 0
    assert cell_features(far, mask)[INDEX["log_spot_mean_area"]] == pytest.approx(np.log1p(1))


def test_parallel_fit_equals_serial_fit():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(120, N_FEATURES)).astype(np.float32)
    targets = rng.uniform(size=(120, NUM_CLASSES)).astype(np.float32) * (rng.uniform(size=NUM_CLASSES) > 0.5)
    serial = cell_classifier.fit_cell_classifier(features, targets, max_iter=8, workers=1)
    parallel = cell_classifier.fit_cell_classifier(features, targets, max_iter=8, workers=2)
    assert [type(m) for m in serial["models"]] == [type(m) for m in parallel["models"]]
    assert np.array_equal(cell_classifier.predict_cell_classifier(serial, features),
                          cell_classifier.predict_cell_classifier(parallel, features))


def test_cell_scale_top_hat_keeps_a_blob_the_small_one_cuts():
    yy, xx = np.mgrid[:61, :61]
    disc = np.hypot(yy - 30, xx - 30) <= 30
    crop = np.zeros((61, 61, 4), np.uint8)
    crop[..., 2] = np.where(np.hypot(yy - 30, xx - 30) <= 8, 200, 30) * disc
    crop[..., 1] = np.where(disc, 40, 0)
    crop[..., 1][np.hypot(yy - 12, xx - 30) <= 4] = 200  # a blob 9 px across, wider than the 7-px element
    features = cell_features(crop, disc)
    assert features[INDEX["log_blob_count_cell_scale"]] == pytest.approx(np.log1p(1))
    blob_pixels = int((np.hypot(yy - 12, xx - 30) <= 4).sum())
    assert features[INDEX["blob_area_share_cell_scale"]] == pytest.approx(blob_pixels / disc.sum())
    # the 7-px top-hat keeps only the blob's rim, far less of its mass
    assert features[INDEX["tophat_mass_share"]] < 0.5 * features[INDEX["tophat_mass_share_cell_scale"]]


def test_a_large_cell_finds_its_blob_on_the_shrunk_copy():
    yy, xx = np.mgrid[:161, :161]
    disc = np.hypot(yy - 80, xx - 80) <= 78  # element 2 * round(0.25 * 78) + 1 = 41 > 31: shrunk by 41/31
    crop = np.zeros((161, 161, 4), np.uint8)
    crop[..., 2] = np.where(np.hypot(yy - 80, xx - 80) <= 20, 200, 30) * disc
    crop[..., 1] = np.where(disc, 40, 0)
    blob = np.hypot(yy - 30, xx - 80) <= 8
    crop[..., 1][blob] = 220
    features = cell_features(crop, disc)
    assert features[INDEX["log_blob_count_cell_scale"]] == pytest.approx(np.log1p(1))
    assert features[INDEX["blob_area_share_cell_scale"]] == pytest.approx(blob.sum() / disc.sum(), rel=0.25)


def test_relabel_targets_by_hand():
    image_ids = np.array(["a", "a", "a", "b", "b"])
    predictions = np.zeros((5, NUM_CLASSES))
    predictions[:, 3] = [0.2, 0.8, 0.4, 0.3, 0.1]
    predictions[:, 6] = [0.0, 0.0, 0.0, 0.5, 0.25]
    labels = np.zeros((5, NUM_CLASSES), np.float32)
    labels[:3, [3, 6]] = 1  # field a is labelled 3 and 6, field b nothing
    targets = cell_classifier.relabel_targets(predictions, image_ids, labels)
    assert targets[:, 3] == pytest.approx([0.25, 1.0, 0.5, 0.3, 0.1])  # rescaled in a, kept in b
    assert targets[:, 6] == pytest.approx([0, 0, 0, 0.5, 0.25])  # no cell of a shows 6: all stay 0
    assert not targets[:, [0, 1, 2, 4, 5]].any()


def test_out_of_fold_predictions_never_see_their_own_image():
    rng = np.random.default_rng(1)
    image_ids = np.repeat([f"img{k}" for k in range(6)], 25)
    features = rng.normal(size=(150, N_FEATURES)).astype(np.float32)
    targets = np.zeros((150, NUM_CLASSES), np.float32)
    targets[:, 4] = features[:, 0] > 0
    before = cell_classifier.out_of_fold_predictions(features, targets, image_ids, n_folds=3, max_iter=20)
    assert before[:, 4].std() > 0 and (before[:, NEGATIVE] == 0).all()
    flipped = targets.copy()
    flipped[image_ids == "img2", 4] = 1 - flipped[image_ids == "img2", 4]  # only img2's targets change
    after = cell_classifier.out_of_fold_predictions(features, flipped, image_ids, n_folds=3, max_iter=20)
    own = image_ids == "img2"
    assert np.array_equal(after[own], before[own])  # img2 is predicted by a model fit without it ...
    assert not np.allclose(after[~own], before[~own])  # ... which the others' models did see
