"""Score every stage of a pipeline run against cell-level truth; write `{output}/demo/report.md`.

    python -m src.evaluation.demo_report --dataset input/synthetic --output-dir output --folds 0,1,2

Held-out (test) split, from our own segmentation's cells: (a) the image labels broadcast to every
cell, (b) the image-level models applied per cell, (d) the cell-level models, (e) the cell-level
models fused with the image-level whole-field prediction (the pipeline's submission.csv).
Training split (the labels the cell-level model learns from): (a) the noisy image labels
broadcast, (b) the out-of-fold pseudo-labels, (c) the pseudo-labels with the denoising additions.
Also the margin (d) - (a) with a 95% interval from a paired bootstrap over the test images.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from src.data.bbox_records import list_record_ids, read_record, record_path
from src.data.classes import CLASS_INDEX, NEGATIVE, NUM_CLASSES
from src.data.labels import parse_label_string
from src.data.schema import DatasetLayout, OutputLayout, selection_csv
from src.evaluation.cell_map import (Prediction, bootstrap_map_difference, cell_map, load_truth, mean_ap,
                                     parse_submission)
from src.evaluation.rle import label_mask_to_rles
from src.predict import pseudo_label_store as store
from src.predict.predict_submission import main as submission_main
from src.predict.predict_submission import negative_probability
from src.utils.io import UserInputError, atomic_path, run_cli, setup_logging

log = logging.getLogger(__name__)
BOOTSTRAP_RESAMPLES = 1000
MITOTIC = "Mitotic spindle"  # the class the demo's denoising selection adds


def cell_predictions(outputs: OutputLayout, source: str, probabilities: dict[str, np.ndarray]) -> list[Prediction]:
    """Predictions for every class of every cell, masks from the bbox records."""
    predictions = []
    for image_id, per_cell in probabilities.items():
        record = read_record(record_path(outputs.bboxes_dir, source, image_id))
        rles = label_mask_to_rles(record.cell_mask)
        for cell_i, row in enumerate(per_cell):
            predictions += [Prediction(image_id, cls, float(p), rles[cell_i + 1]) for cls, p in enumerate(row) if p > 0]
    return predictions


def broadcast(outputs: OutputLayout, source: str, labels: dict[str, str]) -> dict[str, np.ndarray]:
    """Each image's labels as probability 1 on every one of its cells."""
    result = {}
    for image_id in list_record_ids(outputs.bboxes_dir / source):
        if image_id not in labels:
            continue
        n_cells = read_record(record_path(outputs.bboxes_dir, source, image_id), load_mask=False).n_cells
        row = np.zeros(NUM_CLASSES)
        row[parse_label_string(labels[image_id])] = 1.0
        result[image_id] = np.tile(row, (n_cells, 1))
    return result


def pseudo_label_probabilities(outputs: OutputLayout, selection: Path | None,
                               cls: int = CLASS_INDEX[MITOTIC]) -> tuple[dict, dict]:
    """Out-of-fold pseudo-labels per image, and the same with the selected cells set to 1 for `cls`."""
    with store.PseudoLabels(outputs.pseudo_labels_h5) as pseudo:
        plain = {image_id: pseudo.image(image_id, ("predictions",))["predictions"].astype(np.float64)
                 for image_id in pseudo.image_index}
    added = {image_id: rows.copy() for image_id, rows in plain.items()}
    if selection is not None and selection.is_file():
        chosen = pd.read_csv(selection, dtype={"ID": str})
        for image_id, cell_i in zip(chosen["ID"], chosen["cell_i"]):
            if image_id in added:
                added[image_id][int(cell_i), cls] = 1.0
    for table in (plain, added):
        for rows in table.values():
            rows[:, NEGATIVE] = negative_probability(rows)
    return plain, added


