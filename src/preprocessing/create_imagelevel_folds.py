"""Image-level folds: iterative multi-label stratified K-fold over train (+ public) images.

    python -m src.preprocessing.create_imagelevel_folds --dataset input/synthetic [--public-data]
        [--drop-duplicates] [--n-folds 5] [--seed 0]

The stratification target is the 19 labels plus an is-public flag. Writes `folds.csv`
(ID,source,fold); the same inputs and seed give the same file. With `--drop-duplicates`, all but
one image of each group in `duplicates.csv` are left out of the folds (and so out of training).
Images whose channel files are missing or empty are left out too, with a warning line.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from src.data.labels import labels_to_multihot, read_label_tables
from src.data.schema import DatasetLayout
from src.preprocessing.bestfitting_duplicates_search import ids_to_drop, read_duplicates
from src.preprocessing.check_inputs import missing_image_files
from src.utils.io import UserInputError, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)


def stratification_target(table: pd.DataFrame) -> np.ndarray:
    """(N, 20) matrix: the 19 multi-hot labels and an is-public column."""
    return np.concatenate([labels_to_multihot(table["Label"].tolist()),
                           (table["source"] == "public").to_numpy(np.uint8)[:, None]], axis=1)


def assign_folds(table: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Return `ID,source,fold` for every row of a label table (ID, Label, source)."""
    if len(table) < n_folds:
        raise UserInputError(f"{len(table)} images cannot fill {n_folds} folds")
    # Sorting by ID makes the folds independent of the row order of the input tables.
    table = table.sort_values("ID", kind="stable").reset_index(drop=True)
    target = stratification_target(table)
    folds = np.full(len(table), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, valid_rows) in enumerate(splitter.split(np.zeros(len(table)), target)):
        folds[valid_rows] = fold
    return pd.DataFrame({"ID": table["ID"], "source": table["source"], "fold": folds})


def with_image_files(layout: DatasetLayout, table: pd.DataFrame) -> pd.DataFrame:
    """The rows whose four channel files exist (and are not empty); the others are left out with one
    warning line, so an ID without images never enters folds.csv."""
    problems = {}
    for source, rows in table.groupby("source"):
        problems.update(missing_image_files(layout, source, rows["ID"].tolist()))
    if problems:
        first = next(iter(problems.values()))
        log.warning("left out %d of %d images with no usable image files (first: %s)", len(problems), len(table), first)
    return table[~table["ID"].isin(problems)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("--public-data", action="store_true", help="include public.csv (source 'public')")
    parser.add_argument("--drop-duplicates", action="store_true",
                        help="leave out all but one image of each duplicate group of duplicates.csv")
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output CSV (default: <dataset>/folds.csv)")
    args = parser.parse_args(argv)
    setup_logging()
    layout = DatasetLayout(args.dataset)
    table = with_image_files(layout, read_label_tables(layout.train_csv, layout.public_csv if args.public_data else None))
    if args.drop_duplicates:
        if not layout.duplicates_csv.is_file():
            raise UserInputError(f"{layout.duplicates_csv} not found: run src.preprocessing.bestfitting_duplicates_search first")
        dropped = ids_to_drop(read_duplicates(layout.duplicates_csv))
        table = table[~table["ID"].isin(dropped)]
        log.info("left out %d duplicate images", len(dropped))
    folds = assign_folds(table, args.n_folds, args.seed)
    out = args.out or layout.folds_csv
    write_csv_atomic(folds, out)
    log.info("wrote %s: %s images per fold", out, np.bincount(folds["fold"]).tolist())
    return 0


if __name__ == "__main__":
    run_cli(main)
