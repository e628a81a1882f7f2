"""Split all cells into denoising folds (default 3), the cells of one image spread over the folds.

    python -m src.preprocessing.create_denoising_folds [--output-dir output] [--n-folds 3] [--seed 0]

Reads the cell index of the bbox records (`{output}/bboxes/{source}/cells.csv`, train and, when
present, public) and writes `{output}/denoising_folds.csv` with columns ID,cell_i,fold
(cell_i = index of the cell in its image's record).

Within an image the cells are shuffled and dealt round-robin, so each fold gets floor(n/K) or
ceil(n/K) of them; the folds that receive the extra cells of an image are the ones with the fewest
cells so far, so the folds stay within one cell of each other overall. Images are processed in
sorted-ID order with a seeded generator, so the same inputs and seed give the same file.
"""
from __future__ import annotations

import argparse
import logging
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from src.data.bbox_records import (CELL_TABLE_NAME, RecordError, list_record_ids, read_cell_table, read_record,
                                   record_path, records_dir)
from src.data.schema import DENOISING_FOLDS_COLUMNS, OutputLayout
from src.utils.io import UserInputError, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)


def assign_folds(cells: pd.DataFrame, n_folds: int = 3, seed: int = 0) -> pd.DataFrame:
    """(ID, cell_i) rows -> (ID, cell_i, fold), one image's cells spread as evenly as possible."""
    if n_folds < 1:
        raise ValueError("n_folds must be >= 1")
    rng = np.random.default_rng(seed)
    totals = np.zeros(n_folds, np.int64)
    cells = cells[["ID", "cell_i"]].sort_values(["ID", "cell_i"], kind="stable").reset_index(drop=True)
    folds = np.empty(len(cells), np.int64)
    starts = np.flatnonzero(np.r_[True, cells["ID"].to_numpy()[1:] != cells["ID"].to_numpy()[:-1]]) if len(cells) else []
    bounds = list(starts) + [len(cells)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        count = stop - start
        # Folds ordered by current size (ties broken at random): the first `count % n_folds` get one more.
        order = np.lexsort((rng.permutation(n_folds), totals))
        dealt = order[np.arange(count) % n_folds]
        folds[start:stop] = dealt[rng.permutation(count)]
        totals += np.bincount(dealt, minlength=n_folds)
    return cells.assign(fold=folds)[list(DENOISING_FOLDS_COLUMNS)]


def record_cell_count(path: Path) -> int:
    """Cells in one record, reading only its `boxes` (40x faster than the whole record without the
    mask); a record that does not open that way is read in full, for read_record's RecordError."""
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as data:
                return int(data["boxes"].shape[0])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError):
        pass
    return read_record(path, load_mask=False).n_cells


def checked_cell_table(bboxes_dir, source: str) -> pd.DataFrame:
    """`cells.csv` of one source after checking it against the records it indexes: every record must
    open and hold as many cells as the table lists for it, and the table must list no image without a
    record; otherwise a stale or damaged index would silently decide the folds (UserInputError)."""
    directory = records_dir(bboxes_dir, source)
    try:
        cells = read_cell_table(directory)
    except ValueError as error:  # pandas' ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors
        raise UserInputError(f"{directory / CELL_TABLE_NAME}: unreadable ({str(error).strip()}); "
                             f"rerun python -m src.preprocessing.generate_cell_bboxes") from None
    if "ID" not in cells.columns or "cell_i" not in cells.columns:
        raise UserInputError(f"{directory / CELL_TABLE_NAME}: not a cell table (columns {list(cells.columns)}); "
                             f"rerun python -m src.preprocessing.generate_cell_bboxes")
    listed = cells.groupby("ID").size()
    record_ids = list_record_ids(directory)
    rerun = f"rerun python -m src.preprocessing.generate_cell_bboxes ({CELL_TABLE_NAME} was not used)"
    stray = sorted(set(listed.index) - set(record_ids))
    if stray:
        raise UserInputError(f"{directory / CELL_TABLE_NAME} lists {len(stray)} image(s) with no record "
                             f"(first: {stray[0]}); {rerun}")
    for image_id in record_ids:
        try:
            held = record_cell_count(record_path(bboxes_dir, source, image_id))
        except RecordError as error:
            raise UserInputError(f"{error}; delete it and {rerun}") from None
        if held != listed.get(image_id, 0):
            raise UserInputError(f"{directory / CELL_TABLE_NAME} lists {listed.get(image_id, 0)} cells of {image_id}, "
                                 f"its record holds {held}; {rerun}")
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output", help="output folder with bboxes/ (default: %(default)s)")
    parser.add_argument("--sources", nargs="+", default=None, choices=("train", "public"),
                        help="record sources to include (default: train, plus public when its records exist)")
    parser.add_argument("--n-folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    if args.n_folds < 1:
        raise UserInputError("--n-folds must be >= 1")
    bboxes_dir = OutputLayout(args.output_dir).bboxes_dir
    sources = args.sources or ["train"] + (
        ["public"] if (records_dir(bboxes_dir, "public") / CELL_TABLE_NAME).is_file() else [])
    tables = []
    for source in sources:
        tables.append(checked_cell_table(bboxes_dir, source)[["ID", "cell_i"]])
    cells = pd.concat(tables, ignore_index=True)
    if cells.duplicated(["ID", "cell_i"]).any():
        raise UserInputError(f"an image ID appears in more than one of the sources {sources}")
    folds = assign_folds(cells, args.n_folds, args.seed)
    out = OutputLayout(args.output_dir).denoising_folds_csv
    write_csv_atomic(folds, out)
    sizes = folds["fold"].value_counts().sort_index().tolist()
    log.info("%d cells of %d images (%s) in %d folds of %s cells -> %s", len(folds), folds["ID"].nunique(),
             "+".join(sources), args.n_folds, sizes, out)
    return 0


if __name__ == "__main__":
    run_cli(main)
