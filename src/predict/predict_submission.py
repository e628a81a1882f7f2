"""Predict every cell of the test fields and write the challenge submission.

    python -m src.predict.predict_submission --dataset input/synthetic --run-name cellwise_run \
        --img-size 512 [--fusion-run imagelevel_run --fusion-img-size 1024 --fusion-weight 0.3]

Fields without bbox records are segmented first. Each cell is predicted by the fold ensemble under
the TTA views (default identity, flips, rot90, scale_shift), its neighbours masked out. With
`--input-style image-level` the models are image-level ones and cells are shown tiled at field
scale (as for pseudo-labels). Negative = min over classes of (1 - P_c) (`--negative product` for
the product). `--fusion-run` averages in the image-level ensemble's whole-field prediction, with one weight
(`--fusion-weight`) or a weight per class chosen by `src.predict.choose_fusion` (`--fusion-weights`).
`--feature-model M` averages in the cell feature model of `src.train.train_cell_features` (weight
`--feature-weight`); `--image-context W` mixes each cell's pattern-class probabilities with their maximum
over its field's cells (weight W), last, so Negative comes from the cell's own prediction.
`--border-down-weight S` multiplies each cell's confidences in submission.csv by 1 - S x its border
fraction (the share of its outline on the field border, from the bbox record), so cells cut by the
border rank lower; submission_cells.csv keeps the model's probabilities.
Writes `submission.csv` (ID,ImageWidth,ImageHeight,PredictionString of `class confidence mask`
triples), `submission_cells.csv` (ID,cell_i,19 probabilities) and `submission_overlays/*.png`; a
field that cannot be read is listed in `submission_failed.csv` and gets an empty prediction string.
`submission_settings.json`, written last, records what the predictions depend on (`prediction_settings`).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from src.data.bbox_records import border_weights, masked_crop, read_record, record_path
from src.data.cache import load_field, load_full_resolution
from src.data.classes import CLASS_NAMES, NEGATIVE, NUM_CLASSES
from src.data.images import ImageReadError
from src.data.labels import read_test_table
from src.data.schema import FUSION_COLUMNS, DatasetLayout, OutputLayout
from src.evaluation.rle import encode_mask
from src.features import cell_classifier
from src.features.cell_features import record_features
from src.predict.cell_inputs import EXTRA_TTA_VIEWS, TTA_VIEWS, cell_inputs, cellwise_input, predict_views
from src.preprocessing.generate_cell_bboxes import generate
from src.segmentation.overlay import overlay
from src.train.models import load_model_checkpoint
from src.utils.io import UserInputError, atomic_path, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)


def negative_probability(probabilities: np.ndarray, rule: str = "min") -> np.ndarray:
    """P(Negative) from the 18 pattern classes: min_c (1 - P_c), or prod_c (1 - P_c)."""
    patterns = np.delete(probabilities, NEGATIVE, axis=1)
    return (1 - patterns).min(axis=1) if rule == "min" else np.prod(1 - patterns, axis=1)


def with_image_context(probabilities: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) x each cell's pattern-class probabilities + weight x their maximum over the field's cells.

    The field's best cell for a class says whether the field shows it at all, as its image label
    does; a cell whose own evidence is faint (a dim dot) borrows it. The maximum, not the mean: the
    mean also counts how many cells show the class, so the positive cells of a field where few do
    sank below the negative ones of a field where most do (mean vs max, style 1 (tuning): 0.8943 ->
    0.9188; style 2, not used to choose: 0.6125 -> 0.6528; README). Negative is left as it is: the
    cell's own."""
    mixed = probabilities.copy()
    if len(probabilities) and weight:
        patterns = np.arange(probabilities.shape[1]) != NEGATIVE
        field = probabilities[:, patterns].max(axis=0, keepdims=True)
        mixed[:, patterns] = (1 - weight) * probabilities[:, patterns] + weight * field
    return mixed


def prediction_string(cell_mask: np.ndarray, probabilities: np.ndarray) -> str:
    """`class confidence mask` triples for every cell (labels 1..n of cell_mask) and class."""
    triples = []
    for cell_i in range(probabilities.shape[0]):
        mask_text = encode_mask(cell_mask == cell_i + 1)
        triples += [f"{cls} {probabilities[cell_i, cls]:.6f} {mask_text}" for cls in range(NUM_CLASSES)]
    return " ".join(triples)


