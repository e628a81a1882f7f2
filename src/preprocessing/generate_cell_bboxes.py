"""Segment every field into cells and store, per image, the cell mask, the cell boxes and the
"alien" pixel indices (other cells inside each box); format in src/data/bbox_records.py.

    python -m src.preprocessing.generate_cell_bboxes --dataset input/synthetic --output-dir output
    python -m src.preprocessing.generate_cell_bboxes --public-data --workers 2
    python -m src.preprocessing.generate_cell_bboxes --backend hpacellseg \\
        --nuclei-model models/dpn_unet_nuclei_v1.pth --cell-model models/dpn_unet_cell_3ch_v1.pth

The hpacellseg backend loads the two published HPA U-Nets (TorchScript files) and runs one tiny
forward pass before any field, so a wrong file stops the run at once; it segments `--batch-size`
fields per forward pass, on CUDA when present.

Writes `{output}/bboxes/{source}/{ID}.npz`, then `cells.csv` (one row per cell of every record).
Resumable: images with a record are skipped, and a record only ever appears complete (temporary
file + rename), so a killed run is finished by running the same command again. Images that
cannot be read or segmented are logged and listed in `failed.csv` and the run goes on.
Exit code: 0 all done, 1 some images failed (see failed.csv), 3 a worker process died (e.g. killed
for memory): rerun to resume. One run per output folder at a time (a lock file enforces it).
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import multiprocessing
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from src.data.bbox_records import (CELL_TABLE_NAME, FAILED_TABLE_NAME, RECORD_SUFFIX, RecordError, build_cell_table,
                                   build_record, list_record_ids, records_dir, write_record)
from src.data.images import ImageReadError, read_field
from src.data.labels import source_image_ids
from src.data.schema import DatasetLayout, OutputLayout
from src.segmentation import BACKENDS, checked_segmenter, make_segmenter
from src.utils.io import UserInputError, atomic_path, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)

# Test hook: the process dies (os._exit) half-way through writing its N-th record, as a run killed
# by the OS would. Used by the resume tests only.
CRASH_ENV = "HPA_BBOXES_CRASH_AFTER"
EXIT_FAILED_IMAGES = 1
EXIT_WORKER_DIED = 3

_worker: dict = {}


def _init_worker(segmenter_config: dict, image_dir: str, out_dir: str, single_thread: bool,
                 segmenter=None) -> None:
    if single_thread:
        import cv2

        cv2.setNumThreads(1)
    _worker.update(segmenter=segmenter or make_segmenter(**segmenter_config), image_dir=image_dir, out_dir=out_dir,
                   written=0, crash_after=int(os.environ.get(CRASH_ENV, "0") or 0))


def _error_text(error: Exception) -> str:
    log.debug("segmentation failed:\n%s", "".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {error}"


def _segment_fields(fields: list) -> list:
    """(nuclei, cells) or an exception per field; several fields per call when the backend batches.
    A batch that fails is redone one field at a time, so only the field at fault fails."""
    segmenter = _worker["segmenter"]
    if len(fields) > 1 and hasattr(segmenter, "segment_batch"):
        try:
            return segmenter.segment_batch(fields)
        except Exception:  # found again below, field by field
            pass
    results = []
    for field in fields:
        try:
            results.append(segmenter.segment(field))
        except Exception as error:  # a field that breaks segmentation must not stop the run
            results.append(error)
    return results


def _segment_chunk(image_ids: list[str]) -> list[tuple[str, int, str | None]]:
    """Read, segment and store some fields; per field (ID, number of cells, error or None)."""
    outcome: dict[str, tuple[str, int, str | None]] = {}
    readable = []
    for image_id in image_ids:
        try:
            readable.append((image_id, read_field(_worker["image_dir"], image_id)))
        except ImageReadError as error:
            outcome[image_id] = (image_id, 0, str(error))
    segmented = _segment_fields([field for _, field in readable])
    for (image_id, _), result in zip(readable, segmented):
        if isinstance(result, Exception):
            outcome[image_id] = (image_id, 0, _error_text(result))
            continue
        try:
            record = build_record(image_id, result[1], backend=_worker["segmenter"].name)
            path = Path(_worker["out_dir"]) / f"{image_id}{RECORD_SUFFIX}"
            _worker["written"] += 1
            if _worker["crash_after"] and _worker["written"] >= _worker["crash_after"]:
                _die_while_writing(path)
            write_record(path, record)
            outcome[image_id] = (image_id, record.n_cells, None)
        except Exception as error:  # one record that cannot be built or written
            outcome[image_id] = (image_id, 0, _error_text(error))
    return [outcome[image_id] for image_id in image_ids]


def _die_while_writing(path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"PK\x03\x04 partial")
        os._exit(137)


def _finished(path: Path) -> bool:
    """A record exists under its final name (zero-size files, which only other tools leave, are redone)."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete temporary files left by a killed run (`.{ID}.*.tmp.npz`, `.cells.*.tmp.csv`)."""
    stale = list(out_dir.glob(f".*.tmp{RECORD_SUFFIX}")) + list(out_dir.glob(".*.tmp.csv"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


class _OutputLock:
    """An exclusive flock on `{out_dir}/.lock`; released by the OS when the process ends."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"

    def __enter__(self):
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise UserInputError(f"another generate_cell_bboxes run is writing to {self.path.parent}") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        return False


def generate(layout: DatasetLayout, out_dir: Path, source: str, segmenter_config: dict, workers: int = 1,
             limit: int | None = None, progress: bool = True,
             segmenter=None) -> tuple[list[tuple[str, str]], int, bool]:
    """Segment the images of `source` that have no record yet, `segmenter_config["batch_size"]`
    fields at a time for a backend that batches. `segmenter`: one already built, used when
    workers <= 1. Returns (failures as (ID, error), number of records written, whether a worker died)."""
    ids = source_image_ids(layout, source)
    ids = ids[:limit] if limit else ids
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(out_dir)
    if removed:
        log.info("removed %d unfinished temporary record(s) of an earlier run", removed)
    todo = [image_id for image_id in ids if not _finished(out_dir / f"{image_id}{RECORD_SUFFIX}")]
    log.info("%s: %d of %d images to segment (%s backend) into %s", source, len(todo), len(ids),
             segmenter_config["backend"], out_dir)
    init_args = (segmenter_config, str(layout.image_dir(source)), str(out_dir), workers > 1)
    failures: list[tuple[str, str]] = []
    written, died = 0, False
    bar = tqdm(total=len(todo), desc=f"cell boxes ({source})", disable=not progress)

    def handle(results: list[tuple[str, int, str | None]]) -> None:
        nonlocal written
        for image_id, _, error in results:
            if error:
                log.warning("skipped %s: %s", image_id, error)
                failures.append((image_id, error))
            else:
                written += 1
            bar.update(1)

    chunk = segmenter_config.get("batch_size", 1) if segmenter_config["backend"] == "hpacellseg" else 1
    chunks = [todo[start:start + chunk] for start in range(0, len(todo), chunk)]
    if workers <= 1:
        _init_worker(*init_args, segmenter=segmenter)
        for image_ids in chunks:
            handle(_segment_chunk(image_ids))
    else:
        # The parent has already loaded and run the hpacellseg models (on CUDA when present); a forked
        # child cannot use CUDA after that, so those workers start fresh.
        context = multiprocessing.get_context("spawn") if segmenter_config["backend"] == "hpacellseg" else None
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=init_args,
                                 mp_context=context) as pool:
            futures = [pool.submit(_segment_chunk, image_ids) for image_ids in chunks]
            try:
                for future in as_completed(futures):
                    handle(future.result())
            except BrokenProcessPool:
                died = True
                for future in futures:
                    future.cancel()
    bar.close()
    return failures, written, died


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("--output-dir", default="output", help="output folder (default: %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--public-data", action="store_true", help="segment public.csv / public/ instead of train")
    group.add_argument("--test-data", action="store_true", help="segment test.csv / test/ instead of train")
    parser.add_argument("--backend", choices=BACKENDS, default="classical", help="segmentation backend")
    parser.add_argument("--nuclei-model", help="hpacellseg: nuclei model file, TorchScript (local; nothing is downloaded)")
    parser.add_argument("--cell-model", help="hpacellseg: 3-channel cell model file, TorchScript (local)")
    parser.add_argument("--allow-pickled-model", action="store_true",
                        help="hpacellseg: also accept model files that are whole pickled modules; loading one runs "
                             "code from the file, so only use files you trust")
    parser.add_argument("--device", default="auto",
                        help="hpacellseg: torch device, 'auto' = CUDA when present, else CPU (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="hpacellseg: fields per forward pass (default: %(default)s)")
    parser.add_argument("--amp", action="store_true", help="hpacellseg: mixed precision (autocast) forward passes")
    parser.add_argument("--work-size", type=int, default=512,
                        help="long side in px at which fields are segmented; masks are upscaled (default: %(default)s)")
    parser.add_argument("--use-green", action="store_true", help="classical: add the protein channel to the cell signal")
    parser.add_argument("--workers", type=int, default=1, help="segmentation processes (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    layout = DatasetLayout(args.dataset)
    if not layout.root.is_dir():
        raise UserInputError(f"dataset folder {layout.root} not found")
    if args.workers < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.work_size < 32:
        raise UserInputError("--workers, --batch-size and --limit must be >= 1 and --work-size >= 32")
    source = "public" if args.public_data else "test" if args.test_data else "train"
    config = dict(backend=args.backend, work_size=args.work_size, nuclei_model=args.nuclei_model,
                  cell_model=args.cell_model, device=args.device, use_green=args.use_green)
    if args.backend == "hpacellseg":
        config.update(batch_size=args.batch_size, amp=args.amp, allow_pickled_model=args.allow_pickled_model)
    segmenter = checked_segmenter(**config)
    out_dir = records_dir(OutputLayout(args.output_dir).bboxes_dir, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _OutputLock(out_dir):
        failures, written, died = generate(layout, out_dir, source, config, args.workers, args.limit,
                                           progress=not args.no_progress, segmenter=segmenter)
        failed_csv = out_dir / FAILED_TABLE_NAME
        if failures:
            write_csv_atomic(pd.DataFrame(failures, columns=["ID", "error"]), failed_csv)
        elif failed_csv.exists() and not died:
            failed_csv.unlink()
        try:
            cells = build_cell_table(out_dir)
        except RecordError as error:
            raise UserInputError(f"{error}; delete it and rerun") from None
        write_csv_atomic(cells, out_dir / CELL_TABLE_NAME)
    log.info("wrote %d records; %s now holds %d records, %d cells", written, out_dir,
             len(list_record_ids(out_dir)), len(cells))
    if died:
        log.error("a worker process died (killed by the OS, out of memory?); finished records are kept: "
                  "run the same command again to resume")
        return EXIT_WORKER_DIED
    if failures:
        log.error("%d image(s) could not be segmented; see %s", len(failures), failed_csv)
        return EXIT_FAILED_IMAGES
    return 0


if __name__ == "__main__":
    run_cli(main)
