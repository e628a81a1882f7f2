"""Stages built on the bbox records: denoising folds, Negatives with obvious staining, and the
segmentation report."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from src.data.bbox_records import read_record
from src.data.classes import NEGATIVE
from src.data.labels import parse_label_string
from src.data.schema import DENOISING_FOLDS_COLUMNS, OutputLayout, obvious_staining_csv, obvious_staining_images_csv
from src.preprocessing import create_denoising_folds, detect_negatives_with_obvious_staining as staining
from src.preprocessing import generate_cell_bboxes, segmentation_report
from src import segmentation
from src.segmentation import make_segmenter


@pytest.fixture(scope="module")
def segmented(small_synthetic, tmp_path_factory):
    output = tmp_path_factory.mktemp("output")
    assert generate_cell_bboxes.main(["--dataset", str(small_synthetic.root), "--output-dir", str(output),
                                      "--no-progress"]) == 0
    return output


def _cells(n_per_image):
    return pd.DataFrame([(f"im{i}", c) for i, n in enumerate(n_per_image) for c in range(n)], columns=["ID", "cell_i"])


def test_assign_folds_spreads_each_image_and_balances_folds():
    cells = _cells([7, 1, 2, 5, 3, 3, 1, 1, 9, 4, 2])
    folds = create_denoising_folds.assign_folds(cells, n_folds=3, seed=0)
    assert list(folds.columns) == list(DENOISING_FOLDS_COLUMNS) and len(folds) == len(cells)
    for _, group in folds.groupby("ID"):
        counts = np.bincount(group["fold"], minlength=3)
        assert counts.max() - counts.min() <= 1
    totals = np.bincount(folds["fold"], minlength=3)
    assert totals.max() - totals.min() <= 1
    again = create_denoising_folds.assign_folds(cells.sample(frac=1, random_state=1), n_folds=3, seed=0)
    pd.testing.assert_frame_equal(folds, again)  # input order does not matter
    other = create_denoising_folds.assign_folds(cells, n_folds=3, seed=1)
    assert not folds["fold"].equals(other["fold"])


def test_denoising_folds_cli(segmented):
    assert create_denoising_folds.main(["--output-dir", str(segmented)]) == 0
    folds = pd.read_csv(OutputLayout(segmented).denoising_folds_csv, dtype={"ID": str})
    cells = pd.read_csv(segmented / "bboxes" / "train" / "cells.csv", dtype={"ID": str})
    assert set(map(tuple, folds[["ID", "cell_i"]].to_numpy())) == set(map(tuple, cells[["ID", "cell_i"]].to_numpy()))
    assert sorted(folds["fold"].unique()) == [0, 1, 2]


def test_top_pixel_means_and_reference_scale():
    cells = np.zeros((6, 6), np.uint16)
    cells[:3, :3] = 1
    cells[3:, 3:] = 2
    green = np.arange(36, dtype=np.uint8).reshape(6, 6)
    means = staining.top_pixel_means(green, cells, k=2)
    assert means.tolist() == [pytest.approx((14 + 13) / 2), pytest.approx((35 + 34) / 2)]
    assert staining.top_pixel_means(green, cells, k=50).tolist() == [pytest.approx(green[:3, :3].mean()),
                                                                     pytest.approx(green[3:, 3:].mean())]
    assert staining.pixels_at_reference_scale(10, (2048, 2048)) == 10
    assert staining.pixels_at_reference_scale(10, (3072, 3072)) == 22
    assert staining.pixels_at_reference_scale(10, (1728, 1728)) == 7
    assert staining.pixels_at_reference_scale(10, (512, 512)) == 1


def test_obvious_staining_cli(small_synthetic, segmented, tmp_path, monkeypatch):
    dataset = tmp_path / "dataset"  # a view of the shared dataset, so its folder is not written to
    dataset.mkdir()
    shutil.copy(small_synthetic.train_csv, dataset / "train.csv")
    (dataset / "train").symlink_to(small_synthetic.image_dir("train"))
    assert staining.main(["--dataset", str(dataset), "--output-dir", str(segmented), "--threshold", "100"]) == 0
    cells = pd.read_csv(obvious_staining_csv(dataset), dtype={"ID": str})
    images = pd.read_csv(obvious_staining_images_csv(dataset), dtype={"ID": str})
    labels = pd.read_csv(small_synthetic.train_csv, dtype={"ID": str}).set_index("ID")["Label"]
    assert len(images) > 0 and all(NEGATIVE in parse_label_string(labels[i]) for i in images["ID"])
    assert (cells["obvious"] == (cells["top10_mean"] >= 100)).all()
    for image_id, n_cells in zip(images["ID"], images["n_cells"]):  # cell_i follows the record
        record = read_record(segmented / "bboxes" / "train" / f"{image_id}.npz", load_mask=False)
        assert record.n_cells == n_cells == (cells["ID"] == image_id).sum()
    # without records the same segmenter gives the same cells, and the result is deterministic; the
    # segmenter checked at start-up is the one used (a model backend is not loaded twice)
    built = []
    def counting(backend="classical", **config):
        built.append(config)
        return make_segmenter(backend, **config)
    monkeypatch.setattr(staining, "make_segmenter", counting)  # a worker's own build
    monkeypatch.setattr(segmentation, "make_segmenter", counting)  # the start-up check's
    assert staining.main(["--dataset", str(dataset), "--output-dir", str(tmp_path / "none"), "--threshold", "100"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(obvious_staining_csv(dataset), dtype={"ID": str}), cells)
    assert len(built) == 1


def test_segmentation_report_on_synthetic(small_synthetic, tmp_path):
    assert segmentation_report.main(["--dataset", str(small_synthetic.root), "--output-dir", str(tmp_path),
                                     "--limit", "3"]) == 0
    folder = tmp_path / "segmentation_report" / "train"
    assert len(list(folder.glob("*.png"))) == 3
    stats = pd.read_csv(folder / "match_stats.csv")
    assert stats["ID"].tolist()[-1] == "ALL" and len(stats) == 4
    pooled = stats.iloc[-1]
    assert pooled["n_reference"] == stats["n_reference"][:3].sum() and pooled["match_rate"] >= 0.9


def test_segmentation_report_on_hpa_samples(hpa_samples, tmp_path):
    code = segmentation_report.main(["--dataset", str(hpa_samples), "--image-dir", str(hpa_samples / "images"),
                                     "--reference-masks", str(hpa_samples / "masks"), "--output-dir", str(tmp_path),
                                     "--png-size", "512"])
    assert code == 0
    stats = pd.read_csv(tmp_path / "segmentation_report" / "train" / "match_stats.csv")
    assert len(stats) == 4 and stats.iloc[-1]["match_rate"] >= 0.8
