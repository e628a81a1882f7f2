import numpy as np
import pandas as pd
import pytest
import torch

from src.data.bbox_records import read_record, record_path
from src.data.make_synthetic import write_synthetic_dataset
from src.data.schema import OutputLayout
from src.data.synthetic import SyntheticConfig
from src.evaluation.rle import decode_mask
from src.predict.cell_inputs import cellwise_input, tta_view
from src.predict.predict_submission import main as submission_main
from src.predict import predict_submission
from src.predict.predict_submission import negative_probability
from src.train.models import build_model


def test_negative_probability_by_hand():
    probabilities = np.zeros((2, 19))
    probabilities[0, [0, 5]] = [0.9, 0.3]
    probabilities[1, 18] = 0.99  # the model's own Negative column is ignored
    assert negative_probability(probabilities, "min").tolist() == pytest.approx([0.1, 1.0])
    assert negative_probability(probabilities, "product").tolist() == pytest.approx([0.1 * 0.7, 1.0])


def test_image_context_by_hand():
    probabilities = np.zeros((3, 19))
    probabilities[:, 2] = [0.9, 0.3, 0.0]       # field max 0.9
    probabilities[:, 7] = [0.0, 0.2, 0.4]       # field max 0.4
    probabilities[:, 18] = [0.5, 0.5, 0.5]      # Negative is not mixed: the cell's own
    mixed = predict_submission.with_image_context(probabilities, 0.5)
    assert mixed[:, 2].tolist() == pytest.approx([0.9, 0.6, 0.45])
    assert mixed[:, 7].tolist() == pytest.approx([0.2, 0.3, 0.4])
    assert mixed[:, 18].tolist() == [0.5, 0.5, 0.5] and (mixed[:, [0, 1, 3]] == 0).all()
    assert predict_submission.with_image_context(probabilities[1:2], 0.7)[0, 2] == pytest.approx(0.3)  # one cell: itself
    assert np.array_equal(predict_submission.with_image_context(probabilities, 0.0), probabilities)
    assert predict_submission.with_image_context(np.zeros((0, 19)), 0.5).shape == (0, 19)


def test_cellwise_input_tiles_thin_cells_and_pads():
    thin = np.full((10, 40, 1), 7, np.uint8)       # short side under half the long side: tiled 4x
    assert (cellwise_input(thin, 20) == 200).all()  # a flat channel: its level becomes the reference
    wide = np.full((30, 40, 1), 7, np.uint8)       # padded to 40x40, centred: 5 zero rows top and bottom
    square = cellwise_input(wide, 40)
    assert (square[:5] == 0).all() and (square[5:35] == 200).all() and (square[35:] == 0).all()


def test_cell_inputs_are_scaled_per_channel_to_their_lit_pixels():
    from src.predict.cell_inputs import normalise_channels
    crop = np.zeros((10, 10, 3), np.uint8)
    crop[..., 0] = 10
    crop[:5, :, 0] = 20                       # channel 0: two levels, 99th percentile 20
    crop[2:8, 2:8, 1] = 50                    # channel 1: a lit square on zeros; channel 2 all zero
    out = normalise_channels(crop)
    assert (out[5:, :, 0] == 100).all() and (out[:5, :, 0] == 200).all()  # ratio kept
    assert (out[2:8, 2:8, 1] == 200).all() and out[..., 1].sum() == 200 * 36 and not out[..., 2].any()
    dim, bright = crop // 2, np.minimum(crop.astype(int) * 3, 255).astype(np.uint8)
    assert np.array_equal(normalise_channels(dim), out) and np.array_equal(normalise_channels(bright), out)
    hot = crop.copy()
    hot[0, 0, 1] = 255                        # one hot pixel among 37 lit: above the 99th percentile, clipped
    assert normalise_channels(hot)[0, 0, 1] == 255


