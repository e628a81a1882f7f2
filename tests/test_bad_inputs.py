"""Malformed inputs through the real stage CLIs (issue 13 table, issue 14 item 6): each gives one
`error: ...` line and exit code 2 (or one warning and a logged skip where the run can go on), and
leaves the other outputs intact."""
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.data.bbox_records import RecordError, build_record, cell_crop_mask, read_record, record_path, write_record
from src.data.cache import load_field
from src.data.images import RGBY, read_field, resize_field, write_channel
from src.data.labels import read_label_table
from src.data.make_synthetic import write_synthetic_dataset
from src.data.schema import DatasetLayout, OutputLayout
from src.data.synthetic import SyntheticConfig
from src.predict import pseudo_label_store as store
from src.predict.predict_cells_from_image_level_densenet import main as pseudo_main
from src.predict.predict_submission import main as submission_main
from src.preprocessing import (bestfitting_duplicates_search, cache_images, check_inputs, create_denoising_folds,
                               create_imagelevel_folds, detect_negatives_with_obvious_staining, generate_cell_bboxes)
from src.train.datasets import ImageLevelDataset
from src.train.models import build_model
from src.utils.io import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> DatasetLayout:
    """12 train + 2 test fields of 64 px."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("bad") / "clean", 12, 2,
                                   SyntheticConfig(image_size=64, cells_min=3, cells_max=5, label_noise=0.0), seed=5)


@pytest.fixture
def dataset(clean_dataset, tmp_path) -> DatasetLayout:
    """A private copy that a test may damage."""
    return DatasetLayout(shutil.copytree(clean_dataset.root, tmp_path / "data"))


def run_stage(main, argv, capsys) -> tuple[int, list[str]]:
    """Exit code and non-empty stderr lines of a stage run as from the command line (run_cli)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    return exit_info.value.code, [line for line in lines if line.startswith(("error", "Traceback"))]


def one_error(code: int, lines: list[str], *fragments: str) -> str:
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- CSV with extra fields, non-UTF-8 bytes: every stage that reads the label table -----------------

