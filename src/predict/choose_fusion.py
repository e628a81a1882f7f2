"""Choose the image-level x cell-level fusion weight of each class on out-of-fold training predictions.

    python -m src.predict.choose_fusion --dataset input/synthetic --output-dir output --cell-run cellwise \
        --image-run image_level --folds 0,1,2 --img-size 64 --fusion-img-size 128

Every training image is predicted by the fold models that held it out (folds.csv): each of its cells by
the cell-level model, the whole field by the image-level model. For each class c and each weight w of
the grid, the fused confidence (1 - w) * cell + w * image is scored by the challenge's average
precision against the cell-level truth of the training split (segmented cells matched to true cells
at IoU >= 0.6). A class keeps w = 0 (no fusion) unless a weight beats it by at least --min-gain AP.
Negative is not fused: it is recomputed from the fused classes, as in the submission.
Without cell-level truth for the training images there is nothing to choose on: every weight is 0.
Writes `{output}/fusion_weights.csv` (class,name,weight,ap_cell,ap_fused), read by
`predict_submission --fusion-weights`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from src.data.bbox_records import list_record_ids, read_record, record_path
from src.data.cache import load_field
from src.data.classes import CLASS_NAMES, NEGATIVE, NUM_CLASSES
from src.data.labels import parse_label_string
from src.data.schema import DatasetLayout, OutputLayout
from src.evaluation.cell_map import IOU_THRESHOLD, average_precision
from src.predict.cell_inputs import EXTRA_TTA_VIEWS, TTA_VIEWS
from src.predict.predict_submission import FUSION_COLUMNS, cell_model_inputs, ensemble_predict, load_ensemble
from src.train.datasets import read_folds
from src.utils.io import UserInputError, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)
WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)


def match_truth(cell_mask: np.ndarray, truth_mask: np.ndarray, truth_classes: dict[int, set[int]]) -> np.ndarray:
    """(n_cells, classes) bool: the classes of the true cell each segmented cell matches at IoU >= 0.6.

    Segmented cells do not overlap, nor do true cells, so a match is unique and does not depend on the
    order of the predictions: the hit flags of the challenge's greedy matching are fixed per cell."""
    n_cells, n_true = int(cell_mask.max()), int(truth_mask.max())
    pairs = np.bincount(cell_mask.astype(np.int64).ravel() * (n_true + 1) + truth_mask.ravel(),
                        minlength=(n_cells + 1) * (n_true + 1)).reshape(n_cells + 1, n_true + 1)
    areas_cell, areas_true = pairs.sum(axis=1), pairs.sum(axis=0)
    hits = np.zeros((n_cells, NUM_CLASSES), bool)
    for cell in range(1, n_cells + 1):
        overlap = pairs[cell, 1:]
        if not overlap.any():
            continue
        true_cell = int(np.argmax(overlap)) + 1
        iou = overlap[true_cell - 1] / (areas_cell[cell] + areas_true[true_cell] - overlap[true_cell - 1])
        if iou >= IOU_THRESHOLD:
            hits[cell - 1, sorted(truth_classes.get(true_cell, ()))] = True
    return hits


def choose_weights(cell_probabilities: np.ndarray, image_probabilities: np.ndarray, hits: np.ndarray,
                   n_true: np.ndarray, grid: tuple[float, ...] = WEIGHT_GRID, min_gain: float = 0.01) -> pd.DataFrame:
    """Per class, the grid weight of the image-level prediction with the best AP (0 unless it gains `min_gain`).

    cell_probabilities, image_probabilities : (N, classes) out-of-fold predictions of N cells (the image's
        prediction repeated on each of its cells); hits : (N, classes) bool, the cell matches a true cell
        of the class; n_true : (classes,) true cells per class (unmatched ones included).
    """
    rows = []
    for cls in range(NUM_CLASSES):
        if cls == NEGATIVE or n_true[cls] == 0:
            rows.append((cls, CLASS_NAMES[cls], 0.0, np.nan, np.nan))
            continue
        scores = [average_precision(hits[:, cls], (1 - w) * cell_probabilities[:, cls] + w * image_probabilities[:, cls],
                                    int(n_true[cls])) for w in grid]
        best = int(np.argmax(scores))
        weight = grid[best] if scores[best] >= scores[grid.index(0.0)] + min_gain else 0.0
        rows.append((cls, CLASS_NAMES[cls], weight, scores[grid.index(0.0)], scores[grid.index(weight)]))
    return pd.DataFrame(rows, columns=list(FUSION_COLUMNS))


