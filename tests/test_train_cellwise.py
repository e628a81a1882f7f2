import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from src.data.bbox_records import build_record, masked_crop, read_record, record_path, write_record
from src.data.cache import cache_one
from src.data.images import read_field
from src.data.labels import read_label_table, read_label_tables
from src.data.make_synthetic import write_synthetic_dataset
from src.data.schema import OutputLayout
from src.data.synthetic import SyntheticConfig
from src.predict import pseudo_label_store as store
from src.predict.cell_inputs import cellwise_input
from src.preprocessing.create_imagelevel_folds import assign_folds
from src.train import train_cellwise as cellwise
from src.utils.io import UserInputError


def test_binned_accuracy_by_hand():
    predictions = np.array([0.23, 0.26, 1.0, 0.97, 0.0])
    targets = np.array([0.21, 0.24, 1.0, 0.96, 0.049])
    # bins 4/4 hit, 5/4 miss, 19/19 hit (1.0 sits in the last bin), 19/19 hit, 0/0 hit
    assert cellwise.binned_accuracy(predictions, targets) == pytest.approx(0.8)


def test_soft_targets_selection_and_blend():
    predictions = np.array([[0.2, 1.3], [0.5, -0.1], [0.1, 0.0]], np.float32)
    ids = np.array(["a", "a", "b"])
    cells = np.array([0, 1, 0])
    selection = pd.DataFrame({"ID": ["a", "b", "zz"], "cell_i": [1, 0, 3]})
    targets = cellwise.soft_targets(predictions, ids, cells, [(0, selection)])
    np.testing.assert_allclose(targets, [[0.2, 1.0], [1.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    table = pd.DataFrame({"ID": ["a"], "Label": ["1"]})
    full = np.zeros((3, 19), np.float32)
    blended = cellwise.blend_image_labels(full + 0.4, ids, table, 0.5)
    assert blended[0, 1] == pytest.approx(0.7) and blended[0, 0] == pytest.approx(0.2)
    assert blended[2, 1] == pytest.approx(0.2)  # image b has no label row: only the soft part


def test_auto_image_label_weights_by_hand():
    ids = np.array(["A", "A", "B", "C", "D", "D"])
    predictions = np.zeros((6, 19))
    predictions[:, 0] = [0.9, 0.1, 0.8, 0.1, 0.2, 0.0]      # max per image A .9, B .8, C .1, D .2: finds A, B
    predictions[:, 1] = [0.1, 0.0, 0.2, 0.9, 0.8, 0.3]      # max A .1, B .2, C .9, D .8: ranks A, B last
    table = pd.DataFrame({"ID": ["A", "B", "C", "D"], "Label": ["0|1", "0|1", "16", "16"]})
    weights = cellwise.auto_image_label_weights(predictions, ids, table)
    assert weights[0] == pytest.approx(0.5)                  # AP 1: the floor
    # class 1 ranked C, D, B, A: AP = (1/3 + 2/4) / 2
    assert weights[1] == pytest.approx(1 - (1 / 3 + 2 / 4) / 2)
    assert weights[2] == pytest.approx(0.5)                  # no labelled image: the floor
    assert weights[16] == pytest.approx(0.5)                 # all scores tied: AP = prevalence 2/4
    assert cellwise.auto_image_label_weights(predictions, ids, table, floor=0.0)[0] == pytest.approx(0.0)


def test_upsampled_indices_repeat_minority_cells():
    targets = np.zeros((40, 19))
    targets[:38, 0] = 0.9      # majority class: 38 cells
    targets[38, 11] = 0.8      # minority: 1 cell < 38 / 19
    targets[39, 16] = 0.3      # below 0.5: not a positive
    indices = cellwise.upsampled_indices(targets, 3)
    assert len(indices) == 42 and (indices == 38).sum() == 3
    assert len(cellwise.upsampled_indices(targets, 0)) == 40


@pytest.mark.parametrize("border_down_weight", ["0", "0.5"])
def test_train_cellwise_end_to_end(tmp_path, border_down_weight):
    layout = write_synthetic_dataset(tmp_path / "data", 10, 0, SyntheticConfig(image_size=96, cells_min=3, cells_max=4), 3)
    table = read_label_table(layout.train_csv)
    assign_folds(table, 5, seed=0).to_csv(layout.folds_csv, index=False)
    outputs = OutputLayout(tmp_path / "output")
    rows = []
    for image_id in table["ID"]:
        mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        record = build_record(image_id, mask)
        write_record(record_path(outputs.bboxes_dir, "train", image_id), record)
        n = record.n_cells
        rows.append(store.CellRows(store.encode_ids([image_id] * n), np.arange(n, dtype=np.int32),
                                   np.zeros(n, np.uint8), np.zeros(n, np.int8),
                                   np.random.default_rng(n).random((n, 19)).astype(np.float16),
                                   np.zeros((n, 8), np.float16)))
    store.write_part(outputs.pseudo_labels_h5, "s0of1", store.CellRows.concat(rows))
    store.unify(outputs.pseudo_labels_h5)
    selection = tmp_path / "mitotic_cells_selection.csv"
    pd.DataFrame({"ID": [table["ID"].iloc[0]], "cell_i": [0]}).to_csv(selection, index=False)
    args = ["--dataset", str(layout.root), "--output", str(outputs.root), "--fold", "1", "--arch", "densenet_tiny",
            "--img_size", "32", "--batch_size", "4", "--workers", "0", "--gradient-accumulation-steps", "2",
            "--epochs", "1", "--scheduler", "Cosine", "--out_dir", "cells", "--init-weights", "none",
            "--selection", str(selection), "--eval-at-start", "--log-every", "0"]
    assert cellwise.main(args + ["--border-down-weight", border_down_weight]) == 0
    run_dir = outputs.model_dir("cells", 1)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert {"val_binned_accuracy", "val_map", "val_focal_loss"} <= set(metrics.columns) and len(metrics) == 2
    assert (run_dir / "best.pth").is_file() and (run_dir / "final.pth").is_file()
    checkpoint = torch.load(run_dir / "final.pth", weights_only=False)
    assert checkpoint["model_config"]["arch"] == "densenet_tiny"
    with pytest.raises(UserInputError, match="cannot tell the class"):
        bad = tmp_path / "some_selection.csv"
        bad.write_text("ID,cell_i\n")
        cellwise.main(args[:-5] + ["--selection", str(bad)])
    if border_down_weight == "0":  # the feature model learns from the same targets and data
        check_feature_model_stage(layout, outputs, selection)


def check_feature_model_stage(layout, outputs, selection):
    from src.data.cache import load_full_resolution
    from src.features import cell_classifier, cell_mil
    from src.features.cell_features import record_features
    from src.train import train_cell_features

    common = ["--dataset", str(layout.root), "--output", str(outputs.root), "--selection", str(selection),
              "--image-label-weight", "0.5", "--no-progress", "--max-iter", "5"]
    assert train_cell_features.main(common + ["--workers", "2"]) == 0  # relabelling off by default
    classifier = cell_classifier.load(outputs.feature_model_path("cell_features"))
    cells, targets = cellwise.cell_targets(layout, outputs, None, [str(selection)], None, "0.5")
    fields = list(dict.fromkeys(zip(cells["source"], cells["ID"])))
    per_field = train_cell_features.features_of_fields(layout, outputs, fields, workers=1, progress=False)
    for (source, image_id), rows in per_field.items():
        record = read_record(record_path(outputs.bboxes_dir, source, image_id))
        assert np.array_equal(rows, record_features(load_full_resolution(layout, source, image_id, record.image_shape), record))
    features = np.stack([per_field[(s, i)][c] for s, i, c in zip(cells["source"], cells["ID"], cells["cell_i"])])
    image_ids = cells["ID"].to_numpy()
    fields_of_cells, field_index = np.unique(image_ids, return_inverse=True)
    field_labels = cellwise.broadcast_image_labels(fields_of_cells, read_label_tables(layout.train_csv))
    mil = cell_mil.fit_mil_model(features, field_index, field_labels, 0)  # fit to the image labels alone
    assert mil["classes"] and len(mil["networks"]) == cell_mil.MIL_MODELS == 10
    refit = dict(cell_classifier.fit_cell_classifier(features, targets, max_iter=5), mil=mil)  # same data and seed
    assert np.array_equal(cell_classifier.predict_cell_classifier(refit, features),
                          cell_classifier.predict_cell_classifier(classifier, features))
    trees_only = cell_classifier.predict_cell_classifier(dict(refit, mil=None), features)
    assert np.allclose(cell_classifier.predict_cell_classifier(refit, features),
                       (trees_only + cell_mil.predict_mil_model(mil, features)) / 2)
    assert train_cell_features.main(common + ["--mil-models", "0"]) == 0
    assert np.array_equal(cell_classifier.predict_cell_classifier(
        cell_classifier.load(outputs.feature_model_path("cell_features")), features), trees_only)
    # relabelled targets: from 2-fold out-of-fold predictions, then the same fit
    assert train_cell_features.main(common + ["--relabel-folds", "2"]) == 0
    oof = cell_classifier.out_of_fold_predictions(features, targets, image_ids, 2, max_iter=5)
    labels = cellwise.broadcast_image_labels(image_ids, read_label_tables(layout.train_csv))
    relabelled = cell_classifier.relabel_targets(oof, image_ids, labels)
    assert not np.allclose(relabelled, targets)
    refit = dict(cell_classifier.fit_cell_classifier(features, relabelled, max_iter=5), mil=mil)
    assert np.array_equal(cell_classifier.predict_cell_classifier(refit, features), cell_classifier.predict_cell_classifier(
        cell_classifier.load(outputs.feature_model_path("cell_features")), features))
    with pytest.raises(UserInputError, match="image-label-weight"):
        train_cell_features.main(common[:-5] + ["--image-label-weight", "7"])
    with pytest.raises(UserInputError, match="relabel-folds"):
        train_cell_features.main(common + ["--relabel-folds", "1"])


def test_cell_dataset_items_equal_crops_of_the_decoded_field(tmp_path):
    layout = write_synthetic_dataset(tmp_path / "data", 2, 0, SyntheticConfig(image_size=96, cells_min=3, cells_max=4), 5)
    outputs = OutputLayout(tmp_path / "output")
    table = read_label_table(layout.train_csv)
    cells = []
    for image_id in table["ID"]:
        mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        write_record(record_path(outputs.bboxes_dir, "train", image_id), build_record(image_id, mask))
        cells += [(image_id, cell_i, "train") for cell_i in range(int(mask.max()))]
    cells = pd.DataFrame(cells, columns=["ID", "cell_i", "source"])
    targets = np.zeros((len(cells), 19), np.float32)

    def expected(row):
        record = read_record(record_path(outputs.bboxes_dir, "train", row.ID))  # with its mask
        field = read_field(layout.image_dir("train"), row.ID)
        return cellwise_input(masked_crop(field, record, row.cell_i), 40).transpose(2, 0, 1)

    dataset = cellwise.CellDataset(layout, outputs.bboxes_dir, cells, targets, img_size=40, memory_budget=0)
    for index, row in enumerate(cells.itertuples()):  # no cache: decoded from the PNGs
        np.testing.assert_array_equal(dataset[index][0].numpy(), expected(row))
    for image_id in table["ID"]:  # the same through the memory-mapped 96-px cache
        cache_one(layout.image_dir("train"), image_id, layout.cache_path(96, image_id), 96)
    assert all(layout.cache_path(96, image_id).is_file() for image_id in table["ID"])
    for index, row in enumerate(cells.itertuples()):
        np.testing.assert_array_equal(dataset[index][0].numpy(), expected(row))


def test_cell_inputs_held_in_memory_equal_the_ones_cut_per_item(tmp_path):
    """Within the memory budget the inputs are computed once, on construction: the items (augmented,
    over several epochs) equal those of a dataset that cuts every crop again, and the images' files
    are no longer read."""
    layout = write_synthetic_dataset(tmp_path / "data", 2, 0, SyntheticConfig(image_size=80, cells_min=3, cells_max=4), 9)
    outputs = OutputLayout(tmp_path / "output")
    cells = []
    for image_id in read_label_table(layout.train_csv)["ID"]:
        mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        write_record(record_path(outputs.bboxes_dir, "train", image_id), build_record(image_id, mask))
        cells += [(image_id, cell_i, "train") for cell_i in range(int(mask.max()))]
    cells = pd.DataFrame(cells, columns=["ID", "cell_i", "source"])
    targets = np.random.default_rng(0).random((len(cells), 19)).astype(np.float32)
    options = {"img_size": 24, "augment": True, "seed": 3, "border_down_weight": 0.5}
    per_item = cellwise.CellDataset(layout, outputs.bboxes_dir, cells, targets, memory_budget=0, **options)
    held = cellwise.CellDataset(layout, outputs.bboxes_dir, cells, targets, memory_budget=1 << 20, **options)
    assert held._inputs is not None and held._inputs.shape == (len(cells), 24, 24, 4) and per_item._inputs is None
    keys = [(index, epoch) for epoch in range(3) for index in range(len(cells))]
    expected = [per_item[key] for key in keys]
    for path in layout.image_dir("train").iterdir():
        path.unlink()  # the held inputs need no image file any more
    with pytest.raises(cellwise.SampleReadError):
        per_item[keys[0]]
    flips = set()
    for key, (image, target, index) in zip(keys, expected):
        held_image, held_target, held_index = held[key]
        np.testing.assert_array_equal(held_image.numpy(), image.numpy())
        np.testing.assert_array_equal(held_target.numpy(), target.numpy())
        assert held_index == index and target.shape == (20,)
        flips.add(cellwise.dihedral_index(3, key[1], key[0]))
    assert len(flips) > 1  # the augmentation did act on the held inputs
    small = cellwise.CellDataset(layout, outputs.bboxes_dir, cells.iloc[:0], targets[:0], memory_budget=1 << 20, **options)
    assert small._inputs is None and len(small) == 0


def test_border_weighted_loss_scales_each_cells_gradient_only():
    """The gradient of a cell's logits is its weight x the unweighted gradient, for a per-cell loss
    (focal) and a mined one (the composite with the soft hard log loss); the value is unchanged."""
    from src.train.losses import get_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 19)
    targets = torch.rand(6, 19)
    weights = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.8, 0.25])
    for name in ("FocalLoss", "FocalSymmetricHardLogLoss"):
        loss = get_loss(name)
        plain_logits = logits.clone().requires_grad_(True)
        plain = loss(plain_logits, targets)
        plain.backward()
        weighted_logits = logits.clone().requires_grad_(True)
        weighted = cellwise.BorderWeightedLoss(loss)(weighted_logits, torch.cat([targets, weights[:, None]], 1))
        weighted.backward()
        assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)
        torch.testing.assert_close(weighted_logits.grad, plain_logits.grad * weights[:, None])