def test_scale_shift_view_keeps_shape_and_scale():
    batch = torch.full((2, 4, 33, 33), 255, dtype=torch.uint8)
    view = tta_view(batch, "scale_shift")
    assert view.shape == batch.shape and view.dtype == torch.float32 and torch.allclose(view, torch.ones_like(view))


@pytest.fixture(scope="module")
def test_fields(tmp_path_factory):
    root = tmp_path_factory.mktemp("submission")
    layout = write_synthetic_dataset(root / "data", 2, 4, SyntheticConfig(image_size=96, cells_min=3, cells_max=5), 4)
    outputs = OutputLayout(root / "output")
    for fold in (0, 1):
        torch.manual_seed(fold)
        model = build_model("densenet_tiny", embedding_dim=16).eval()
        path = outputs.model_dir("cells", fold) / "best.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "model_config": model.config()}, path)
    return layout, outputs


def run(layout, outputs, out, *extra):
    return submission_main(["--dataset", str(layout.root), "--output-dir", str(outputs.root), "--run-name", "cells",
                            "--folds", "0,1", "--img-size", "32", "--overlays", "1", "--out", str(out), *extra])


def test_submission_rows_masks_and_negative(test_fields, tmp_path):
    layout, outputs = test_fields
    out = tmp_path / "submission.csv"
    assert run(layout, outputs, out) == 0
    submission = pd.read_csv(out, dtype={"ID": str, "PredictionString": str})
    tests = pd.read_csv(layout.test_csv, dtype={"ID": str})
    assert submission["ID"].tolist() == tests["ID"].tolist()
    cells = pd.read_csv(tmp_path / "submission_cells.csv", dtype={"ID": str})
    for row in submission.itertuples():
        record = read_record(record_path(outputs.bboxes_dir, "test", row.ID))   # segmented on the fly
        parts = row.PredictionString.split()
        assert len(parts) == 3 * 19 * record.n_cells
        for k in range(0, len(parts), 3 * 19):
            cell_i = k // (3 * 19)
            assert [int(c) for c in parts[k:k + 57:3]] == list(range(19))
            mask = decode_mask(parts[k + 2], row.ImageHeight, row.ImageWidth)
            assert np.array_equal(mask, record.cell_mask == cell_i + 1)
        probabilities = cells[cells["ID"] == row.ID][[str(c) for c in range(19)]].to_numpy()
        assert np.allclose(probabilities[:, 18], (1 - probabilities[:, :18]).min(axis=1))
    assert len(list((tmp_path / "submission_overlays").glob("*.png"))) == 1


def _confidences(path) -> dict[str, np.ndarray]:
    """(cells, 19) confidences of each field of a submission CSV."""
    submission = pd.read_csv(path, dtype={"ID": str, "PredictionString": str})
    return {row.ID: np.array(row.PredictionString.split()[1::3], float).reshape(-1, 19)
            for row in submission.itertuples()}


def test_border_down_weight_scales_border_cells_confidences(test_fields, tmp_path):
    from src.utils.io import UserInputError

    layout, outputs = test_fields
    assert run(layout, outputs, tmp_path / "plain.csv") == 0
    assert run(layout, outputs, tmp_path / "weighted.csv", "--border-down-weight", "0.8") == 0
    plain, weighted = _confidences(tmp_path / "plain.csv"), _confidences(tmp_path / "weighted.csv")
    on_border = 0
    for image_id, confidences in plain.items():
        fractions = read_record(record_path(outputs.bboxes_dir, "test", image_id)).border_fractions
        on_border += int((fractions > 0).sum())
        assert np.allclose(weighted[image_id], confidences * (1 - 0.8 * fractions)[:, None], atol=2e-6)
    assert 0 < on_border < sum(len(c) for c in plain.values())  # some cells on the border, not all
    assert (tmp_path / "plain_cells.csv").read_bytes() == (tmp_path / "weighted_cells.csv").read_bytes()
    with pytest.raises(UserInputError, match="border-down-weight"):
        run(layout, outputs, tmp_path / "bad.csv", "--border-down-weight", "1.5")


