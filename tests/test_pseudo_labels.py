import os
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from src.data.bbox_records import build_record, read_record, record_path, write_record
from src.data.images import read_field
from src.data.labels import read_label_table
from src.data.make_synthetic import write_synthetic_dataset
from src.data.schema import OutputLayout
from src.data.synthetic import SyntheticConfig
from src.predict import pseudo_label_store as store
from src.predict.cell_inputs import cell_inputs, tile_to_square, tta_view
from src.predict.predict_cells_from_image_level_densenet import CRASH_AFTER_PARTS_ENV, out_of_fold_assignment
from src.predict.predict_cells_from_image_level_densenet import main as predict_main
from src.preprocessing.unify_predictions_from_image_level_densenet import main as unify_main
from src.utils.io import UserInputError
from src.preprocessing.create_imagelevel_folds import assign_folds
from src.train.models import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
IMG_SIZE = 64


def save_fold_model(path: Path, fold: int, marker_bias: bool) -> None:
    torch.manual_seed(fold)
    model = build_model("densenet_tiny", embedding_dim=16).eval()
    if marker_bias:  # predictions = sigmoid(bias) = fold-specific constant: tells which model predicted
        with torch.no_grad():
            model.logit.weight.zero_()
            model.logit.bias.fill_(-2.0 + fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": model.config()}, path)


@pytest.fixture(scope="module")
def pipeline_inputs(tmp_path_factory):
    """10 fields of 96 px, truth masks as bbox records, 5 folds, a marker model per fold."""
    root = tmp_path_factory.mktemp("pseudo")
    layout = write_synthetic_dataset(root / "data", 10, 0, SyntheticConfig(image_size=96, cells_min=3, cells_max=5), 2)
    assign_folds(read_label_table(layout.train_csv), 5, seed=0).to_csv(layout.folds_csv, index=False)
    outputs = OutputLayout(root / "output")
    for image_id in read_label_table(layout.train_csv)["ID"]:
        mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        write_record(record_path(outputs.bboxes_dir, "train", image_id), build_record(image_id, mask))
    for fold in range(5):
        save_fold_model(outputs.model_dir("marker", fold) / "best.pth", fold, marker_bias=True)
        save_fold_model(outputs.model_dir("random", fold) / "best.pth", fold, marker_bias=False)
    return layout, outputs


def stage_args(layout, outputs, run_name, out, *extra):
    return ["--dataset", str(layout.root), "--output-dir", str(outputs.root), "--run-name", run_name,
            "--img-size", str(IMG_SIZE), "--workers", "0", "--batch-size", "8", "--out", str(out), *extra]


def run_stage(layout, outputs, run_name, out, *extra):
    """In-process run; returns the exit code."""
    return predict_main(stage_args(layout, outputs, run_name, out, *extra))


def run_stage_subprocess(layout, outputs, run_name, out, *extra, env=None):
    command = [sys.executable, "-m", "src.predict.predict_cells_from_image_level_densenet",
               *stage_args(layout, outputs, run_name, out, *extra)]
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)


def test_tile_to_square_by_hand():
    crop = np.arange(2 * 3 * 1, dtype=np.uint8).reshape(2, 3, 1)
    tiled = tile_to_square(crop, 5)[..., 0]
    assert tiled.tolist() == [[0, 1, 2, 0, 1], [3, 4, 5, 3, 4], [0, 1, 2, 0, 1], [3, 4, 5, 3, 4], [0, 1, 2, 0, 1]]
    assert tile_to_square(np.ones((10, 4, 2), np.uint8), 5).shape == (5, 5, 2)


def test_tta_views():
    batch = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    assert tta_view(batch, "flip_v")[0, 0].tolist() == [[2, 3], [0, 1]]
    assert tta_view(batch, "flip_h")[0, 0].tolist() == [[1, 0], [3, 2]]
    assert tta_view(batch, "rot90")[0, 0].tolist() == [[1, 3], [0, 2]]
    with pytest.raises(ValueError):
        tta_view(batch, "rot45")


def test_out_of_fold_assignment_with_duplicates():
    folds = pd.DataFrame({"ID": ["a", "b"], "fold": [3, 1]})
    duplicates = pd.DataFrame({"ID_a": ["a"], "ID_b": ["z"]})
    assert out_of_fold_assignment(folds, ["a", "b", "z", "q"], duplicates) == {"a": 3, "b": 1, "z": 3, "q": 0}