STAGES = {
    "cache": (cache_images.main, ["--size", "32"]),
    "duplicates": (bestfitting_duplicates_search.main, ["--size", "32"]),
    "folds": (create_imagelevel_folds.main, ["--n-folds", "3"]),
    "negatives": (detect_negatives_with_obvious_staining.main, ["--output-dir", "{out}"]),
    "bboxes": (generate_cell_bboxes.main, ["--output-dir", "{out}", "--no-progress"]),
    "check": (check_inputs.main, []),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("damage", ["extra_fields", "non_utf8"])
def test_malformed_label_table_is_one_line_in_every_stage(dataset, tmp_path, capsys, stage, damage):
    lines = dataset.train_csv.read_bytes().splitlines()
    lines[5] = lines[5] + b",surplus" if damage == "extra_fields" else lines[5].split(b",")[0] + b"\xff\xfe,3"
    dataset.train_csv.write_bytes(b"\n".join(lines) + b"\n")
    dataset.folds_csv.write_text("kept\n")   # an earlier output that must survive
    before = sorted(p.name for p in dataset.root.iterdir())
    main, extra = STAGES[stage]
    argv = ["--dataset", dataset.root] + [a.format(out=tmp_path / "out") for a in extra]
    code, errors = run_stage(main, argv, capsys)
    message = one_error(code, errors, str(dataset.train_csv), "line 6")
    assert ("3 fields, the header has 2" if damage == "extra_fields" else "0xff is not UTF-8") in message
    assert sorted(p.name for p in dataset.root.iterdir()) == before and dataset.folds_csv.read_text() == "kept\n"
    assert not [p for p in (tmp_path / "out").rglob("[!.]*") if p.is_file()]  # nothing written (a lock aside)


@pytest.mark.parametrize("damage, fragment", [
    ("empty", "file is empty"), ("folder", "is a folder"), ("duplicate_header", "named more than once"),
    ("missing_column", "missing column(s) ['Label']"), ("header_only", "no rows")])
def test_other_malformed_tables_are_one_line(dataset, capsys, damage, fragment):
    table = dataset.train_csv
    if damage == "empty":
        table.write_bytes(b"")
    elif damage == "folder":
        table.unlink()
        table.mkdir()
    elif damage == "duplicate_header":
        table.write_text("ID,Label,Label\na,1,2\n")
    elif damage == "missing_column":
        table.write_text("ID,Labels\na,1\n")
    elif damage == "header_only":
        table.write_text("ID,Label\n\n")
    one_error(*run_stage(check_inputs.main, ["--dataset", dataset.root], capsys), str(table), fragment)


def test_bom_crlf_and_blank_lines_read_like_the_clean_table(dataset):
    clean = read_label_table(dataset.train_csv)
    text = dataset.train_csv.read_text()
    dataset.train_csv.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n\r\n").encode())
    pd.testing.assert_frame_equal(read_label_table(dataset.train_csv), clean)


def test_line_numbers_count_blank_lines(dataset, capsys):
    dataset.train_csv.write_text("ID,Label\r\n\r\na,1\r\n\r\nb,1|99\r\n")
    one_error(*run_stage(check_inputs.main, ["--dataset", dataset.root], capsys),
              f"{dataset.train_csv}: line 5 (ID b): label id 99 outside 0..18")


def test_folder_where_an_output_goes_is_one_line(dataset, capsys):
    dataset.folds_csv.mkdir()
    one_error(*run_stage(create_imagelevel_folds.main, ["--dataset", dataset.root, "--n-folds", "3"], capsys),
              "Is a directory", str(dataset.folds_csv))
    assert dataset.folds_csv.is_dir() and not list(dataset.root.glob(".folds*"))  # no temporary file left


# --- test.csv: wrong columns found before any stage; sizes from the images when absent ---------------

def test_pipeline_refuses_a_bad_test_table_before_the_first_stage(dataset, tmp_path):
    dataset.test_csv.write_text("ID,ImageWidth\nx,64\n")
    result = subprocess.run(["bash", "orchestration_scripts/run_pipeline.sh"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable,
                                                         "DATASET": str(dataset.root), "OUTPUT": str(tmp_path / "out")})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert errors == [f"error: {dataset.test_csv}: has ImageWidth but not ImageHeight"]
    assert "preprocessing" not in result.stdout and not (tmp_path / "out").exists()
    assert not dataset.cache_dir(1024).exists()


@pytest.mark.parametrize("row, fragment", [("x,0,64", "ImageWidth '0' is not a positive integer"),
                                           ("x,64,sixty", "ImageHeight 'sixty' is not a positive integer")])
def test_bad_test_sizes_name_the_line(dataset, capsys, row, fragment):
    dataset.test_csv.write_text(f"ID,ImageWidth,ImageHeight\ny,64,64\n{row}\n")
    one_error(*run_stage(check_inputs.main, ["--dataset", dataset.root], capsys), "line 3 (ID x)", fragment)


def test_test_table_of_id_label_takes_sizes_from_the_images(dataset, tmp_path, capsys, caplog):
    ids = pd.read_csv(dataset.test_csv, dtype={"ID": str})["ID"].tolist()
    dataset.test_csv.write_text("ID,Label\n" + "".join(f"{i},0\n" for i in ids))
    with caplog.at_level(logging.WARNING):
        code, errors = run_stage(check_inputs.main, ["--dataset", dataset.root], capsys)
    assert code == 0 and errors == []
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{dataset.test_csv} has no ImageWidth/ImageHeight columns: the sizes are taken from the images"]
    outputs = OutputLayout(tmp_path / "out")
    model = build_model("densenet_tiny", embedding_dim=16).eval()
    checkpoint = outputs.model_dir("cells", 0) / "best.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_config": model.config()}, checkpoint)
    out = tmp_path / "submission.csv"
    code, errors = run_stage(submission_main, ["--dataset", dataset.root, "--output-dir", outputs.root, "--run-name",
                                               "cells", "--folds", "0", "--img-size", "32", "--overlays", "0",
                                               "--tta", "identity", "--out", out], capsys)
    assert code == 0 and errors == []
    submission = pd.read_csv(out, dtype={"ID": str})
    assert submission["ID"].tolist() == ids
    assert (submission["ImageWidth"] == 64).all() and (submission["ImageHeight"] == 64).all()


# --- an ID in train.csv without image files: left out of the folds with one warning -------------------

