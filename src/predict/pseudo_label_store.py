"""The per-cell pseudo-label HDF5 (schema.PSEUDO_LABEL_DATASETS): part files, unify, readers.

Prediction writes *part files* `{final}.parts/{shard}-{k:05d}.h5`, each holding whole images and
each written under a temporary name then renamed, so a killed run leaves only complete parts; a
rerun skips the images found in them. `unify` merges the parts into the one final file (chunked,
compressed, rows of an image contiguous, `images` index with each image's first row and count),
again through a temporary name. An image with no cell has no rows but is in the index with count 0,
so it is stored as predicted (not lost), and counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from src.data.classes import NUM_CLASSES
from src.utils.io import atomic_path

ID_DTYPE = "S64"
SOURCE_CODES = {"train": 0, "public": 1, "test": 2}
ROW_CHUNK = 1024  # rows per HDF5 chunk: one image's rows usually sit in one or two chunks
EMPTY_IMAGES = "empty_image_id"  # part files: IDs of images whose record has no cell (index count 0)


@dataclass
class CellRows:
    """Rows of one or more whole images, in the on-disk column layout."""

    image_id: np.ndarray     # (N,) S64
    cell_i: np.ndarray       # (N,) int32
    source: np.ndarray       # (N,) uint8
    fold: np.ndarray         # (N,) int8
    predictions: np.ndarray  # (N, 19) float16
    embeddings: np.ndarray   # (N, D) float16

    @classmethod
    def concat(cls, parts: list["CellRows"]) -> "CellRows":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.image_id)


def encode_ids(image_ids) -> np.ndarray:
    encoded = np.array([str(i).encode() for i in image_ids], dtype=object)
    if any(len(i) > 64 for i in encoded):
        raise ValueError("image IDs longer than 64 bytes are not supported by the pseudo-label file")
    return encoded.astype(ID_DTYPE)


def parts_dir(final_path: str | os.PathLike) -> Path:
    final_path = Path(final_path)
    return final_path.with_name(final_path.name + ".parts")


def write_part(final_path: str | os.PathLike, shard: str, rows: CellRows, empty_images=()) -> Path:
    """Write one complete part file atomically (with the IDs of images that have no cell); returns its path."""
    folder = parts_dir(final_path)
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.glob(f"{shard}-*.h5")))
    path = folder / f"{shard}-{index:05d}.h5"
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            for name in CellRows.__dataclass_fields__:
                handle.create_dataset(name, data=getattr(rows, name))
            handle.create_dataset(EMPTY_IMAGES, data=encode_ids(empty_images), dtype=ID_DTYPE)
    return path


def read_rows(path: str | os.PathLike) -> CellRows:
    with h5py.File(path, "r") as handle:
        return CellRows(*(handle[name][...] for name in CellRows.__dataclass_fields__))


def _empty_images(handle: h5py.File) -> np.ndarray:
    """IDs (S64) of the images stored with no cell: count 0 in a final file's index, or a part's list."""
    if "images/count" in handle:
        return handle["images/image_id"][...][handle["images/count"][...] == 0]
    return handle[EMPTY_IMAGES][...] if EMPTY_IMAGES in handle else np.zeros(0, ID_DTYPE)


def committed_images(final_path: str | os.PathLike) -> set[str]:
    """IDs of the images already stored in the final file or in complete part files."""
    done: set[str] = set()
    final_path = Path(final_path)
    if final_path.is_file():
        with h5py.File(final_path, "r") as handle:
            done |= {i.decode() for i in handle["images/image_id"][...]}
    for part in sorted(parts_dir(final_path).glob("*.h5")):
        with h5py.File(part, "r") as handle:
            done |= {i.decode() for i in np.unique(handle["image_id"][...])}
            done |= {i.decode() for i in _empty_images(handle)}
    return done


def unify(final_path: str | os.PathLike, compression: str | None = "gzip") -> int:
    """Merge the part files (and an existing final file) into the final file; returns its row count.

    Streams one source at a time, so memory holds one part. An image stored twice keeps its first copy.
    """
    final_path = Path(final_path)
    parts = sorted(parts_dir(final_path).glob("*.h5"))
    sources = ([final_path] if final_path.is_file() else []) + parts
    if not sources:
        raise FileNotFoundError(f"no pseudo-label parts for {final_path}")
    seen: set[bytes] = set()
    image_ids, starts, counts = [], [], []
    total = 0
    with atomic_path(final_path) as tmp:
        with h5py.File(tmp, "w") as handle:
            for source in sources:
                rows = read_rows(source)
                run_starts, run_counts = _runs(rows.image_id)
                keep = np.zeros(len(rows), bool)
                next_row = total
                for start, count in zip(run_starts, run_counts):
                    if rows.image_id[start] not in seen:
                        seen.add(rows.image_id[start])
                        keep[start:start + count] = True
                        image_ids.append(rows.image_id[start])
                        starts.append(next_row)
                        counts.append(int(count))
                        next_row += int(count)
                _append(handle, rows, keep, compression)
                total += int(keep.sum())
                with h5py.File(source, "r") as source_handle:
                    empty = _empty_images(source_handle)
                for image_id in empty:
                    if image_id not in seen:
                        seen.add(image_id)
                        image_ids.append(image_id)
                        starts.append(total)
                        counts.append(0)
            if "image_id" not in handle:  # not one cell in any image
                for name in CellRows.__dataclass_fields__:
                    handle.create_dataset(name, data=getattr(rows, name)[:0])
            handle.create_dataset("images/image_id", data=np.array(image_ids, dtype=ID_DTYPE))
            handle.create_dataset("images/start", data=np.array(starts, dtype=np.int64))
            handle.create_dataset("images/count", data=np.array(counts, dtype=np.int32))
            handle.attrs["num_classes"] = NUM_CLASSES
    for part in parts:
        part.unlink()
    if parts_dir(final_path).is_dir() and not any(parts_dir(final_path).iterdir()):
        parts_dir(final_path).rmdir()
    return total


def _append(handle: h5py.File, rows: CellRows, keep: np.ndarray, compression: str | None) -> None:
    if not keep.any():
        return  # a part of images with no cell may not know the embedding width: add nothing
    for name in CellRows.__dataclass_fields__:
        data = getattr(rows, name)[keep]
        if name not in handle:
            handle.create_dataset(name, shape=(0,) + data.shape[1:], maxshape=(None,) + data.shape[1:],
                                  dtype=data.dtype, chunks=(ROW_CHUNK,) + data.shape[1:],
                                  compression=compression)
        dataset = handle[name]
        dataset.resize(dataset.shape[0] + len(data), axis=0)
        dataset[dataset.shape[0] - len(data):] = data


def _runs(image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(image_ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    change = np.flatnonzero(image_ids[1:] != image_ids[:-1]) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [len(image_ids)]]))
    return starts, counts


class PseudoLabels:
    """Reader of the unified file: one image's rows or one fold's rows without loading everything."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.handle = h5py.File(self.path, "r")
        ids = self.handle["images/image_id"][...]
        self.image_index = {i.decode(): (int(s), int(c)) for i, s, c in
                            zip(ids, self.handle["images/start"][...], self.handle["images/count"][...])}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def __len__(self) -> int:
        return self.handle["image_id"].shape[0]

    def image(self, image_id: str, columns=("cell_i", "predictions", "embeddings")) -> dict[str, np.ndarray]:
        start, count = self.image_index[image_id]
        return {name: self.handle[name][start:start + count] for name in columns}

    def rows(self, row_indices: np.ndarray, columns=("image_id", "cell_i", "predictions", "embeddings")) -> dict:
        """Selected rows (sorted indices are read chunk-wise by h5py)."""
        row_indices = np.sort(np.asarray(row_indices))
        return {name: self.handle[name][row_indices] for name in columns}

    def fold_rows(self, fold: int, columns=("image_id", "cell_i", "predictions", "embeddings")) -> dict:
        return self.rows(np.flatnonzero(self.handle["fold"][...] == fold), columns)

    def column(self, name: str) -> np.ndarray:
        return self.handle[name][...]
