"""Cell feature model (stage 9b): gradient-boosted trees on hand-crafted cell descriptors, same targets as the CNN.

    python -m src.train.train_cell_features --dataset input/synthetic --output output --image-label-weight 0.5

Every cell of the pseudo-label store gets the descriptors of `src.features.cell_features` (read at the
field's own resolution from the full-resolution cache) and the cell-level CNN's training targets
(pseudo-labels, --selection cells set to 1, blended with the image labels by --image-label-weight);
with --relabel-folds K (off by default), those targets first go through one multiple-instance step
(`cell_classifier.relabel_targets`: out-of-fold predictions over K folds of images, rescaled within
each field labelled with the class); one classifier per class is then fit on all cells. Beside the
trees, --mil-models small MLPs are fit on the same descriptors to the image labels alone, through a
multiple-instance pooling of each field's cells (`src.features.cell_mil`); the saved model predicts
the mean of the trees and those MLPs. Both go to `{output}/models/{run-name}/feature_model.joblib`.
`predict_submission --feature-model` averages its predictions with the CNN's. It exists because a
CNN trained from scratch on a small dataset's ~1000 cells does not learn one-to-two-pixel dots, which
the descriptors measure directly.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from src.data.bbox_records import read_record, record_path
from src.data.cache import load_full_resolution
from src.data.labels import read_label_tables
from src.data.schema import DatasetLayout, OutputLayout
from src.features import cell_classifier, cell_mil
from src.features.cell_features import record_features
from src.train.train_cellwise import broadcast_image_labels, cell_targets
from src.utils.io import UserInputError, run_cli, setup_logging

log = logging.getLogger("hpa.train")


def image_features(layout: DatasetLayout, outputs: OutputLayout, source: str, image_id: str) -> np.ndarray:
    """(n_cells, N_FEATURES) descriptors of one field's cells, from its bbox record and full-resolution field."""
    record = read_record(record_path(outputs.bboxes_dir, source, image_id))
    field = load_full_resolution(layout, source, image_id, record.image_shape)
    return record_features(np.asarray(field), record)


