"""Decode every field once into the `.npy` cache that the data loaders read instead of PNGs.

    python -m src.preprocessing.cache_images --dataset input/synthetic --size 1024 [--public-data]
    python -m src.preprocessing.cache_images --dataset input/synthetic --size native

Resumable: fields already cached are skipped; damaged cache files (empty, truncated, wrong shape) are
rebuilt, with one warning line. A non-square field keeps its aspect (long side = --size, zero padding
at the bottom or right); `--size native` keeps every field at its own size (`cache_native/`, the
full-resolution copy the cell crops read). Unreadable fields are logged, listed in
`cache_{size}/failed_{source}.csv`, and make the exit code 1.
"""
from __future__ import annotations

import argparse
import logging
from concurrent.futures import ProcessPoolExecutor

import pandas as pd
from tqdm import tqdm

from src.data.cache import cache_file_problem, cache_one
from src.data.images import ImageReadError
from src.data.labels import source_image_ids
from src.data.schema import NATIVE, DatasetLayout
from src.utils.io import UserInputError, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)


def _cache_task(args: tuple) -> tuple[str, str | None]:
    image_dir, image_id, cache_path, size = args
    try:
        cache_one(image_dir, image_id, cache_path, size)
        return image_id, None
    except ImageReadError as error:
        return image_id, str(error)


def cache_size(text: str) -> int | str:
    """--size: a positive side in px, or 'native'."""
    if text == NATIVE:
        return NATIVE
    try:
        side = int(text)
    except ValueError:
        side = 0
    if side <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive side in px nor {NATIVE!r}")
    return side


def cache_dataset(layout: DatasetLayout, source: str, size: int | str, workers: int = 1,
                  limit: int | None = None) -> list[tuple[str, str]]:
    """Cache every field of `source` at `size` px (NATIVE: its own size); returns (ID, reason) for
    fields that failed."""
    ids = source_image_ids(layout, source)
    ids = ids[:limit] if limit else ids
    image_dir = layout.image_dir(source)
    tasks, damaged = [], []
    for image_id in ids:
        path = layout.cache_path(size, image_id)
        problem = cache_file_problem(path, size) if path.exists() else "absent"
        if problem:
            tasks.append((image_dir, image_id, path, size))
        if problem not in (None, "absent"):
            damaged.append(f"{path}: {problem}")
    if damaged:
        log.warning("rebuilding %d damaged cache file(s) (first: %s)", len(damaged), damaged[0])
    log.info("%s: %d of %d fields to cache at %s in %s", source, len(tasks), len(ids),
             "their own size" if size == NATIVE else f"{size} px", layout.cache_dir(size))
    failures = []
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Inline() as pool:
        for image_id, error in tqdm(pool.map(_cache_task, tasks, chunksize=4), total=len(tasks), desc="cache"):
            if error:
                log.warning("skipped %s", error)
                failures.append((image_id, error))
    return failures


class _Inline:
    """Stand-in for an executor when running in-process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(function, items, chunksize=1):
        return map(function, items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("--size", type=cache_size, default=1024,
                        help=f"side of the cached square fields in px, or {NATIVE!r}: each field at its own size")
    parser.add_argument("--public-data", action="store_true", help="cache public.csv / public/ instead of train")
    parser.add_argument("--test-data", action="store_true", help="cache test.csv / test/ instead of train")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes")
    parser.add_argument("--limit", type=int, default=None, help="only the first N fields (for trials)")
    args = parser.parse_args(argv)
    setup_logging()
    layout = DatasetLayout(args.dataset)
    if not layout.root.is_dir():
        raise UserInputError(f"dataset folder {layout.root} not found")
    source = "public" if args.public_data else "test" if args.test_data else "train"
    failures = cache_dataset(layout, source, args.size, args.workers, args.limit)
    if failures:
        write_csv_atomic(pd.DataFrame(failures, columns=["ID", "error"]), layout.cache_dir(args.size) / f"failed_{source}.csv")
        log.error("%d fields could not be read; see %s", len(failures), layout.cache_dir(args.size) / f"failed_{source}.csv")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