def test_cell_dataset_appends_the_border_weight(tmp_path):
    layout = write_synthetic_dataset(tmp_path / "data", 1, 0, SyntheticConfig(image_size=64, cells_min=4, cells_max=5), 2)
    outputs = OutputLayout(tmp_path / "output")
    image_id = read_label_table(layout.train_csv)["ID"][0]
    mask = np.zeros((64, 64), np.uint16)
    mask[0:10, 0:20] = 1      # top-left corner: 20 + 10 of 60 sides on the border -> 0.5
    mask[30:40, 30:40] = 2    # inside: 0
    mask[54:64, 20:40] = 3    # bottom edge: 20 of 60 -> 1/3
    write_record(record_path(outputs.bboxes_dir, "train", image_id), build_record(image_id, mask))
    cells = pd.DataFrame({"ID": [image_id] * 3, "cell_i": [0, 1, 2], "source": ["train"] * 3})
    targets = np.full((3, 19), 0.25, np.float32)
    weighted = cellwise.CellDataset(layout, outputs.bboxes_dir, cells, targets, img_size=16, border_down_weight=0.6)
    plain = cellwise.CellDataset(layout, outputs.bboxes_dir, cells, targets, img_size=16)
    for index, expected in enumerate([1 - 0.6 * 0.5, 1.0, 1 - 0.6 / 3]):
        target = weighted[index][1].numpy()
        assert target.shape == (20,) and target[-1] == pytest.approx(expected)
        np.testing.assert_array_equal(target[:19], plain[index][1].numpy())
        assert plain[index][1].shape == (19,)


def test_border_down_weight_out_of_range_is_refused():
    with pytest.raises(UserInputError, match="border-down-weight"):
        cellwise.parse_args(["--fold", "0", "--border-down-weight", "1.5"])
