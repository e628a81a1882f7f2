"""Find duplicate fields by perceptual hashes of their red, green and blue channels.

    python -m src.preprocessing.bestfitting_duplicates_search --dataset input/synthetic [--public-data]

Each channel gets a 64-bit pHash (imagehash.phash, DCT of a 32x32 downscale). Two fields are a
pair when, for one of the 8 flips/rotations of the second field, all three channel hashes are
within Hamming distance `--max-distance` (12) of the first's. Writes `duplicates.csv`
(ID_a,ID_b,transform,dist_red,dist_green,dist_blue; ID_a < ID_b; `transform` turns ID_b into ID_a).
`create_imagelevel_folds --drop-duplicates` then keeps one field of each group.
"""
from __future__ import annotations

import argparse
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from src.data.cache import load_field
from src.data.images import ImageReadError
from src.data.labels import LabelTableError, read_csv_table, read_label_tables
from src.data.schema import DUPLICATES_COLUMNS, DatasetLayout
from src.utils.io import run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)
HASHED_CHANNELS = 3  # red, green, blue of the RGBY field
# Dihedral transforms of an (H, W) array, and the index of each one's inverse in this tuple.
TRANSFORMS = {
    "identity": lambda a: a, "rot90": lambda a: np.rot90(a, 1), "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3), "flip_lr": np.fliplr, "flip_ud": np.flipud,
    "transpose": lambda a: a.T, "anti_transpose": lambda a: np.rot90(a, 2).T,
}
TRANSFORM_NAMES = tuple(TRANSFORMS)
INVERSE = {"rot90": "rot270", "rot270": "rot90"}


def channel_hashes(field: np.ndarray) -> np.ndarray:
    """(8, 3, 8) uint8: per dihedral transform, the packed 64-bit pHash of each of the R, G, B planes."""
    codes = np.zeros((len(TRANSFORMS), HASHED_CHANNELS, 8), dtype=np.uint8)
    for t, transform in enumerate(TRANSFORMS.values()):
        for c in range(HASHED_CHANNELS):
            bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(transform(field[..., c])))).hash
            codes[t, c] = np.packbits(bits.reshape(-1))
    return codes


def find_pairs(image_ids: list[str], codes: np.ndarray, max_distance: int = 12) -> pd.DataFrame:
    """Pairs whose three channel hashes are all within `max_distance` under some transform.

    codes: (N, 8, 3, 8) from `channel_hashes`. A binary index over the identity hashes is queried with
    every transform of every field (radius 3 * max_distance on the concatenated 192 bits), then each
    channel's distance is checked.
    """
    count = len(image_ids)
    if count < 2:
        return pd.DataFrame(columns=list(DUPLICATES_COLUMNS))
    database = np.ascontiguousarray(codes[:, 0].reshape(count, -1))
    index = faiss.IndexBinaryFlat(database.shape[1] * 8)
    index.add(database)
    best: dict[tuple[int, int], tuple] = {}
    for t, name in enumerate(TRANSFORM_NAMES):
        queries = np.ascontiguousarray(codes[:, t].reshape(count, -1))
        limits, _, matches = index.range_search(queries, HASHED_CHANNELS * max_distance + 1)
        for query in range(count):
            for match in matches[limits[query]:limits[query + 1]]:
                if match == query:
                    continue
                per_channel = np.bitwise_count(codes[query, t] ^ codes[match, 0]).sum(axis=1)
                if per_channel.max() > max_distance:
                    continue
                # `name` turns field `query` into field `match`.
                if image_ids[match] < image_ids[query]:
                    key, transform = (match, query), name
                else:
                    key, transform = (query, match), INVERSE.get(name, name)
                if key not in best or per_channel.sum() < sum(best[key][1]):
                    best[key] = (transform, tuple(int(d) for d in per_channel))
    rows = [(image_ids[a], image_ids[b], transform, *dists) for (a, b), (transform, dists) in sorted(best.items())]
    return pd.DataFrame(rows, columns=list(DUPLICATES_COLUMNS)).sort_values(["ID_a", "ID_b"], ignore_index=True)


def read_duplicates(path: str | Path) -> pd.DataFrame:
    """duplicates.csv, checked like every input table (LabelTableError naming the file and line)."""
    pairs = read_csv_table(path, DUPLICATES_COLUMNS, what="duplicates table")
    try:
        return pairs.astype({name: np.int64 for name in DUPLICATES_COLUMNS[3:]})
    except ValueError as error:
        raise LabelTableError(f"{path}: a distance is not an integer ({error})") from None


def ids_to_drop(pairs: pd.DataFrame) -> set[str]:
    """All IDs of each connected group of duplicates except its smallest ID."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in zip(pairs["ID_a"], pairs["ID_b"]):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {node for node in parent if root(node) != node}


def _hash_task(args: tuple) -> tuple[str, np.ndarray | None, str | None]:
    layout, source, image_id, size = args
    try:
        return image_id, channel_hashes(load_field(layout, source, image_id, size)), None
    except ImageReadError as error:
        return image_id, None, str(error)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("--public-data", action="store_true", help="also hash public.csv / public/")
    parser.add_argument("--max-distance", type=int, default=12, help="largest Hamming distance per channel")
    parser.add_argument("--size", type=int, default=256,
                        help="fields are read at this size (a cache of this size is used when present)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default=None, help="output CSV (default: <dataset>/duplicates.csv)")
    args = parser.parse_args(argv)
    setup_logging()
    layout = DatasetLayout(args.dataset)
    table = read_label_tables(layout.train_csv, layout.public_csv if args.public_data else None)
    tasks = [(layout, source, image_id, args.size) for image_id, source in zip(table["ID"], table["source"])]
    ids, codes, failed = [], [], []
    with ProcessPoolExecutor(args.workers) as pool:
        for image_id, image_codes, error in tqdm(pool.map(_hash_task, tasks, chunksize=8), total=len(tasks), desc="hash"):
            if error:
                log.warning("skipped %s", error)
                failed.append(image_id)
            else:
                ids.append(image_id)
                codes.append(image_codes)
    pairs = find_pairs(ids, np.stack(codes) if codes else np.zeros((0, 8, 3, 8), np.uint8), args.max_distance)
    out = args.out or layout.duplicates_csv
    write_csv_atomic(pairs, out)
    log.info("wrote %s: %d pairs among %d fields (%d unreadable)", out, len(pairs), len(ids), len(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