def read_fusion_weights(path: str | Path) -> np.ndarray:
    """(classes,) weights from a fusion_weights.csv."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} not found (run src.predict.choose_fusion)")
    table = pd.read_csv(path)
    if set(FUSION_COLUMNS) - set(table.columns) or sorted(table["class"]) != list(range(NUM_CLASSES)):
        raise UserInputError(f"{path}: expected columns {','.join(FUSION_COLUMNS)} and one row per class")
    weights = table.sort_values("class")["weight"].to_numpy(np.float64)
    if not ((weights >= 0) & (weights <= 1)).all():
        raise UserInputError(f"{path}: weights must be in [0, 1]")
    return weights


def load_ensemble(outputs: OutputLayout, run_name: str, folds: list[int], checkpoint: str, device) -> list:
    models = []
    for fold in folds:
        path = outputs.model_dir(run_name, fold) / checkpoint
        if not path.is_file():
            raise UserInputError(f"{path} not found (fold {fold} model of run {run_name})")
        models.append(load_model_checkpoint(path, device))
    return models


def ensemble_predict(models: list, inputs: np.ndarray, views: tuple[str, ...], batch_size: int, device) -> np.ndarray:
    """Mean sigmoid over models and views of (n, C, S, S) uint8 inputs -> (n, classes)."""
    total = np.zeros((len(inputs), NUM_CLASSES), np.float64)
    for model in models:
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(inputs[start:start + batch_size]).to(device)
            total[start:start + batch_size] += predict_views(model, batch, views)[0].cpu().numpy()
    return total / max(len(models), 1)


def cell_model_inputs(layout: DatasetLayout, image_id: str, record, style: str, img_size: int,
                      source: str = "test", field: np.ndarray | None = None) -> np.ndarray:
    """(n, C, S, S) inputs of a record's cells; `field`: the full-resolution field when already loaded."""
    if style == "image-level":
        return cell_inputs(load_field(layout, source, image_id, img_size), record, img_size)
    if field is None:
        field = load_full_resolution(layout, source, image_id, record.image_shape)
    return np.stack([cellwise_input(masked_crop(field, record, i), img_size).transpose(2, 0, 1)
                     for i in range(record.n_cells)]) if record.n_cells else np.zeros((0, 4, img_size, img_size), np.uint8)


def draw_overlay(field: np.ndarray, cell_mask: np.ndarray, probabilities: np.ndarray, path: Path) -> None:
    """Cell outlines with each cell's top class and confidence at its centre."""
    picture = overlay(field, cell_mask)
    for cell_i in range(probabilities.shape[0]):
        ys, xs = np.nonzero(cell_mask == cell_i + 1)
        if ys.size == 0:
            continue
        cls = int(np.argmax(probabilities[cell_i]))
        text = f"{CLASS_NAMES[cls][:14]} {probabilities[cell_i, cls]:.2f}"
        scale = max(picture.shape[0] / 1200, 0.3)
        cv2.putText(picture, text, (int(xs.mean()) - 20, int(ys.mean())), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), max(1, round(scale * 2)), cv2.LINE_AA)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), picture[..., ::-1])


def test_table(layout: DatasetLayout) -> pd.DataFrame:
    if layout.test_csv.exists():
        return read_test_table(layout.test_csv)  # NaN sizes when the table has none: taken from the records
    ids = sorted({p.name.rsplit("_", 1)[0] for p in layout.image_dir("test").glob("*_blue.*")})
    if not ids:
        raise UserInputError(f"no test.csv and no *_blue.* files in {layout.image_dir('test')}")
    return pd.DataFrame({"ID": ids, "ImageWidth": np.nan, "ImageHeight": np.nan})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset with test.csv and test/")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--run-name", required=True, help="models under {output}/models/{run-name}/fold{K}")
    parser.add_argument("--input-style", choices=("cellwise", "image-level"), default="cellwise")
    parser.add_argument("--folds", default="0,1,2,3,4", help="comma-separated folds of the ensemble")
    parser.add_argument("--checkpoint", default="best.pth")
    parser.add_argument("--img-size", type=int, default=512, help="cell model input side (px)")
    parser.add_argument("--tta", default=",".join(TTA_VIEWS + EXTRA_TTA_VIEWS))
    parser.add_argument("--negative", choices=("min", "product"), default="min")
    parser.add_argument("--fusion-run", default=None, help="image-level run whose whole-field prediction is fused")
    parser.add_argument("--fusion-img-size", type=int, default=1024)
    parser.add_argument("--fusion-weight", type=float, default=0.0, help="weight of the image-level prediction")
    parser.add_argument("--border-down-weight", type=float, default=0.0,
                        help="confidences x (1 - this x the cell's border fraction) in submission.csv (0: off)")
    parser.add_argument("--fusion-weights", default=None, help="fusion_weights.csv: a weight per class (overrides --fusion-weight)")
    parser.add_argument("--feature-model", default=None,
                        help="feature_model.joblib of src.train.train_cell_features, averaged with the cell model")
    parser.add_argument("--feature-weight", type=float, default=0.5,
                        help="weight of the feature model's probabilities (with --feature-model)")
    parser.add_argument("--image-context", type=float, default=0.0,
                        help="weight of the field's highest cell prediction (per class) mixed into each cell's (0: off)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--overlays", type=int, default=4, help="overlay PNGs for the first N fields")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="submission CSV (default: {output}/submission.csv)")
    return parser


