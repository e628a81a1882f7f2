"""Score every stage of pipeline runs against cell-level truth; write `{report-dir}/report.md` and a figure.

    python -m src.evaluation.demo_report --dataset input/synthetic --output-dir output --folds 0,1,2
    python -m src.evaluation.demo_report --run "style 1" input/synthetic output \
        --run "style 2" input/synthetic_style2 output/style2 --report-dir output/demo

One section per run (a synthetic style, with the pipeline's outputs). Held-out (test) split, from our
own segmentation's cells: (a) the image labels broadcast to every cell, (b) the image-level models
applied per cell (identity view only, for time), (d) the cell-level models (the CNN averaged with
the cell feature model when `models/cell_features/feature_model.joblib` exists, then mixed with the
field's highest cell by --image-context; (d0) the CNN alone), (e) (d) fused with the image-level whole-field
prediction (the pipeline's submission.csv; weights from fusion_weights.csv when chosen).
Training split (the labels the cell-level model learns from): (a) the noisy image labels
broadcast, (b) the out-of-fold pseudo-labels, (c) the pseudo-labels with the denoising additions.
Also (d) / (a), the classes where (d) is more than 0.05 AP below (a), and (d) - (a) with a 95%
interval from a paired bootstrap over the test images. `per_class_ap.png`: per-class test AP bars.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from src.data.bbox_records import list_record_ids, read_record, record_path
from src.data.classes import CLASS_INDEX, NEGATIVE, NUM_CLASSES
from src.data.labels import parse_label_string
from src.data.schema import DatasetLayout, OutputLayout, selection_csv
from src.evaluation.cell_map import (Prediction, bootstrap_map_difference, cell_map, load_truth, mean_ap,
                                     parse_submission)
from src.evaluation.demo_figure import plot_per_class_ap
from src.evaluation.rle import label_mask_to_rles
from src.predict import pseudo_label_store as store
from src.predict.predict_submission import build_parser as build_submission_parser
from src.predict.predict_submission import main as submission_main
from src.predict.predict_submission import negative_probability, prediction_settings, settings_path
from src.utils.io import UserInputError, atomic_path, run_cli, setup_logging

log = logging.getLogger(__name__)
BOOTSTRAP_RESAMPLES = 1000
MITOTIC = "Mitotic spindle"  # the class the demo's denoising selection adds
CLASS_MARGIN = 0.05  # the target: no class more than this AP below the broadcast baseline
ROW_NAMES = {"a": "(a) image labels broadcast to every cell", "b": "(b) image-level model per cell (out of fold on train)",
             "c": "(c) pseudo-labels + denoising additions", "d0": "(d0) cell-level CNN alone",
             "d": "(d) cell-level model",
             "e": "(e) cell-level + image-level fusion"}


def cell_predictions(outputs: OutputLayout, source: str, probabilities: dict[str, np.ndarray]) -> list[Prediction]:
    """Predictions for every class of every cell, masks from the bbox records."""
    predictions = []
    for image_id, per_cell in probabilities.items():
        record = read_record(record_path(outputs.bboxes_dir, source, image_id))
        rles = label_mask_to_rles(record.cell_mask)
        for cell_i, row in enumerate(per_cell):
            predictions += [Prediction(image_id, cls, float(p), rles[cell_i + 1]) for cls, p in enumerate(row) if p > 0]
    return predictions


def cnn_alone(submission_csv: Path) -> dict[str, np.ndarray]:
    """Per-cell CNN ensemble probabilities (Negative by the submission's rule) that predict_submission wrote
    beside a submission made with add-ons: the (d0) row, from the same pass as (d)."""
    table = pd.read_csv(submission_csv.with_name(submission_csv.stem + "_cnn_cells.csv"), dtype={"ID": str})
    columns = [str(c) for c in range(NUM_CLASSES)]
    return {image_id: cells.sort_values("cell_i")[columns].to_numpy(np.float64) for image_id, cells in table.groupby("ID")}


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


def reuse_submission(argv: list[str], pipeline_csv: Path, out_csv: Path) -> bool:
    """Copy the pipeline's submission (and its per-cell files) to `out_csv` when predict_submission with
    `argv` would predict the same (equal `prediction_settings`); False when it would not."""
    written = settings_path(pipeline_csv)
    if not written.is_file():
        return False
    wanted = prediction_settings(build_submission_parser().parse_args(argv + ["--out", str(pipeline_csv)]))
    try:
        same = json.loads(written.read_text()) == json.loads(json.dumps(wanted))
    except ValueError:
        return False
    suffixes = ("", "_cells", "_cnn_cells")
    sources = [pipeline_csv.with_name(pipeline_csv.stem + suffix + ".csv") for suffix in suffixes]
    if not same or not all(path.is_file() for path in sources):
        return False
    for source, suffix in zip(sources, suffixes):
        shutil.copyfile(source, out_csv.with_name(out_csv.stem + suffix + ".csv"))
    log.info("(d) is the pipeline's %s (same settings): reused, not predicted again", pipeline_csv)
    return True


def score(predictions: list[Prediction], truth) -> tuple[float, pd.DataFrame]:
    table = cell_map(predictions, truth)
    return mean_ap(table), table


def target_check(per_class: pd.DataFrame, margin: float = CLASS_MARGIN) -> tuple[float, list[str]]:
    """(mAP(d) / mAP(a), names of the classes with AP(d) < AP(a) - margin) from a per-class table with
    columns name, n_true_test, (a), (d); classes without true cells are left out."""
    present = per_class[per_class["n_true_test"] > 0]
    ratio = float(present["(d)"].mean() / present["(a)"].mean())
    return ratio, present.loc[present["(d)"] < present["(a)"] - margin, "name"].tolist()


def fusion_description(outputs: OutputLayout) -> str:
    path = outputs.fusion_weights_csv
    if not path.is_file():
        return "fixed weight"
    weights = pd.read_csv(path)
    fused = weights[weights["weight"] > 0]
    if fused.empty:
        return "chosen on out-of-fold training images' labels: off, no class gained"
    return "chosen on out-of-fold training images' labels: " + ", ".join(f"{n} {w:g}" for n, w in zip(fused["name"], fused["weight"]))


def score_run(label: str, layout: DatasetLayout, outputs: OutputLayout, args) -> tuple[list[str], pd.DataFrame]:
    """Markdown lines of one run's section, and its per-class test AP table."""
    if not layout.truth_cell_labels_csv.is_file():
        raise UserInputError(f"{layout.truth_cell_labels_csv} not found: the demo report needs cell-level truth")
    demo_dir = outputs.root / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    common = ["--dataset", str(layout.root), "--output-dir", str(outputs.root), "--folds", args.folds, "--overlays", "0"]
    image_level_csv, cellwise_csv = demo_dir / "b_image_level_per_cell.csv", demo_dir / "d_cellwise.csv"
    submission_main(common + ["--run-name", args.image_run, "--input-style", "image-level", "--tta", "identity",
                              "--img-size", str(args.image_size), "--out", str(image_level_csv)])
    cell_flags = ["--run-name", args.cell_run, "--img-size", str(args.cell_size), "--checkpoint", args.cell_checkpoint]
    feature_model = outputs.feature_model_path(args.feature_run)
    use_features = feature_model.is_file() and args.feature_weight > 0
    add_on_flags = (["--feature-model", str(feature_model), "--feature-weight", str(args.feature_weight)]
                    if use_features else []) + ["--image-context", str(args.image_context)]
    if not reuse_submission(common + cell_flags + add_on_flags, outputs.root / "submission.csv", cellwise_csv):
        submission_main(common + cell_flags + add_on_flags + ["--out", str(cellwise_csv)])
    add_ons = use_features or args.image_context > 0

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
    test_scores = {"a": score(broadcast_test, test_truth), "b": score(submission(image_level_csv), test_truth),
                   **({"d0": score(cell_predictions(outputs, "test", cnn_alone(cellwise_csv)), test_truth)}
                      if add_ons else {}),
                   "d": score(cellwise_test, test_truth), "e": score(submission(outputs.root / "submission.csv"), test_truth)}
    train_scores = {
        "a": score(cell_predictions(outputs, "train", broadcast(outputs, "train", dict(zip(noisy["ID"], noisy["Label"])))),
                   train_truth),
        "b": score(cell_predictions(outputs, "train", plain), train_truth),
        "c": score(cell_predictions(outputs, "train", added), train_truth)}
    names = dict(ROW_NAMES, e=f"{ROW_NAMES['e']} ({fusion_description(outputs)})")
    if add_ons:
        parts = ["CNN"] + (["cell feature model"] if use_features else []) + (
            [f"image context {args.image_context:g}"] if args.image_context > 0 else [])
        names["d"] = f"{ROW_NAMES['d']} ({' + '.join(parts)})"
    else:
        del names["d0"]
    lines = ["| predictions | held-out test mAP | train split mAP |", "|---|---|---|"]
    for key, name in names.items():
        cells = [f"{scores[key][0]:.4f}" if key in scores else "" for scores in (test_scores, train_scores)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    first = test_scores["a"][1]
    per_class = pd.DataFrame({"class": first["class"], "name": first["name"], "n_true_test": first["n_true"]})
    for key, (_, table) in test_scores.items():
        per_class[f"({key})"] = table["AP"].round(3)
    differences = bootstrap_map_difference(broadcast_test, cellwise_test, test_truth, BOOTSTRAP_RESAMPLES, seed=0)
    low, high = np.percentile(differences, [2.5, 97.5])
    ratio, below = target_check(per_class)
    summary = (f"(d) - (a) on the held-out split: {test_scores['d'][0] - test_scores['a'][0]:+.4f}; 95% interval over "
               f"{BOOTSTRAP_RESAMPLES} paired bootstrap resamples of the test images: [{low:+.4f}, {high:+.4f}]. "
               f"(d) / (a) = {ratio:.3f}; classes more than {CLASS_MARGIN} AP below (a): {', '.join(below) or 'none'}.")
    print(f"{label}:", "\n".join(lines), summary, sep="\n")
    shown = per_class[per_class["n_true_test"] > 0].drop(columns="class")
    section = [f"## {label}: `{layout.root}`, outputs in `{outputs.root}`", "", *lines, "", summary, "",
               "Per class, held-out test split (AP):", "", "```", shown.to_string(index=False), "```", ""]
    return section, per_class.assign(run=label)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="the one run's dataset when no --run is given")
    parser.add_argument("--output-dir", default="output", help="the one run's pipeline outputs when no --run is given")
    parser.add_argument("--run", nargs=3, action="append", metavar=("LABEL", "DATASET", "OUTPUT_DIR"),
                        help="a run to score (repeatable), e.g. --run 'style 2' input/synthetic_style2 output/style2")
    parser.add_argument("--report-dir", default=None, help="report.md and per_class_ap.png (default: {first output}/demo)")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--image-run", default="image_level")
    parser.add_argument("--cell-run", default="cellwise")
    parser.add_argument("--cell-checkpoint", default="best.pth",
                        help="the cell-level models' weights scored as (d): best.pth (selected) or final.pth (last epoch)")
    parser.add_argument("--feature-run", default="cell_features", help="run name of the cell feature model")
    parser.add_argument("--feature-weight", type=float, default=0.5,
                        help="its weight in (d) (0: the CNN alone); pass the pipeline's FEATURE_WEIGHT")
    parser.add_argument("--image-context", type=float, default=0.0,
                        help="the field-max weight of predict_submission --image-context in (d); pass the pipeline's IMAGE_CONTEXT")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--cell-size", type=int, default=512)
    args = parser.parse_args(argv)
    setup_logging()
    runs = args.run or [(Path(args.dataset).name, args.dataset, args.output_dir)]
    report_dir = Path(args.report_dir) if args.report_dir else Path(runs[0][2]) / "demo"
    report_dir.mkdir(parents=True, exist_ok=True)
    report = ["# Demo report", "",
              "Cell-level mAP (the challenge metric: mask IoU >= 0.6, mean over classes present) of each stage's",
              "predictions. Cells and masks come from our segmentation; truth from the synthetic generator.",
              "The settings are the demo's, chosen on style 1 (input/synthetic); other styles are scored as they come.", ""]
    tables = []
    for label, dataset, output_dir in runs:
        section, per_class = score_run(label, DatasetLayout(dataset), OutputLayout(output_dir), args)
        report += section
        tables.append(per_class)
    columns = [c for c in ("(a)", "(b)", "(d0)", "(d)", "(e)") if all(c in table for table in tables)]
    plot_per_class_ap(pd.concat(tables), columns, report_dir / "per_class_ap.png")
    report += ["![per-class test AP](per_class_ap.png)", ""]
    with atomic_path(report_dir / "report.md") as tmp:
        tmp.write_text("\n".join(report) + "\n")
    log.info("wrote %s", report_dir / "report.md")
    return 0


if __name__ == "__main__":
    run_cli(main)
