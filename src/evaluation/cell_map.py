"""Cell-level mAP of a challenge submission against cell-level truth (the challenge's metric).

    python -m src.evaluation.cell_map --submission submission.csv --truth input/synthetic/truth [--split test]

Per class, predictions of all images are sorted by confidence; a prediction is a hit when its mask
matches a not-yet-matched true cell of that class in the same image at IoU >= 0.6 (the best such
cell), otherwise a false positive (so a duplicate of a matched cell counts as a miss). AP is the
area under the precision envelope over recall (the precision at each recall step is the highest
precision at that recall or beyond); mAP is the mean over the classes that have true cells.
`bootstrap_map_difference` gives the spread of the mAP difference of two submissions over resampled
images. Truth: a folder with masks/{ID}.png (uint16 labels) and cell_labels.csv (ID,split,cell_id,labels).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as coco_mask

from src.data.classes import CLASS_NAMES, NUM_CLASSES
from src.data.labels import parse_label_string
from src.evaluation.rle import label_mask_to_rles, mask_string_to_rle
from src.utils.io import UserInputError, run_cli, write_csv_atomic

IOU_THRESHOLD = 0.6


@dataclass
class TruthImage:
    height: int
    width: int
    cell_rles: list[dict]           # one per true cell
    cell_classes: list[set[int]]    # classes of each true cell


@dataclass
class Prediction:
    image_id: str
    cls: int
    confidence: float
    rle: dict


def average_precision(hits: np.ndarray, confidences: np.ndarray, n_true: int) -> float:
    """AP from per-prediction hit flags (any order) and the number of true instances."""
    if n_true == 0:
        return float("nan")
    if hits.size == 0:
        return 0.0
    order = np.argsort(-confidences, kind="stable")
    hits = hits[order].astype(np.float64)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, hits.size + 1)
    recall = true_positives / n_true
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * envelope))


def match_class(predictions: list[Prediction], truth: dict[str, TruthImage], cls: int) -> np.ndarray:
    """Hit flag per prediction of class `cls` (given in any order), greedy by confidence."""
    order = sorted(range(len(predictions)), key=lambda i: -predictions[i].confidence)
    hits = np.zeros(len(predictions), dtype=bool)
    matched: dict[str, set[int]] = {}
    for i in order:
        prediction = predictions[i]
        image = truth.get(prediction.image_id)
        if image is None:
            continue
        candidates = [j for j, classes in enumerate(image.cell_classes) if cls in classes]
        used = matched.setdefault(prediction.image_id, set())
        candidates = [j for j in candidates if j not in used]
        if not candidates:
            continue
        ious = coco_mask.iou([prediction.rle], [image.cell_rles[j] for j in candidates], [0] * len(candidates))[0]
        best = int(np.argmax(ious))
        if ious[best] >= IOU_THRESHOLD:
            hits[i] = True
            used.add(candidates[best])
    return hits


def class_hits(predictions: list[Prediction], truth: dict[str, TruthImage]) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Per class: (hit flags, confidences, image ids) of that class's predictions."""
    scored = []
    for cls in range(NUM_CLASSES):
        of_class = [p for p in predictions if p.cls == cls]
        scored.append((match_class(of_class, truth, cls), np.array([p.confidence for p in of_class], dtype=np.float64),
                       [p.image_id for p in of_class]))
    return scored


def cell_map(predictions: list[Prediction], truth: dict[str, TruthImage]) -> pd.DataFrame:
    """Per-class table: class, name, n_true, n_predictions, AP. mAP = mean AP over rows with n_true > 0."""
    rows = []
    for cls, (hits, confidences, _) in enumerate(class_hits(predictions, truth)):
        n_true = sum(cls in classes for image in truth.values() for classes in image.cell_classes)
        rows.append((cls, CLASS_NAMES[cls], n_true, hits.size, average_precision(hits, confidences, n_true)))
    return pd.DataFrame(rows, columns=["class", "name", "n_true", "n_predictions", "AP"])