def test_feature_model_is_averaged_with_the_cell_model(test_fields, tmp_path):
    from src.data.cache import load_full_resolution
    from src.features import cell_classifier
    from src.features.cell_features import N_FEATURES, record_features
    from src.utils.io import UserInputError

    layout, outputs = test_fields
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, N_FEATURES)).astype(np.float32)
    targets = np.zeros((60, 19), np.float32)
    targets[:, 4] = rng.uniform(size=60)
    model_path = tmp_path / "feature_model.joblib"
    classifier = cell_classifier.fit_cell_classifier(features, targets, max_iter=5)
    cell_classifier.save(classifier, model_path)
    assert run(layout, outputs, tmp_path / "plain.csv") == 0
    assert run(layout, outputs, tmp_path / "mixed.csv", "--feature-model", str(model_path), "--feature-weight", "0.25",
               "--image-context", "0.5") == 0
    columns = [str(c) for c in range(19)]
    plain = pd.read_csv(tmp_path / "plain_cells.csv", dtype={"ID": str})
    mixed = pd.read_csv(tmp_path / "mixed_cells.csv", dtype={"ID": str})
    # the same pass keeps the CNN's own prediction (the demo report's (d0)); a run without add-ons has no such file
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "mixed_cnn_cells.csv", dtype={"ID": str}), plain)
    assert not (tmp_path / "plain_cnn_cells.csv").exists()
    for image_id, rows in mixed.groupby("ID"):
        record = read_record(record_path(outputs.bboxes_dir, "test", image_id))
        field = load_full_resolution(layout, "test", image_id, record.image_shape)
        described = cell_classifier.predict_cell_classifier(classifier, record_features(field, record))
        expected = 0.75 * plain[plain["ID"] == image_id][columns].to_numpy() + 0.25 * described
        expected[:, 18] = (1 - expected[:, :18]).min(axis=1)  # from the cell's own prediction, before context
        expected[:, :18] = 0.5 * expected[:, :18] + 0.5 * expected[:, :18].max(axis=0)
        assert np.allclose(rows[columns].to_numpy(), expected, atol=2e-6)
    for flag in ("--feature-weight", "--image-context"):
        with pytest.raises(UserInputError, match="must be in"):
            run(layout, outputs, tmp_path / "bad.csv", "--feature-model", str(model_path), flag, "2")


def test_demo_report_reuses_the_pipelines_submission_only_with_the_same_settings(test_fields, tmp_path):
    """The pipeline's flags (fusion off) and the report's (no overlays, explicit checkpoint) predict the
    same, so the report copies the submission: equal to predicting again. Another weight, context or
    a retrained model file is not reused."""
    import os

    from src.evaluation.demo_report import reuse_submission
    from src.features import cell_classifier
    from src.features.cell_features import N_FEATURES

    layout, outputs = test_fields
    rng = np.random.default_rng(1)
    targets = np.zeros((40, 19), np.float32)
    targets[:, 2] = rng.uniform(size=40)
    model_path = tmp_path / "feature_model.joblib"
    cell_classifier.save(cell_classifier.fit_cell_classifier(rng.normal(size=(40, N_FEATURES)), targets, max_iter=5),
                         model_path)
    pipeline_csv = tmp_path / "submission.csv"
    add_ons = ["--feature-model", str(model_path), "--feature-weight", "0.5", "--image-context", "0.5"]
    assert run(layout, outputs, pipeline_csv, "--fusion-run", "cells", "--fusion-img-size", "64", "--fusion-weight", "0",
               *add_ons) == 0
    assert predict_submission.settings_path(pipeline_csv).is_file()
    report_argv = ["--dataset", str(layout.root), "--output-dir", str(outputs.root), "--folds", "0,1", "--overlays", "0",
                   "--run-name", "cells", "--img-size", "32", "--checkpoint", "best.pth"]
    copied = tmp_path / "demo" / "d.csv"
    copied.parent.mkdir()
    assert reuse_submission(report_argv + add_ons, pipeline_csv, copied)
    assert submission_main(report_argv + add_ons + ["--out", str(tmp_path / "again.csv")]) == 0
    for suffix in ("", "_cells", "_cnn_cells"):
        assert (tmp_path / f"demo/d{suffix}.csv").read_bytes() == (tmp_path / f"again{suffix}.csv").read_bytes()
    other = tmp_path / "other.csv"
    assert not reuse_submission(report_argv + add_ons[:3] + ["0.25", *add_ons[4:]], pipeline_csv, other)
    assert not reuse_submission(report_argv + add_ons[:5] + ["0"], pipeline_csv, other)
    checkpoint = outputs.model_dir("cells", 1) / "best.pth"
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a retrained fold model
    try:
        assert not reuse_submission(report_argv + add_ons, pipeline_csv, other)
    finally:
        os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert reuse_submission(report_argv + add_ons, pipeline_csv, other)
    predict_submission.settings_path(pipeline_csv).unlink()  # as an interrupted rerun leaves it
    assert not reuse_submission(report_argv + add_ons, pipeline_csv, tmp_path / "third.csv")
    assert not (tmp_path / "third.csv").exists()


