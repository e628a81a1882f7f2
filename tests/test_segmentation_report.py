"""segmentation_report: every image by default, and reference masks with several channels read as
labels (identical channels, or one colour per cell) or refused with one line."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.preprocessing import segmentation_report as report
from src.utils.io import run_cli


def _stats(output: Path) -> pd.DataFrame:
    return pd.read_csv(output / "segmentation_report" / "train" / "match_stats.csv").set_index("ID")


def _labels(path: Path) -> np.ndarray:
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert labels.ndim == 2 and labels.max() > 1
    return labels


def test_all_images_by_default_and_colour_masks_read_as_labels(small_synthetic, tmp_path):
    ids = pd.read_csv(small_synthetic.train_csv)["ID"].tolist()
    grey_id, colour_id = ids[0], ids[1]
    references = tmp_path / "references"
    references.mkdir()
    grey = _labels(small_synthetic.truth_mask_path(grey_id))
    cv2.imwrite(str(references / f"{grey_id}.png"), np.repeat(grey[..., None], 3, axis=2))
    truth = _labels(small_synthetic.truth_mask_path(colour_id))
    # distinct colours that share their first channel, so no single channel holds the labels
    palette = np.random.default_rng(0).permutation(256 ** 2)[:int(truth.max())]
    colours = np.zeros((int(truth.max()) + 1, 3), np.uint8)
    colours[1:] = np.stack([np.full_like(palette, 7), palette % 256, palette // 256], axis=1)
    cv2.imwrite(str(references / f"{colour_id}.png"), colours[truth])
    base = ["--dataset", str(small_synthetic.root), "--png-size", "128"]
    assert report.main([*base, "--output-dir", str(tmp_path / "colour"), "--reference-masks", str(references)]) == 0
    pictures = list((tmp_path / "colour" / "segmentation_report" / "train").glob("*.png"))
    assert len(pictures) == len(ids) == 40  # no --limit: every image
    assert report.main([*base, "--output-dir", str(tmp_path / "truth"), "--ids", grey_id, colour_id]) == 0
    from_colour, from_truth = _stats(tmp_path / "colour"), _stats(tmp_path / "truth")
    assert from_colour.loc[[grey_id, colour_id]].equals(from_truth.loc[[grey_id, colour_id]])
    assert from_truth.loc[colour_id, "n_reference"] == len(np.unique(truth)) - 1


def test_palette_colours_reused_for_separate_cells():
    mask = np.zeros((40, 40, 3), np.uint8)
    mask[2:12, 2:12] = (0, 0, 255)
    mask[20:30, 20:30] = (0, 0, 255)  # same colour, another cell
    mask[2:12, 20:30] = (0, 255, 0)
    labels = report.decode_labels(mask, Path("m.png"))
    assert labels.max() == 3 and labels[5, 5] != labels[25, 25] and labels[0, 0] == 0


def test_a_colour_picture_is_refused_with_one_line(small_synthetic, tmp_path, capsys):
    image_id = pd.read_csv(small_synthetic.train_csv)["ID"][0]
    references = tmp_path / "references"
    references.mkdir()
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    cv2.imwrite(str(references / f"{image_id}.png"), noise)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(report.main, ["--dataset", str(small_synthetic.root), "--output-dir", str(tmp_path), "--ids", image_id,
                              "--reference-masks", str(references)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: reference mask {references / image_id}.png is a colour image")


def test_a_wrong_model_file_is_one_line(small_synthetic, tmp_path, capsys):
    text = tmp_path / "model.pth"
    text.write_text("not a model\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(report.main, ["--dataset", str(small_synthetic.root), "--output-dir", str(tmp_path), "--backend",
                              "hpacellseg", "--nuclei-model", str(text), "--cell-model", str(text)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines == [lines[0]] and lines[0].startswith(f"error: nuclei model {text}")


def test_from_records_shows_the_records_and_a_damaged_record_is_one_line(small_synthetic, tmp_path, capsys):
    from src.preprocessing import generate_cell_bboxes

    ids = pd.read_csv(small_synthetic.train_csv, dtype={"ID": str})["ID"][:2].tolist()
    assert generate_cell_bboxes.main(["--dataset", str(small_synthetic.root), "--output-dir", str(tmp_path),
                                      "--limit", "2", "--no-progress"]) == 0
    args = ["--dataset", str(small_synthetic.root), "--output-dir", str(tmp_path), "--ids", *ids, "--from-records"]
    assert report.main(args) == 0
    assert _stats(tmp_path).loc[ids, "n_predicted"].min() > 0
    record = tmp_path / "bboxes" / "train" / f"{ids[1]}.npz"
    record.write_bytes(record.read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit) as exit_info:
        run_cli(report.main, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {record}")
