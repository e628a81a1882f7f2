"""Among images labelled Negative, flag the cells whose protein (green) channel is clearly stained.

    python -m src.preprocessing.detect_negatives_with_obvious_staining [--public-data] [--threshold 150]

Per cell: the mean of its `top_k` (10) brightest green pixels at 2048-equivalent scale, in 8-bit
grey levels. "2048-equivalent": the pixel count scales with the field's area, k = max(1,
round(10 * H * W / 2048^2)) (22 at 3072 px, 2 at 1024 px), so the same amount of cell surface is
averaged whatever the resolution. A cell is `obvious` when that mean >= `threshold` (150).

Cells come from the bbox records of generate_cell_bboxes when they exist (so cell_i matches the
record), otherwise the field is segmented here with the same deterministic segmenter (same
cell_i as the record that backend would write). Writes, replacing the rows of this source only:
    {dataset}/obvious_staining.csv          ID,source,cell_i,top10_mean,obvious
    {dataset}/obvious_staining_images.csv   ID,source,n_cells,n_obvious,obvious (any cell obvious)
Unreadable images are logged and listed in `{dataset}/obvious_staining_failed_{source}.csv`; exit code 1.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm import tqdm

from src.data.bbox_records import RecordError, read_record, record_path
from src.data.classes import NEGATIVE
from src.data.images import ImageReadError, channel_path, read_channel, read_field
from src.data.labels import parse_label_string, read_label_table
from src.data.schema import (OBVIOUS_STAINING_COLUMNS, OBVIOUS_STAINING_IMAGE_COLUMNS, DatasetLayout, OutputLayout,
                             obvious_staining_csv, obvious_staining_images_csv)
from src.segmentation import BACKENDS, checked_segmenter, make_segmenter
from src.utils.io import UserInputError, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)
REFERENCE_SIDE = 2048


def pixels_at_reference_scale(top_k: int, shape: tuple[int, int]) -> int:
    """How many pixels of a field of `shape` cover the area of `top_k` pixels of a 2048x2048 field."""
    return max(1, int(round(top_k * shape[0] * shape[1] / REFERENCE_SIDE ** 2)))


def top_pixel_means(green: np.ndarray, cells: np.ndarray, k: int) -> np.ndarray:
    """Per cell 1..n of `cells`: the mean of its k brightest `green` pixels (all of them if fewer)."""
    if green.shape != cells.shape:
        raise ValueError(f"green {green.shape} and mask {cells.shape} differ")
    means = np.zeros(int(cells.max()), np.float64)
    for index, window in enumerate(ndi.find_objects(cells)):
        if window is None:
            continue
        values = green[window][cells[window] == index + 1]
        top = np.partition(values, values.size - k)[values.size - k:] if values.size > k else values
        means[index] = float(top.mean())
    return means


_state: dict = {}


def _init(config: dict, segmenter=None) -> None:
    _state.update(config)
    _state["segmenter"] = segmenter


def _cell_mask(image_id: str) -> np.ndarray:
    path = record_path(_state["bboxes_dir"], _state["source"], image_id)
    if path.is_file():
        try:
            return read_record(path).cell_mask
        except RecordError as error:
            log.warning("%s; segmenting %s again", error, image_id)
    if _state["segmenter"] is None:
        _state["segmenter"] = make_segmenter(**_state["segmenter_config"])
    return _state["segmenter"].segment(read_field(_state["image_dir"], image_id))[1]


def _measure(image_id: str) -> tuple[str, np.ndarray | None, str | None]:
    """(ID, per-cell top-k means, error)."""
    try:
        green = read_channel(channel_path(_state["image_dir"], image_id, "green"))
        cells = _cell_mask(image_id)
        if cells.shape != green.shape:  # a record made from differently sized files: sample it
            cells = cv2.resize(cells, (green.shape[1], green.shape[0]), interpolation=cv2.INTER_NEAREST)
        k = pixels_at_reference_scale(_state["top_k"], green.shape)
        return image_id, top_pixel_means(green, cells, k), None
    except ImageReadError as error:
        return image_id, None, str(error)
    except Exception as error:  # one field that breaks segmentation must not stop the run
        return image_id, None, f"{type(error).__name__}: {error}"


def negative_ids(table: pd.DataFrame) -> list[str]:
    return [image_id for image_id, label in zip(table["ID"], table["Label"]) if NEGATIVE in parse_label_string(label)]


def _replace_source_rows(path: Path, frame: pd.DataFrame, source: str) -> None:
    if path.is_file():
        old = pd.read_csv(path, dtype={"ID": str})
        frame = pd.concat([old[old["source"] != source], frame], ignore_index=True)
    write_csv_atomic(frame, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("--output-dir", default="output", help="where bbox records are looked for (default: %(default)s)")
    parser.add_argument("--public-data", action="store_true", help="public.csv / public/ instead of train")
    parser.add_argument("--threshold", type=float, default=150.0, help="8-bit grey level (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=10, help="brightest pixels per cell at 2048 px (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="classical", help="segmenter for images without a record")
    parser.add_argument("--nuclei-model")
    parser.add_argument("--cell-model")
    parser.add_argument("--work-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N Negative images")
    args = parser.parse_args(argv)
    setup_logging()
    layout = DatasetLayout(args.dataset)
    if not layout.root.is_dir():
        raise UserInputError(f"dataset folder {layout.root} not found")
    if args.top_k < 1 or args.workers < 1:
        raise UserInputError("--top-k and --workers must be >= 1")
    source = "public" if args.public_data else "train"
    table = read_label_table(layout.public_csv if args.public_data else layout.train_csv, source)
    ids = negative_ids(table)[:args.limit] if args.limit else negative_ids(table)
    log.info("%s: %d images labelled Negative", source, len(ids))
    config = dict(bboxes_dir=str(OutputLayout(args.output_dir).bboxes_dir), source=source,
                  image_dir=str(layout.image_dir(source)), top_k=args.top_k,
                  segmenter_config=dict(backend=args.backend, work_size=args.work_size,
                                        nuclei_model=args.nuclei_model, cell_model=args.cell_model))
    segmenter = checked_segmenter(**config["segmenter_config"])
    cell_rows, image_rows, failures = [], [], []
    if args.workers > 1:
        # hpacellseg has just run here (on CUDA by default), which a forked child could not use
        context = multiprocessing.get_context("spawn") if args.backend == "hpacellseg" else None
        with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(config,), mp_context=context) as pool:
            results = list(tqdm(pool.map(_measure, ids, chunksize=4), total=len(ids), desc="obvious staining"))
    else:
        _init(config, segmenter)  # the segmenter just built and checked, not a second copy
        results = [_measure(image_id) for image_id in tqdm(ids, desc="obvious staining")]
    for image_id, means, error in results:
        if error:
            log.warning("skipped %s", error)
            failures.append((image_id, error))
            continue
        obvious = means >= args.threshold
        cell_rows += [(image_id, source, cell_i, round(float(m), 3), bool(o))
                      for cell_i, (m, o) in enumerate(zip(means, obvious))]
        image_rows.append((image_id, source, means.size, int(obvious.sum()), bool(obvious.any())))
    _replace_source_rows(obvious_staining_csv(layout.root), pd.DataFrame(cell_rows, columns=OBVIOUS_STAINING_COLUMNS), source)
    _replace_source_rows(obvious_staining_images_csv(layout.root),
                         pd.DataFrame(image_rows, columns=OBVIOUS_STAINING_IMAGE_COLUMNS), source)
    n_obvious = sum(row[3] > 0 for row in image_rows)
    log.info("%d of %d Negative images have a cell with obvious staining (top-%d mean >= %g)",
             n_obvious, len(image_rows), args.top_k, args.threshold)
    failed_csv = layout.root / f"obvious_staining_failed_{source}.csv"
    if failures:
        write_csv_atomic(pd.DataFrame(failures, columns=["ID", "error"]), failed_csv)
        log.error("%d image(s) could not be read; see %s", len(failures), failed_csv)
        return 1
    failed_csv.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