# Flags that change no prediction: left out of a submission's settings.
NOT_SETTINGS = ("out", "overlays", "batch_size", "device")


def _file_stamp(path: Path) -> list:
    stat = path.stat() if path.is_file() else None
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns] if stat else [str(path), None, None]


def prediction_settings(args: argparse.Namespace) -> dict:
    """What a submission's cell probabilities depend on: the flags that change them (paths resolved;
    fusion's flags only when fusion is on) and the size and time of every model file read. Two runs
    with equal settings over the same bbox records predict the same (demo_report reuses a submission)."""
    settings = {key: value for key, value in sorted(vars(args).items()) if key not in NOT_SETTINGS}
    outputs = OutputLayout(args.output_dir)
    folds = [int(f) for f in str(args.folds).split(",")]
    settings["dataset"], settings["output_dir"] = str(Path(args.dataset).resolve()), str(outputs.root.resolve())
    settings["models"] = [_file_stamp(outputs.model_dir(args.run_name, fold) / args.checkpoint) for fold in folds]
    fused = args.fusion_weights is not None or args.fusion_weight > 0
    for key in ("fusion_run", "fusion_img_size", "fusion_weight", "fusion_weights"):
        settings.pop(key)
    if fused:
        settings["fusion"] = [args.fusion_run, args.fusion_img_size, args.fusion_weight] + (
            [_file_stamp(Path(args.fusion_weights))] if args.fusion_weights else []) + [
            _file_stamp(outputs.model_dir(args.fusion_run, fold) / args.checkpoint) for fold in folds]
    settings["feature_model"] = _file_stamp(Path(args.feature_model)) if args.feature_model else None
    if not args.feature_model:
        settings.pop("feature_weight")
    return settings


