"""Choose the image-level x cell-level fusion weight of each class on out-of-fold training predictions.

    python -m src.predict.choose_fusion --dataset input/synthetic --output-dir output --cell-run cellwise \
        --image-run image_level --folds 0,1,2 --img-size 64 --fusion-img-size 128

Every training image is predicted by the fold models that held it out (folds.csv): each of its cells by
the cell-level model, the whole field by the image-level model. Only the image labels are used, as a
user has no cell-level labels: for each class c and each weight w of the grid, the image's score is the
maximum over its cells of the fused confidence (1 - w) * cell + w * image, and the weight is scored by
the average precision of that score against the image labels of c. The image-level term is the same
for every cell of an image, so fusion only moves images against each other; the image-level AP measures
exactly that. A class keeps w = 0 (no fusion) unless a weight beats it by at least --min-gain AP.
Negative is not fused: it is recomputed from the fused classes, as in the submission.
Writes `{output}/fusion_weights.csv` (class,name,weight,ap_cell,ap_fused; the APs are image-level),
read by `predict_submission --fusion-weights`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src.data.bbox_records import list_record_ids, read_record, record_path
from src.data.cache import load_field
from src.data.classes import CLASS_NAMES, NEGATIVE, NUM_CLASSES
from src.data.labels import labels_to_multihot, read_label_table
from src.data.schema import FUSION_COLUMNS, DatasetLayout, OutputLayout
from src.evaluation.cell_map import average_precision
from src.predict.cell_inputs import EXTRA_TTA_VIEWS, TTA_VIEWS
from src.predict.predict_submission import cell_model_inputs, ensemble_predict, load_ensemble
from src.train.datasets import read_folds
from src.utils.io import UserInputError, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)
WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)


def per_image_max(cell_values: np.ndarray, image_of: np.ndarray, n_images: int) -> np.ndarray:
    """(n_images, classes): the maximum of `cell_values` (N, classes) over the cells of each image."""
    out = np.full((n_images, cell_values.shape[1]), -np.inf)
    np.maximum.at(out, image_of, cell_values)
    return out


def choose_weights(cell_probabilities: np.ndarray, image_probabilities: np.ndarray, image_of: np.ndarray,
                   image_labels: np.ndarray, grid: tuple[float, ...] = WEIGHT_GRID, min_gain: float = 0.01) -> pd.DataFrame:
    """Per class, the grid weight of the image-level prediction with the best image-level AP (0 unless it gains `min_gain`).

    cell_probabilities, image_probabilities : (N, classes) out-of-fold predictions of N cells (the image's
        prediction repeated on each of its cells); image_of : (N,) index of each cell's image;
    image_labels : (n_images, classes) bool, the image labels.
    """
    n_true = image_labels.sum(axis=0)
    # the image-level term is the same on every cell of an image, so the maximum of the fused
    # confidences is the fusion of the maxima
    cell_max = per_image_max(cell_probabilities, image_of, len(image_labels))
    image_max = per_image_max(image_probabilities, image_of, len(image_labels))
    rows = []
    for cls in range(NUM_CLASSES):
        if cls == NEGATIVE or n_true[cls] == 0:
            rows.append((cls, CLASS_NAMES[cls], 0.0, np.nan, np.nan))
            continue
        scores = [average_precision(image_labels[:, cls], (1 - w) * cell_max[:, cls] + w * image_max[:, cls], int(n_true[cls]))
                  for w in grid]
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="as predict_submission: CUDA when present")
    parser.add_argument("--out", default=None, help="default: {output}/fusion_weights.csv")
    args = parser.parse_args(argv)
    setup_logging()
    layout, outputs = DatasetLayout(args.dataset), OutputLayout(args.output_dir)
    args.folds = [int(f) for f in args.folds.split(",")]
    out = Path(args.out) if args.out else outputs.fusion_weights_csv
    ids, cell_rows, image_rows = out_of_fold_predictions(layout, outputs, args)
    if not ids:
        raise UserInputError(f"no training image of folds {args.folds} has cells in {outputs.bboxes_dir / 'train'}")
    labels = read_label_table(layout.train_csv, "train").set_index("ID")["Label"]
    image_labels = labels_to_multihot([labels[image_id] for image_id in ids]).astype(bool)
    image_of = np.repeat(np.arange(len(ids)), [len(rows) for rows in cell_rows])
    table = choose_weights(np.concatenate(cell_rows), np.concatenate(image_rows), image_of, image_labels,
                           min_gain=args.min_gain)
    write_csv_atomic(table, out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    log.info("fusion weights from %d out-of-fold training images -> %s", len(ids), out)
    return 0


if __name__ == "__main__":
    run_cli(main)