def bootstrap_map_difference(baseline: list[Prediction], challenger: list[Prediction], truth: dict[str, TruthImage],
                             n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """mAP(challenger) - mAP(baseline) on `n_resamples` resamples (with replacement) of the truth's images.

    Matching never crosses images, so every prediction's hit flag is fixed and a resample only repeats
    or drops whole images; predictions on images outside `truth` are left out. Both submissions see
    the same resamples (a paired bootstrap); the mean runs over the classes present in each resample.
    """
    image_ids = sorted(truth)
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    true_per_image = np.zeros((len(image_ids), NUM_CLASSES))
    for k, image_id in enumerate(image_ids):
        for classes in truth[image_id].cell_classes:
            true_per_image[k, sorted(classes)] += 1

    def indexed(predictions: list[Prediction]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        kept = [p for p in predictions if p.image_id in position]
        return [(hits, confidences, np.array([position[i] for i in ids], dtype=np.int64))
                for hits, confidences, ids in class_hits(kept, truth)]

    scored = (indexed(baseline), indexed(challenger))
    rng = np.random.default_rng(seed)
    differences = np.empty(n_resamples)
    for r in range(n_resamples):
        repeats = rng.multinomial(len(image_ids), np.full(len(image_ids), 1 / len(image_ids)))
        n_true = repeats @ true_per_image
        maps = [np.mean([average_precision(np.repeat(hits, repeats[images]), np.repeat(confidences, repeats[images]),
                                           int(n_true[cls]))
                         for cls, (hits, confidences, images) in enumerate(per_class) if n_true[cls] > 0])
                for per_class in scored]
        differences[r] = maps[1] - maps[0]
    return differences


def mean_ap(table: pd.DataFrame) -> float:
    return float(table.loc[table["n_true"] > 0, "AP"].mean())


def parse_submission(table: pd.DataFrame) -> list[Prediction]:
    """Rows `ID,ImageWidth,ImageHeight,PredictionString` -> predictions."""
    missing = {"ID", "ImageWidth", "ImageHeight", "PredictionString"} - set(table.columns)
    if missing:
        raise UserInputError(f"submission lacks column(s) {sorted(missing)}")
    predictions = []
    for row in table.itertuples(index=False):
        parts = str(row.PredictionString).split() if isinstance(row.PredictionString, str) else []
        if len(parts) % 3:
            raise UserInputError(f"submission row {row.ID}: PredictionString is not 'class confidence mask' triples")
        for k in range(0, len(parts), 3):
            predictions.append(Prediction(row.ID, int(parts[k]), float(parts[k + 1]),
                                          mask_string_to_rle(parts[k + 2], row.ImageHeight, row.ImageWidth)))
    return predictions


def load_truth(truth_dir: str | Path, split: str | None = None, image_ids: set[str] | None = None) -> dict[str, TruthImage]:
    truth_dir = Path(truth_dir)
    table_path = truth_dir / "cell_labels.csv"
    if not table_path.is_file():
        raise UserInputError(f"{table_path} not found (truth folder needs masks/ and cell_labels.csv)")
    cells = pd.read_csv(table_path, dtype={"ID": str, "labels": str})
    if split is not None:
        cells = cells[cells["split"] == split]
    if image_ids is not None:
        cells = cells[cells["ID"].isin(image_ids)]
    truth = {}
    for image_id, group in cells.groupby("ID", sort=True):
        label_mask = cv2.imread(str(truth_dir / "masks" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        if label_mask is None:
            raise UserInputError(f"truth mask for {image_id} missing or unreadable")
        rles = label_mask_to_rles(label_mask)
        truth[image_id] = TruthImage(label_mask.shape[0], label_mask.shape[1],
                                     [rles[int(cell_id)] for cell_id in group["cell_id"]],
                                     [set(parse_label_string(s)) for s in group["labels"]])
    return truth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submission", required=True, help="challenge CSV: ID,ImageWidth,ImageHeight,PredictionString")
    parser.add_argument("--truth", required=True, help="truth folder (masks/{ID}.png, cell_labels.csv)")
    parser.add_argument("--split", default=None, help="only truth rows of this split (e.g. test)")
    parser.add_argument("--out", default=None, help="also write the per-class table to this CSV")
    args = parser.parse_args(argv)
    if not Path(args.submission).is_file():
        raise UserInputError(f"{args.submission} not found")
    submission = pd.read_csv(args.submission, dtype={"ID": str, "PredictionString": str})
    truth = load_truth(args.truth, args.split)
    table = cell_map(parse_submission(submission), truth)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"cell-level mAP over {int((table['n_true'] > 0).sum())} classes: {mean_ap(table):.4f}")
    if args.out:
        write_csv_atomic(table, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