def features_of_fields(layout: DatasetLayout, outputs: OutputLayout, fields: list[tuple[str, str]], workers: int = 1,
                       progress: bool = True) -> dict[tuple[str, str], np.ndarray]:
    """Descriptors per (source, ID) field, computed over `workers` processes."""
    jobs = (delayed(image_features)(layout, outputs, source, image_id) for source, image_id in fields)
    results = Parallel(n_jobs=max(workers, 1), return_as="generator")(jobs)
    return dict(zip(fields, tqdm(results, total=len(fields), desc="cell features", disable=not progress)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic")
    parser.add_argument("--output", default="output", help="pipeline output folder (bboxes/, pseudo_labels.h5, models/)")
    parser.add_argument("--run-name", default="cell_features", help="the model goes to {output}/models/{run-name}/")
    parser.add_argument("--cell-level-labels-path", default=None, help="pseudo-label HDF5 (default: {output}/pseudo_labels.h5)")
    parser.add_argument("--selection", action="append", default=[], help="selection CSV (ID,cell_i); repeatable")
    parser.add_argument("--selection-class", action="append", default=None, help="class of each --selection")
    parser.add_argument("--image-label-weight", default="0",
                        help="target = (1 - w) * pseudo-label + w * the image's label, as train_cellwise; or 'auto'")
    parser.add_argument("--public-data", action="store_true", help="public.csv labels for public cells")
    parser.add_argument("--relabel-folds", type=int, default=0,
                        help="folds of images for the multiple-instance relabelling of the targets (0: off; see README)")
    parser.add_argument("--max-iter", type=int, default=150, help="boosting rounds per class")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--min-cells-per-leaf", type=int, default=cell_classifier.MIN_CELLS_PER_LEAF,
                        help="cells each tree leaf holds at least (regularises classes seen in few fields)")
    parser.add_argument("--mil-models", type=int, default=cell_mil.MIL_MODELS,
                        help="multiple-instance MLPs averaged with the trees (default %(default)s; 0: trees only; see cell_mil)")
    parser.add_argument("--mil-threshold", type=float, default=cell_mil.POOL_THRESHOLD,
                        help="share of a field's cells above which the MLPs' pooling takes the field as labelled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes computing the descriptors and fitting the classes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.max_iter < 1 or not 0 < args.learning_rate <= 1 or args.min_cells_per_leaf < 1:
        raise UserInputError("--max-iter and --min-cells-per-leaf must be >= 1 and --learning-rate in (0, 1]")
    if args.mil_models < 0 or not 0 < args.mil_threshold < 1:
        raise UserInputError("--mil-models must be >= 0 and --mil-threshold in (0, 1)")
    if args.relabel_folds == 1 or args.relabel_folds < 0:
        raise UserInputError("--relabel-folds must be 0 (off) or at least 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    layout, outputs = DatasetLayout(args.dataset), OutputLayout(args.output)
    cells, targets = cell_targets(layout, outputs, args.cell_level_labels_path, args.selection, args.selection_class,
                                  args.image_label_weight, args.public_data)
    if len(cells) == 0:
        raise UserInputError("the pseudo-label store has no cells to learn from")
    started = time.time()
    fields = list(dict.fromkeys(zip(cells["source"], cells["ID"])))
    per_field = features_of_fields(layout, outputs, fields, args.workers, not args.no_progress)
    stale = [(image_id, cell_i) for source, image_id, cell_i in zip(cells["source"], cells["ID"], cells["cell_i"])
             if cell_i >= len(per_field[(source, image_id)])]
    if stale:
        raise UserInputError(f"{len(stale)} cells of the pseudo-label store are not in their bbox records (first: "
                             f"{stale[0][0]} cell {stale[0][1]}); the records changed since the pseudo-labels were made")
    features = np.stack([per_field[(source, image_id)][cell_i]
                         for source, image_id, cell_i in zip(cells["source"], cells["ID"], cells["cell_i"])])
    log.info("descriptors of %d cells in %d fields: %.1f s", len(features), len(fields), time.time() - started)
    fit_options = {"max_iter": args.max_iter, "learning_rate": args.learning_rate, "workers": args.workers,
                   "min_cells_per_leaf": args.min_cells_per_leaf}
    image_ids = cells["ID"].to_numpy()
    field_ids, field_index = np.unique(image_ids, return_inverse=True)  # the MLPs' fields and each cell's row in them
    field_labels = broadcast_image_labels(field_ids, read_label_tables(layout.train_csv,
                                                                       layout.public_csv if args.public_data else None))
    if args.relabel_folds:
        oof = cell_classifier.out_of_fold_predictions(features, targets, image_ids, args.relabel_folds, args.seed,
                                                      **fit_options)
        targets = cell_classifier.relabel_targets(oof, image_ids, field_labels[field_index])
        log.info("targets relabelled from %d-fold out-of-fold predictions: %.1f s", args.relabel_folds, time.time() - started)
    classifier = cell_classifier.fit_cell_classifier(features, targets, args.seed, **fit_options)
    if args.mil_models:
        classifier["mil"] = cell_mil.fit_mil_model(features, field_index, field_labels, args.seed, args.mil_models,
                                                   threshold=args.mil_threshold)
        log.info("multiple-instance MLPs fit to the labels of %d fields: %.1f s", len(field_ids), time.time() - started)
    path = outputs.feature_model_path(args.run_name)
    cell_classifier.save(classifier, path)
    fitted = sum(not isinstance(model, (float, type(None))) for model in classifier["models"])
    log.info("fit %d classes in %.1f s in all; wrote %s", fitted, time.time() - started, path)
    return 0


if __name__ == "__main__":
    run_cli(main)