def settings_path(submission_csv: Path) -> Path:
    return submission_csv.with_name(submission_csv.stem + "_settings.json")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    layout, outputs = DatasetLayout(args.dataset), OutputLayout(args.output_dir)
    views = tuple(v.strip() for v in args.tta.split(",") if v.strip())
    if not views or set(views) - set(TTA_VIEWS + EXTRA_TTA_VIEWS):
        raise UserInputError(f"--tta must name views among {TTA_VIEWS + EXTRA_TTA_VIEWS}")
    fusion_weights = read_fusion_weights(args.fusion_weights) if args.fusion_weights else np.full(NUM_CLASSES, args.fusion_weight)
    if not 0 <= args.fusion_weight <= 1 or (fusion_weights.any() and not args.fusion_run):
        raise UserInputError("--fusion-weight must be in [0, 1] and fusion needs --fusion-run")
    if not 0 <= args.border_down_weight <= 1:
        raise UserInputError("--border-down-weight must be in [0, 1]")
    if not 0 <= args.feature_weight <= 1 or not 0 <= args.image_context <= 1:
        raise UserInputError("--feature-weight and --image-context must be in [0, 1]")
    feature_model = cell_classifier.load(args.feature_model) if args.feature_model else None
    out = Path(args.out) if args.out else outputs.root / "submission.csv"
    settings_path(out).unlink(missing_ok=True)  # until this run's files are all written
    device = torch.device(args.device)
    folds = [int(f) for f in args.folds.split(",")]
    models = load_ensemble(outputs, args.run_name, folds, args.checkpoint, device)
    fusion_models = load_ensemble(outputs, args.fusion_run, folds, args.checkpoint, device) if fusion_weights.any() else []
    tests = test_table(layout)
    records_dir = outputs.bboxes_dir / "test"
    missing = [i for i in tests["ID"] if not record_path(outputs.bboxes_dir, "test", i).is_file()]
    failed: dict[str, str] = {}
    if missing:
        log.info("segmenting %d test fields without bbox records", len(missing))
        failures, _, _ = generate(layout, records_dir, "test", dict(backend="classical", work_size=512))
        failed.update(dict(failures))
    rows, cell_rows, cnn_rows = [], [], []
    for index, test in enumerate(tqdm(tests.itertuples(index=False), total=len(tests), desc="test fields")):
        image_id = test.ID
        width, height = test.ImageWidth, test.ImageHeight
        if image_id in failed:  # segmentation could not read it
            rows.append((image_id, width, height, ""))
            continue
        try:
            record = read_record(record_path(outputs.bboxes_dir, "test", image_id))
            height, width = record.image_shape
            field = (load_full_resolution(layout, "test", image_id, record.image_shape)  # read once: crops, descriptors
                     if args.input_style == "cellwise" or feature_model is not None else None)
            probabilities = ensemble_predict(models, cell_model_inputs(layout, image_id, record, args.input_style,
                                                                       args.img_size, field=field),
                                             views, args.batch_size, device)
            cnn_alone = probabilities.copy()
            cnn_alone[:, NEGATIVE] = negative_probability(cnn_alone, args.negative)
            if feature_model is not None and record.n_cells:
                described = cell_classifier.predict_cell_classifier(feature_model, record_features(np.asarray(field), record))
                probabilities = (1 - args.feature_weight) * probabilities + args.feature_weight * described
            if fusion_models and record.n_cells:
                whole = load_field(layout, "test", image_id, args.fusion_img_size).transpose(2, 0, 1)[None]
                image_level = ensemble_predict(fusion_models, np.ascontiguousarray(whole), ("identity",), 1, device)
                probabilities = (1 - fusion_weights) * probabilities + fusion_weights * image_level
            probabilities[:, NEGATIVE] = negative_probability(probabilities, args.negative)
            # after Negative: a cell with no pattern of its own stays Negative in a field of stained cells
            probabilities = with_image_context(probabilities, args.image_context)
        except (ImageReadError, FileNotFoundError, ValueError) as error:
            log.warning("skipped %s: %s", image_id, error)
            failed[image_id] = str(error)
            rows.append((image_id, width, height, ""))
            continue
        confidences = probabilities * border_weights(record.border_fractions, args.border_down_weight)[:, None]
        rows.append((image_id, width, height, prediction_string(record.cell_mask, confidences)))
        cell_rows += [(image_id, cell_i, *probabilities[cell_i]) for cell_i in range(record.n_cells)]
        cnn_rows += [(image_id, cell_i, *cnn_alone[cell_i]) for cell_i in range(record.n_cells)]
        if index < args.overlays:
            draw_overlay(load_full_resolution(layout, "test", image_id, record.image_shape) if field is None else field,
                         record.cell_mask, probabilities,
                         out.parent / f"{out.stem}_overlays" / f"{image_id}.png")
    write_csv_atomic(pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"]), out)
    cell_columns = ["ID", "cell_i", *[str(c) for c in range(NUM_CLASSES)]]
    write_csv_atomic(pd.DataFrame(cell_rows, columns=cell_columns), out.with_name(out.stem + "_cells.csv"))
    if feature_model is not None or fusion_models or args.image_context > 0:  # what the add-ons changed
        write_csv_atomic(pd.DataFrame(cnn_rows, columns=cell_columns), out.with_name(out.stem + "_cnn_cells.csv"))
    if not failed:
        with atomic_path(settings_path(out)) as tmp:  # written last: its presence vouches for the files above
            tmp.write_text(json.dumps(prediction_settings(args), indent=1) + "\n")
    else:
        write_csv_atomic(pd.DataFrame(sorted(failed.items()), columns=["ID", "error"]),
                         out.with_name(out.stem + "_failed.csv"))
        log.error("%d fields could not be predicted; see %s", len(failed), out.with_name(out.stem + "_failed.csv"))
    log.info("wrote %s (%d fields, %d cells)", out, len(rows), len(cell_rows))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