def test_corrupt_field_is_reported_and_the_rest_written(test_fields, tmp_path):
    layout, outputs = test_fields
    tests = pd.read_csv(layout.test_csv, dtype={"ID": str})
    broken = tests["ID"].iloc[1]
    (layout.image_dir("test") / f"{broken}_red.png").write_bytes(b"\x89PNG broken")
    record = record_path(outputs.bboxes_dir, "test", broken)
    record.unlink()  # forces re-segmentation, which cannot read the field
    out = tmp_path / "s.csv"
    assert run(layout, outputs, out) == 1
    submission = pd.read_csv(out, dtype={"ID": str, "PredictionString": str}, keep_default_na=False)
    assert submission["ID"].tolist() == tests["ID"].tolist()
    assert submission.set_index("ID").loc[broken, "PredictionString"] == ""
    assert (submission.drop(index=1)["PredictionString"].str.len() > 0).all()
    assert broken in pd.read_csv(tmp_path / "s_failed.csv", dtype={"ID": str})["ID"].tolist()


def test_interrupted_run_leaves_the_previous_submission_whole(test_fields, tmp_path, monkeypatch):
    layout, outputs = test_fields
    out = tmp_path / "submission.csv"
    run(layout, outputs, out)
    before = {path.name: path.read_bytes() for path in tmp_path.glob("*.csv")}
    calls = []
    real_predict = predict_submission.ensemble_predict

    def dies_on_second_field(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill half-way through the test fields
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(predict_submission, "ensemble_predict", dies_on_second_field)
    with pytest.raises(KeyboardInterrupt):
        run(layout, outputs, out, "--negative", "product")
    assert {path.name: path.read_bytes() for path in tmp_path.glob("*.csv")} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(before)  # no temporary files left



def test_normalise_channels_equals_the_percentile_reference():
    from src.predict.cell_inputs import CROP_REFERENCE, normalise_channels

    def reference(image):  # the plain definition: np.percentile over the lit pixels, scale, round
        out = image.astype(np.float32)
        for channel in range(out.shape[2]):
            lit = out[..., channel][out[..., channel] > 0]
            if lit.size:
                out[..., channel] *= CROP_REFERENCE / max(float(np.percentile(lit, 99)), 1.0)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    rng = np.random.default_rng(3)
    for trial in range(300):
        height, width = rng.integers(1, 50, 2)
        image = (rng.integers(0, 256, (height, width, 4)) * (rng.random((height, width, 4)) < rng.random())).astype(np.uint8)
        if trial % 5 == 0:
            image = np.minimum(image, rng.integers(1, 20)).astype(np.uint8)  # dim crops: the scale > 1 side
        assert np.array_equal(normalise_channels(image), reference(image))
