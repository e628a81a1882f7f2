import filecmp

import cv2

import numpy as np
import pandas as pd
import pytest

from src.data.classes import CLASS_INDEX, NEGATIVE
from src.data.images import read_field
from src.data.labels import parse_label_string, read_label_table
from src.data.make_synthetic import main as make_synthetic_main
from src.data.make_synthetic import write_synthetic_dataset
from src.data.synthetic import SyntheticConfig, add_label_noise, image_labels_from_cells, make_field
from src.utils.io import UserInputError


def truth_tables(layout):
    cells = pd.read_csv(layout.truth_cell_labels_csv, dtype={"ID": str, "labels": str})
    clean = pd.read_csv(layout.truth_image_labels_csv, dtype={"ID": str, "Label": str})
    return cells, clean


def test_majority_rule_by_hand():
    cells = [{0}, {0, 11}, {0}, {16}]
    assert image_labels_from_cells(cells, 0.5) == [0]          # 0 in 3/4; 11 and 16 in 1/4
    assert image_labels_from_cells(cells, 0.2) == [0, 11, 16]
    assert image_labels_from_cells([{0}, {16}], 0.5) == [0]     # tie, nothing over half: most frequent, lowest id
    assert image_labels_from_cells([{NEGATIVE}] * 3 + [{2}] * 2, 0.5) == [NEGATIVE]


def test_label_noise_rate():
    rng = np.random.default_rng(0)
    labels = [0, 16]
    changed = sum(add_label_noise(labels, rng, 0.3) != labels for _ in range(4000))
    assert 0.27 < changed / 4000 < 0.33
    assert all(add_label_noise(labels, rng, 0.0) == labels for _ in range(100))
    noisy = add_label_noise([NEGATIVE], np.random.default_rng(1), 1.0)
    assert NEGATIVE not in noisy and len(noisy) == 1


def test_image_labels_follow_majority_rule_on_truth(small_synthetic):
    cells, clean = truth_tables(small_synthetic)
    train = read_label_table(small_synthetic.train_csv)
    per_image = {image_id: [set(parse_label_string(s)) for s in group["labels"]]
                 for image_id, group in cells.groupby("ID", sort=False)}
    assert set(per_image) == set(clean["ID"])
    for image_id, label in zip(clean["ID"], clean["Label"]):
        assert parse_label_string(label) == image_labels_from_cells(per_image[image_id], 0.5)
    # label noise is off in this fixture: the user-facing labels are the clean ones
    merged = train.merge(clean, on="ID", suffixes=("", "_clean"))
    assert len(merged) == 40 and (merged["Label"] == merged["Label_clean"]).all()


def test_truth_masks_match_image_content(small_synthetic):
    cells, _ = truth_tables(small_synthetic)
    for image_id, group in cells.groupby("ID", sort=False):
        split = group["split"].iloc[0]
        field = read_field(small_synthetic.image_dir(split), image_id).astype(np.float32)
        mask = cv2.imread(str(small_synthetic.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint16 and mask.shape == field.shape[:2]
        assert sorted(np.unique(mask[mask > 0])) == sorted(group["cell_id"])
        background = field[mask == 0]
        blue_background = np.percentile(background[:, 2], 50)
        for cell_id in group["cell_id"]:
            pixels = field[mask == cell_id]
            # every truth cell has a nucleus: a bright blue region well above the background
            assert np.percentile(pixels[:, 2], 95) > blue_background + 60, (image_id, cell_id)
            # and a cell body in the red/yellow channels
            assert np.median(pixels[:, 0] + pixels[:, 3]) > np.median(background[:, 0] + background[:, 3]) + 15


def test_green_layouts_differ_by_class():
    rng = np.random.default_rng(7)
    config = SyntheticConfig(image_size=192, debris_per_field=0)
    ratios: dict[int, list[float]] = {}
    for _ in range(60):
        field, mask, cell_classes = make_field(rng, config)
        for cell_id, classes in enumerate(cell_classes, start=1):
            if len(classes) != 1:
                continue
            (cls,) = classes
            inside = mask == cell_id
            nucleus = inside & (field[..., 2] > 80)
            cytoplasm = inside & ~nucleus
            if nucleus.sum() < 20 or cytoplasm.sum() < 20:
                continue
            green = field[..., 1].astype(float)
            ratios.setdefault(cls, []).append((green[nucleus].mean() + 1) / (green[cytoplasm].mean() + 1))
    median = {cls: np.median(values) for cls, values in ratios.items()}
    assert median[CLASS_INDEX["Nucleoplasm"]] > 3 and median[CLASS_INDEX["Cytosol"]] < 0.5
    assert 0.7 < median[NEGATIVE] < 1.3
    assert len(median) >= 8


def test_rare_states_are_usually_missing_from_image_labels():
    rng = np.random.default_rng(3)
    config = SyntheticConfig(image_size=128)
    missed = labelled = 0
    for _ in range(300):
        _, _, cell_classes = make_field(rng, config)
        has_spindle = any(11 in classes for classes in cell_classes)
        if has_spindle:
            if 11 in image_labels_from_cells(cell_classes, 0.5):
                labelled += 1
            else:
                missed += 1
    assert missed > labelled > 0


def test_cli_is_deterministic_and_refuses_bad_flags(tmp_path):
    args = ["--n-train", "4", "--n-test", "1", "--image-size", "96", "--seed", "5"]
    assert make_synthetic_main(["--out", str(tmp_path / "a"), *args]) == 0
    assert make_synthetic_main(["--out", str(tmp_path / "b"), *args]) == 0
    comparison = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for sub in ("train", "truth"):
        sub_cmp = comparison.subdirs[sub]
        assert not sub_cmp.diff_files and not sub_cmp.left_only
    other = write_synthetic_dataset(tmp_path / "c", 4, 1, SyntheticConfig(image_size=96), seed=6)
    assert (other.train_csv.read_text() != (tmp_path / "a" / "train.csv").read_text())
    with pytest.raises(UserInputError):
        make_synthetic_main(["--out", str(tmp_path / "d"), "--majority", "1.5"])
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_cli_keeps_a_matching_dataset_and_refuses_a_different_one(tmp_path):
    args = ["--out", str(tmp_path / "a"), "--n-train", "3", "--n-test", "1", "--image-size", "96"]
    assert make_synthetic_main(args) == 0
    labels_before = (tmp_path / "a" / "train.csv").stat().st_mtime_ns
    assert make_synthetic_main(args) == 0  # same settings: kept, not rebuilt
    assert (tmp_path / "a" / "train.csv").stat().st_mtime_ns == labels_before
    with pytest.raises(UserInputError, match="--force"):
        make_synthetic_main([*args, "--n-test", "2"])
    assert make_synthetic_main([*args, "--force", "--n-test", "2"]) == 0
    assert len((tmp_path / "a" / "test.csv").read_text().splitlines()) == 3  # header + 2 fields