def score(predictions: list[Prediction], truth) -> tuple[float, pd.DataFrame]:
    table = cell_map(predictions, truth)
    return mean_ap(table), table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--image-run", default="image_level")
    parser.add_argument("--cell-run", default="cellwise")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--cell-size", type=int, default=512)
    args = parser.parse_args(argv)
    setup_logging()
    layout, outputs = DatasetLayout(args.dataset), OutputLayout(args.output_dir)
    if not layout.truth_cell_labels_csv.is_file():
        raise UserInputError(f"{layout.truth_cell_labels_csv} not found: the demo report needs cell-level truth")
    demo_dir = outputs.root / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    common = ["--dataset", str(layout.root), "--output-dir", str(outputs.root), "--folds", args.folds, "--overlays", "0"]
    image_level_csv, cellwise_csv = demo_dir / "b_image_level_per_cell.csv", demo_dir / "d_cellwise.csv"
    submission_main(common + ["--run-name", args.image_run, "--input-style", "image-level",
                              "--img-size", str(args.image_size), "--out", str(image_level_csv)])
    submission_main(common + ["--run-name", args.cell_run, "--img-size", str(args.cell_size), "--out", str(cellwise_csv)])

    test_truth = load_truth(layout.truth_dir, "test")
    train_truth = load_truth(layout.truth_dir, "train")
    clean = pd.read_csv(layout.truth_image_labels_csv, dtype={"ID": str, "Label": str})
    test_labels = dict(zip(clean.loc[clean["split"] == "test", "ID"], clean.loc[clean["split"] == "test", "Label"]))
    noisy = pd.read_csv(layout.train_csv, dtype={"ID": str, "Label": str})
    plain, added = pseudo_label_probabilities(outputs, selection_csv(MITOTIC, outputs.root))

    def submission(path: Path) -> list[Prediction]:
        return parse_submission(pd.read_csv(path, dtype={"ID": str, "PredictionString": str}, keep_default_na=False))

    broadcast_test = cell_predictions(outputs, "test", broadcast(outputs, "test", test_labels))
    cellwise_test = submission(cellwise_csv)
    broadcast_score, cellwise_score = score(broadcast_test, test_truth), score(cellwise_test, test_truth)
    rows = [
        ("(a) image labels broadcast to every cell", broadcast_score,
         score(cell_predictions(outputs, "train", broadcast(outputs, "train", dict(zip(noisy["ID"], noisy["Label"])))),
               train_truth)),
        ("(b) image-level model per cell (out of fold on train)",
         score(submission(image_level_csv), test_truth), score(cell_predictions(outputs, "train", plain), train_truth)),
        ("(c) pseudo-labels + denoising additions", None, score(cell_predictions(outputs, "train", added), train_truth)),
        ("(d) cell-level model", cellwise_score, None),
        ("(e) cell-level + image-level fusion", score(submission(outputs.root / "submission.csv"), test_truth), None),
    ]
    lines = ["| predictions | held-out test mAP | train split mAP |", "|---|---|---|"]
    for name, test_score, train_score in rows:
        cells = [f"{s[0]:.4f}" if s else "" for s in (test_score, train_score)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    per_class = pd.DataFrame({"class": rows[0][1][1]["class"], "name": rows[0][1][1]["name"],
                              "n_true_test": rows[0][1][1]["n_true"]})
    for name, test_score, _ in rows:
        if test_score:
            per_class[name[:3]] = test_score[1]["AP"].round(3)
    differences = bootstrap_map_difference(broadcast_test, cellwise_test, test_truth, BOOTSTRAP_RESAMPLES, seed=0)
    low, high = np.percentile(differences, [2.5, 97.5])
    margin = (f"(d) - (a) on the held-out split: {cellwise_score[0] - broadcast_score[0]:+.4f}; 95% interval over "
              f"{BOOTSTRAP_RESAMPLES} paired bootstrap resamples of the test images: [{low:+.4f}, {high:+.4f}]")
    table = "\n".join(lines)
    print(table)
    print(margin)
    figures = sorted(outputs.root.rglob("*.png"))
    report = [
        "# Demo report", "",
        "Cell-level mAP (the challenge metric: mask IoU >= 0.6, mean over classes present) of each stage's",
        "predictions. Cells and masks come from our segmentation; truth from the synthetic generator.", "",
        table, "", margin + ".", "", "## Per class, held-out test split (AP)", "",
        "```", per_class.to_string(index=False), "```",
        "", "## Figures", ""] + [f"- [{p.relative_to(outputs.root)}](../{p.relative_to(outputs.root)})" for p in figures[:40]]
    with atomic_path(demo_dir / "report.md") as tmp:
        tmp.write_text("\n".join(report) + "\n")
    log.info("wrote %s", demo_dir / "report.md")
    return 0


if __name__ == "__main__":
    run_cli(main)