def test_alien_pixels_do_not_change_a_cell_input(pipeline_inputs):
    layout, outputs = pipeline_inputs
    model = build_model("densenet_tiny", embedding_dim=16).eval()
    for image_id in read_label_table(layout.train_csv)["ID"]:
        record = read_record(record_path(outputs.bboxes_dir, "train", image_id))
        if record.n_cells < 2:
            continue
        field = read_field(layout.image_dir("train"), image_id)
        before = cell_inputs(field, record, IMG_SIZE)
        for cell_i in range(record.n_cells):
            y0, x0, y1, x1 = record.box(cell_i)
            window = record.cell_mask[y0:y1, x0:x1]
            changed = field.copy()
            aliens = (window != 0) & (window != cell_i + 1)
            changed[y0:y1, x0:x1][aliens] = 255 - changed[y0:y1, x0:x1][aliens]
            after = cell_inputs(changed, record, IMG_SIZE, cells=[cell_i])
            np.testing.assert_array_equal(after[0], before[cell_i])
            with torch.no_grad():
                assert torch.equal(model(torch.from_numpy(after)), model(torch.from_numpy(before[cell_i:cell_i + 1])))
        # changing the cell itself does change its input (the check above can fail)
        own = field.copy()
        own[record.cell_mask == 1] = 0
        assert not np.array_equal(cell_inputs(own, record, IMG_SIZE, cells=[0])[0], before[0])
        return
    pytest.fail("no image with two cells")


def test_every_cell_is_predicted_out_of_fold(pipeline_inputs, tmp_path):
    layout, outputs = pipeline_inputs
    out = tmp_path / "marker.h5"
    assert run_stage(layout, outputs, "marker", out) == 0
    folds = pd.read_csv(layout.folds_csv)
    fold_of = dict(zip(folds["ID"], folds["fold"]))
    with store.PseudoLabels(out) as labels:
        image_ids = [i.decode() for i in labels.column("image_id")]
        stored_fold = labels.column("fold")
        predictions = labels.column("predictions").astype(np.float32)
        n_records = sum(read_record(record_path(outputs.bboxes_dir, "train", i), False).n_cells for i in fold_of)
        assert len(labels) == n_records and set(image_ids) == set(fold_of)
        for row, image_id in enumerate(image_ids):
            # the model that predicted the row, read from its marker bias
            predicted_by = int(round(np.log(predictions[row, 0] / (1 - predictions[row, 0])) + 2.0))
            assert predicted_by == fold_of[image_id] == stored_fold[row]
        for image_id in list(fold_of)[:3]:
            rows = labels.image(image_id)
            assert rows["cell_i"].tolist() == list(range(len(rows["cell_i"])))
        fold_rows = labels.fold_rows(2)
        assert {i.decode() for i in fold_rows["image_id"]} == {i for i, f in fold_of.items() if f == 2}
    assert out.with_name("marker_hist.png").is_file()


def test_kill_and_rerun_equals_uninterrupted_run(pipeline_inputs, tmp_path):
    layout, outputs = pipeline_inputs
    whole = tmp_path / "whole.h5"
    assert run_stage(layout, outputs, "random", whole, "--cells-per-part", "6") == 0
    resumed = tmp_path / "resumed.h5"
    crashed = run_stage_subprocess(layout, outputs, "random", resumed, "--cells-per-part", "6",
                                   env={CRASH_AFTER_PARTS_ENV: "2"})
    assert crashed.returncode == 17, crashed.stderr
    assert not resumed.exists()
    assert len(list(store.parts_dir(resumed).glob("*.h5"))) == 2
    done_before = store.committed_images(resumed)
    assert 0 < len(done_before) < 10
    assert run_stage(layout, outputs, "random", resumed, "--cells-per-part", "6") == 0
    with h5py.File(whole, "r") as a, h5py.File(resumed, "r") as b:
        order_a = np.lexsort((a["cell_i"][...], a["image_id"][...]))
        order_b = np.lexsort((b["cell_i"][...], b["image_id"][...]))
        for name in ("image_id", "cell_i", "fold", "source", "predictions", "embeddings"):
            np.testing.assert_array_equal(a[name][...][order_a], b[name][...][order_b])
        assert b["embeddings"].shape[1] == 16 and b["predictions"].dtype == np.float16
    assert not store.parts_dir(resumed).exists()


def test_shards_and_fold_single_then_unify(pipeline_inputs, tmp_path):
    layout, outputs = pipeline_inputs
    out = tmp_path / "sharded.h5"
    for shard in ("0/2", "1/2"):
        assert run_stage(layout, outputs, "marker", out, "--shard", shard) == 0
    assert not out.exists() and len(list(store.parts_dir(out).glob("*.h5"))) >= 2
    assert unify_main(["--out", str(out)]) == 0
    with store.PseudoLabels(out) as labels:
        assert len(labels.image_index) == 10
    single = tmp_path / "single.h5"
    assert run_stage(layout, outputs, "marker", single, "--fold-single", "1") == 0
    assert store.committed_images(single) == {i for i, f in zip(*pd.read_csv(layout.folds_csv)[["ID", "fold"]].T.values) if f == 1}


def test_missing_model_is_a_clear_error(pipeline_inputs, tmp_path):
    layout, outputs = pipeline_inputs
    result = run_stage_subprocess(layout, outputs, "nope", tmp_path / "x.h5")
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserInputError, match="--shard"):
        run_stage(layout, outputs, "marker", tmp_path / "y.h5", "--shard", "3/2")