def test_folds_leave_out_an_id_without_images(dataset, capsys, caplog):
    ids = read_label_table(dataset.train_csv)["ID"].tolist()
    (dataset.image_dir("train") / f"{ids[3]}_yellow.png").unlink()
    (dataset.image_dir("train") / f"{ids[7]}_red.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        code, errors = run_stage(create_imagelevel_folds.main, ["--dataset", dataset.root, "--n-folds", "3"], capsys)
    assert code == 0 and errors == []
    warnings = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("left out 2 of 12 images with no usable image files")
    assert f"{ids[3]}_yellow" in warnings[0]
    folds = pd.read_csv(dataset.folds_csv, dtype={"ID": str})
    assert sorted(folds["ID"]) == sorted(set(ids) - {ids[3], ids[7]})
    # the up-front check refuses the same table, naming the count and the first file
    one_error(*run_stage(check_inputs.main, ["--dataset", dataset.root], capsys),
              "2 of 12 IDs", f"{ids[3]}_yellow.png: missing")


# --- damaged cache files: rebuilt by cache_images, decoded instead at load -----------------------------

@pytest.mark.parametrize("damage", ["zero_byte", "truncated", "text", "wrong_size"])
def test_damaged_cache_file_is_rebuilt_and_never_breaks_loading(dataset, capsys, caplog, damage):
    argv = ["--dataset", dataset.root, "--size", "32"]
    assert run_stage(cache_images.main, argv, capsys) == (0, [])
    ids = read_label_table(dataset.train_csv)["ID"].tolist()
    damaged = dataset.cache_path(32, ids[2])
    good = damaged.read_bytes()
    if damage == "zero_byte":
        damaged.write_bytes(b"")
    elif damage == "truncated":
        damaged.write_bytes(good[:len(good) // 2])
    elif damage == "text":
        damaged.write_text("not an array\n" * 20)
    else:
        np.save(damaged, np.zeros((16, 16, 4), np.uint8))
    others = {i: dataset.cache_path(32, i).stat().st_mtime_ns for i in ids if i != ids[2]}
    expected = read_field(dataset.image_dir("train"), ids[2], size=32)
    # at load (what training calls): one warning, the field decoded from its channel files
    table = read_label_table(dataset.train_csv).assign(source="train")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            np.testing.assert_array_equal(load_field(dataset, "train", ids[2], 32), expected)
        image, _, _ = ImageLevelDataset(dataset, table, 32)[2]
    np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "damaged cache file" in warnings[0]
    assert "pickle" not in warnings[0]
    caplog.clear()
    # the rerun rebuilds it, with one warning, and leaves the sound files alone
    with caplog.at_level(logging.WARNING):
        assert run_stage(cache_images.main, argv, capsys) == (0, [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("rebuilding 1 damaged cache file(s)")
    assert damaged.read_bytes() == good
    assert {i: dataset.cache_path(32, i).stat().st_mtime_ns for i in others} == others


# --- non-square field: the cache keeps the aspect; record boxes map onto it ---------------------------

def test_non_square_field_keeps_its_aspect_in_the_cache(tmp_path, capsys):
    layout = DatasetLayout(tmp_path / "data")
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 255, (48, 72, 4), dtype=np.uint8)
    for c, channel in enumerate(RGBY):
        write_channel(layout.image_dir("train") / f"wide_{channel}.png", planes[..., c])
    layout.train_csv.write_text("ID,Label\nwide,0\n")
    assert run_stage(cache_images.main, ["--dataset", layout.root, "--size", "36"], capsys) == (0, [])
    cached = np.load(layout.cache_path(36, "wide"))
    assert cached.shape == (36, 36, 4)
    np.testing.assert_array_equal(cached[:24], resize_field(planes, (24, 36)))  # one factor, 36 / 72 = 0.5
    assert not cached[24:].any()
    np.testing.assert_array_equal(load_field(layout, "train", "wide", 36), cached)
    mask = np.zeros((48, 72), np.uint16)
    mask[12:25, 36:55] = 1
    box, labels = cell_crop_mask(build_record("wide", mask), 0, cached.shape[:2])
    assert box == (6, 18, 13, 28)  # floor(12 / 2), floor(36 / 2), ceil(25 / 2), ceil(55 / 2)
    expected = np.ones((7, 10), np.uint16)  # square pixel r samples record row (r + 0.5) * 2: 13..25, 25 is out
    expected[-1], expected[:, -1] = 0, 0
    np.testing.assert_array_equal(labels, expected)


# --- all-black field: stored with zero cells and counted --------------------------------------------

def test_field_without_cells_is_stored_with_zero_cells(dataset, tmp_path, capsys, caplog):
    ids = read_label_table(dataset.train_csv)["ID"].tolist()
    outputs = OutputLayout(tmp_path / "out")
    for channel in RGBY:
        write_channel(dataset.image_dir("train") / f"{ids[4]}_{channel}.png", np.zeros((64, 64), np.uint8))
    assert run_stage(generate_cell_bboxes.main, ["--dataset", dataset.root, "--output-dir", outputs.root,
                                                 "--no-progress"], capsys)[0] == 0
    assert read_record(record_path(outputs.bboxes_dir, "train", ids[4])).n_cells == 0
    pd.DataFrame({"ID": ids, "source": "train", "fold": np.arange(12) % 2}).to_csv(dataset.folds_csv, index=False)
    for fold in (0, 1):
        torch.manual_seed(fold)
        model = build_model("densenet_tiny", embedding_dim=16).eval()
        path = outputs.model_dir("img", fold) / "best.pth"
        path.parent.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "model_config": model.config()}, path)
    argv = ["--dataset", dataset.root, "--output-dir", outputs.root, "--run-name", "img", "--img-size", "32",
            "--workers", "0", "--tta", "identity", "--cells-per-part", "8"]
    with caplog.at_level(logging.INFO):
        assert run_stage(pseudo_main, argv, capsys) == (0, [])
    report = [r.getMessage() for r in caplog.records if "with no cell" in r.getMessage()]
    assert len(report) == 1 and report[0].endswith("of 12 images (1 of them with no cell)")
    with store.PseudoLabels(outputs.pseudo_labels_h5) as labels:
        assert set(labels.image_index) == set(ids) and labels.image_index[ids[4]][1] == 0
        for image_id in ids:
            n = read_record(record_path(outputs.bboxes_dir, "train", image_id), load_mask=False).n_cells
            rows = labels.image(image_id)
            assert len(rows["cell_i"]) == n and list(rows["cell_i"]) == list(range(n))
        total = len(labels)
    # a rerun finds every image done, the empty one included, and the file keeps its rows
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_stage(pseudo_main, argv, capsys) == (0, [])
    assert any("12 already done, 0 to predict" in r.getMessage() for r in caplog.records)
    with store.PseudoLabels(outputs.pseudo_labels_h5) as labels:
        assert len(labels) == total and labels.image_index[ids[4]][1] == 0


def test_parts_with_only_empty_images_unify(tmp_path):
    final = tmp_path / "p.h5"
    empty_rows = store.CellRows(store.encode_ids([]), np.zeros(0, np.int32), np.zeros(0, np.uint8),
                                np.zeros(0, np.int8), np.zeros((0, 19), np.float16), np.zeros((0, 0), np.float16))
    store.write_part(final, "s", empty_rows, ["black"])
    rows = store.CellRows(store.encode_ids(["a", "a"]), np.arange(2, dtype=np.int32), np.zeros(2, np.uint8),
                          np.zeros(2, np.int8), np.ones((2, 19), np.float16), np.ones((2, 8), np.float16))
    store.write_part(final, "s", rows)
    assert store.unify(final) == 2
    with store.PseudoLabels(final) as labels:
        assert labels.image_index == {"black": (0, 0), "a": (0, 2)}
        assert labels.column("embeddings").shape == (2, 8)
    assert store.committed_images(final) == {"a", "black"}


# --- bbox records: a corrupt record stops denoising folds; a text .npz is named as such ---------------

@pytest.fixture
def segmented(dataset, tmp_path, capsys):
    outputs = OutputLayout(tmp_path / "out")
    assert run_stage(generate_cell_bboxes.main, ["--dataset", dataset.root, "--output-dir", outputs.root,
                                                 "--no-progress"], capsys) == (0, [])
    return dataset, outputs


@pytest.mark.parametrize("damage", ["text", "truncated", "other_cells"])
def test_denoising_folds_refuse_a_stale_or_corrupt_index(segmented, capsys, damage):
    dataset, outputs = segmented
    argv = ["--output-dir", outputs.root]
    assert run_stage(create_denoising_folds.main, argv, capsys) == (0, [])
    folds_before = outputs.denoising_folds_csv.read_bytes()
    ids = read_label_table(dataset.train_csv)["ID"].tolist()
    path = record_path(outputs.bboxes_dir, "train", ids[1])
    if damage == "text":
        path.write_text("hello\n")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # a record rewritten with one cell after cells.csv was made
        mask = np.zeros((64, 64), np.uint16)
        mask[5:20, 5:20] = 1
        write_record(path, build_record(ids[1], mask))
    code, errors = run_stage(create_denoising_folds.main, argv, capsys)
    message = one_error(code, errors, "cells.csv was not used")
    if damage == "other_cells":
        assert f"of {ids[1]}, its record holds 1;" in message
    else:
        assert str(path) in message and "not a zip archive" in message
    assert outputs.denoising_folds_csv.read_bytes() == folds_before


def test_malformed_cell_index_is_one_line(segmented, capsys):
    _, outputs = segmented
    cells_csv = outputs.bboxes_dir / "train" / "cells.csv"
    n_columns = len(cells_csv.read_text().splitlines()[0].split(","))
    cells_csv.write_text(cells_csv.read_text() + ",".join(["x"] + [str(i) for i in range(n_columns + 1)]) + "\n")
    one_error(*run_stage(create_denoising_folds.main, ["--output-dir", outputs.root], capsys), str(cells_csv),
              f"Expected {n_columns} fields", "rerun python -m src.preprocessing.generate_cell_bboxes")
    assert not outputs.denoising_folds_csv.exists()


@pytest.mark.parametrize("row, fragment", [("a,b,none,1,2", "line 2: 5 fields, the header has 6"),
                                           ("a,b,none,1,2,x", "a distance is not an integer")])
def test_malformed_duplicates_table_is_one_line(dataset, capsys, row, fragment):
    dataset.duplicates_csv.write_text("ID_a,ID_b,transform,dist_red,dist_green,dist_blue\n" + row + "\n")
    one_error(*run_stage(create_imagelevel_folds.main, ["--dataset", dataset.root, "--n-folds", "3",
                                                        "--drop-duplicates"], capsys), str(dataset.duplicates_csv), fragment)
    assert not dataset.folds_csv.exists()


def test_a_damaged_record_read_by_any_stage_is_one_line(segmented, capsys):
    dataset, outputs = segmented
    image_id = read_label_table(dataset.train_csv)["ID"].tolist()[0]
    path = record_path(outputs.bboxes_dir, "train", image_id)
    path.write_bytes(path.read_bytes()[:100])

    def stage(argv):  # any stage that reads a record without its own handling
        read_record(path)
        return 0

    one_error(*run_stage(stage, [], capsys), str(path))


@pytest.mark.parametrize("content", [b"some text\n", b"", np.lib.format.MAGIC_PREFIX + b"\x01\x00garbage"])
def test_text_file_as_record_is_not_called_pickled_data(segmented, capsys, content):
    dataset, outputs = segmented
    ids = read_label_table(dataset.train_csv)["ID"].tolist()
    path = record_path(outputs.bboxes_dir, "train", ids[0])
    path.write_bytes(content)
    with pytest.raises(RecordError, match="not a zip archive"):
        read_record(path)
    code, errors = run_stage(generate_cell_bboxes.main, ["--dataset", dataset.root, "--output-dir", outputs.root,
                                                         "--no-progress"], capsys)
    if content:
        message = one_error(code, errors, str(path))
        assert "pickle" not in message and "not a zip archive" in message
    else:  # a zero-byte record counts as unfinished: the rerun segments the image again
        assert (code, errors) == (0, []) and read_record(path).n_cells > 0
    assert all(read_record(record_path(outputs.bboxes_dir, "train", i)).n_cells > 0 for i in ids[1:])


# --- file modes follow the umask ---------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(dataset, capsys, umask, mode):
    previous = os.umask(umask)
    try:
        assert run_stage(create_imagelevel_folds.main, ["--dataset", dataset.root, "--n-folds", "3"], capsys)[0] == 0
        assert run_stage(cache_images.main, ["--dataset", dataset.root, "--size", "16", "--limit", "2"], capsys)[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(dataset.folds_csv.stat().st_mode) == mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in dataset.cache_dir(16).glob("*.npy")} == {mode}