def out_of_fold_predictions(layout: DatasetLayout, outputs: OutputLayout, args) -> tuple[list[str], list, list]:
    """Image IDs with their cells' cell-level and whole-field image-level out-of-fold predictions."""
    folds = read_folds(layout)
    fold_of = dict(zip(folds["ID"], folds["fold"].astype(int)))
    views = tuple(v.strip() for v in args.tta.split(",") if v.strip())
    if not views or set(views) - set(TTA_VIEWS + EXTRA_TTA_VIEWS):
        raise UserInputError(f"--tta must name views among {TTA_VIEWS + EXTRA_TTA_VIEWS}")
    ids, cell_rows, image_rows = [], [], []
    for fold in args.folds:
        cell_model = load_ensemble(outputs, args.cell_run, [fold], args.checkpoint, args.device)
        image_model = load_ensemble(outputs, args.image_run, [fold], args.checkpoint, args.device)
        for image_id in list_record_ids(outputs.bboxes_dir / "train"):
            if fold_of.get(image_id) != fold:
                continue
            record = read_record(record_path(outputs.bboxes_dir, "train", image_id))
            if record.n_cells == 0:
                continue
            inputs = cell_model_inputs(layout, image_id, record, "cellwise", args.img_size, source="train")
            whole = load_field(layout, "train", image_id, args.fusion_img_size).transpose(2, 0, 1)[None]
            ids.append(image_id)
            cell_rows.append(ensemble_predict(cell_model, inputs, views, args.batch_size, args.device))
            image_rows.append(np.repeat(ensemble_predict(image_model, np.ascontiguousarray(whole), ("identity",), 1,
                                                         args.device), record.n_cells, axis=0))
    return ids, cell_rows, image_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--cell-run", required=True)
    parser.add_argument("--image-run", required=True)
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--checkpoint", default="best.pth")
    parser.add_argument("--img-size", type=int, default=512, help="cell model input side")
    parser.add_argument("--fusion-img-size", type=int, default=1024, help="image-level model input side")
    parser.add_argument("--tta", default=",".join(TTA_VIEWS + EXTRA_TTA_VIEWS), help="cell-level views, as in the submission")
    parser.add_argument("--min-gain", type=float, default=0.01, help="AP a weight must add over no fusion")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="default: {output}/fusion_weights.csv")
    args = parser.parse_args(argv)
    setup_logging()
    layout, outputs = DatasetLayout(args.dataset), OutputLayout(args.output_dir)
    args.folds = [int(f) for f in args.folds.split(",")]
    out = Path(args.out) if args.out else outputs.root / "fusion_weights.csv"
    truth = pd.read_csv(layout.truth_cell_labels_csv, dtype={"ID": str, "labels": str}) \
        if layout.truth_cell_labels_csv.is_file() else pd.DataFrame(columns=["ID", "split", "cell_id", "labels"])
    truth = truth[truth["split"] == "train"]
    if truth.empty:
        log.warning("no cell-level truth for the training split in %s: fusion off", layout.truth_dir)
        table = choose_weights(np.zeros((0, NUM_CLASSES)), np.zeros((0, NUM_CLASSES)), np.zeros((0, NUM_CLASSES), bool),
                               np.zeros(NUM_CLASSES, int))
        write_csv_atomic(table, out)
        return 0
    ids, cell_rows, image_rows = out_of_fold_predictions(layout, outputs, args)
    classes_of = {image_id: {int(c): set(parse_label_string(s)) for c, s in zip(group["cell_id"], group["labels"])}
                  for image_id, group in truth.groupby("ID")}
    hits = []
    for image_id in ids:
        truth_mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        hits.append(match_truth(read_record(record_path(outputs.bboxes_dir, "train", image_id)).cell_mask,
                                truth_mask, classes_of.get(image_id, {})))
    n_true = np.zeros(NUM_CLASSES, int)
    for image_id in ids:
        for classes in classes_of.get(image_id, {}).values():
            n_true[sorted(classes)] += 1
    table = choose_weights(np.concatenate(cell_rows), np.concatenate(image_rows), np.concatenate(hits), n_true,
                           min_gain=args.min_gain)
    write_csv_atomic(table, out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    log.info("fusion weights from %d out-of-fold training images -> %s", len(ids), out)
    return 0


if __name__ == "__main__":
    run_cli(main)
