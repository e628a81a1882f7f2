"""On-disk format of the cell bounding-box records (stage 4, `generate_cell_bboxes`), defined once.

One record per image: `{bboxes_dir}/{source}/{ID}.npz`, a zip of `.npy` arrays (deflate-compressed,
fixed timestamps, so the same masks give byte-identical files):

    format_version       int32 ()        RECORD_FORMAT_VERSION
    image_id             str ()          the image ID
    backend              str ()          segmentation backend that made it ('classical', 'hpacellseg')
    cell_mask            uint16 (H, W)   full-resolution cell labels, 0 = background, cell_i + 1 = cell
    boxes                int32 (n, 4)    y0, x0, y1, x1 per cell, full-resolution px, end-exclusive:
                                         the crop of cell_i is field[y0:y1, x0:x1]
    areas                int64 (n,)      pixels of each cell
    alien_offsets        int64 (n + 1,)  alien_flat_indices[alien_offsets[i]:alien_offsets[i + 1]] belong to cell_i
    alien_flat_deltas    int32 (m,)      alien_flat_indices delta-encoded over the whole array
                                         (np.diff(indices, prepend=0); cumsum restores them): 30x smaller
                                         once deflated. alien_flat_indices[alien_offsets[i]:alien_offsets[i+1]]
                                         are the row-major flat indices, relative to cell_i's box, of the
                                         pixels of *other* cells inside that box (ascending)
    border_fractions     float32 (n,)    per cell, the fraction of its outline on the field border
                                         (border_fractions(): pixel sides facing outside the field /
                                         all sides of its pixels that face another label or the outside)

Format 1 records (no border_fractions) stay readable: the fractions are computed from their mask,
which is then decompressed even with load_mask=False.

`cell_i` (0-based, the order of `boxes`, label cell_i + 1 in `cell_mask`) is the cell index used by
every later table (denoising folds, pseudo-labels, selections). An image with no cells has n = 0.
Records are written to a temporary name and renamed, so a record under its final name is always
complete. `{source}/cells.csv` (CELL_TABLE_COLUMNS) indexes every cell of every record for fast
whole-dataset reads; `{source}/failed.csv` (ID,error) lists images that could not be read.
"""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from src.utils.io import atomic_path

RECORD_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
RECORD_SUFFIX = ".npz"
CELL_TABLE_NAME = "cells.csv"
FAILED_TABLE_NAME = "failed.csv"
CELL_TABLE_COLUMNS = ("ID", "cell_i", "y0", "x0", "y1", "x1", "area", "image_height", "image_width",
                      "border_fraction")
_ARRAYS = ("format_version", "image_id", "backend", "cell_mask", "boxes", "areas", "alien_offsets",
           "alien_flat_deltas", "border_fractions")
_ARRAYS_V1 = _ARRAYS[:-1]
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class RecordError(ValueError):
    """A record file that cannot be used (truncated, not a record, wrong version); names the file."""


@dataclass(frozen=True)
class BBoxRecord:
    image_id: str
    cell_mask: np.ndarray | None  # None when read with load_mask=False
    boxes: np.ndarray
    areas: np.ndarray
    alien_offsets: np.ndarray
    alien_flat_indices: np.ndarray
    image_shape: tuple[int, int]
    backend: str = "classical"
    border_fractions: np.ndarray | None = None  # float32 (n,); always set by build_record and read_record

    @property
    def n_cells(self) -> int:
        return int(self.boxes.shape[0])

    def box(self, cell_i: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of cell_i, end-exclusive, full-resolution pixels."""
        return tuple(int(v) for v in self.boxes[cell_i])

    def alien_indices(self, cell_i: int) -> np.ndarray:
        """Box-relative row-major flat indices of the other cells' pixels inside cell_i's box."""
        return self.alien_flat_indices[self.alien_offsets[cell_i]:self.alien_offsets[cell_i + 1]]


def records_dir(bboxes_dir: str | os.PathLike, source: str) -> Path:
    return Path(bboxes_dir) / source


def record_path(bboxes_dir: str | os.PathLike, source: str, image_id: str) -> Path:
    return records_dir(bboxes_dir, source) / f"{image_id}{RECORD_SUFFIX}"


def border_fractions(cell_mask: np.ndarray) -> np.ndarray:
    """Per label 1..max (index 0 = label 1), float32: the fraction of the object's outline that lies
    on the field border. The outline is counted in pixel sides: every side of an object pixel that
    faces a pixel of another label (background or another cell) or the outside of the field; the
    border part is the sides facing the outside. A w x h rectangle against the left edge only: h / (2w + 2h).
    Measured exactly from the mask, unlike the area cut off, which would need a guess of the unseen part."""
    n = int(cell_mask.max()) if cell_mask.size else 0
    outline = np.zeros(n + 1, np.int64)
    for a, b in ((cell_mask[:, :-1], cell_mask[:, 1:]), (cell_mask[:-1, :], cell_mask[1:, :])):
        differ = a != b
        outline += np.bincount(a[differ], minlength=n + 1) + np.bincount(b[differ], minlength=n + 1)
    on_border = np.zeros(n + 1, np.int64)
    if cell_mask.size:
        for edge in (cell_mask[0], cell_mask[-1], cell_mask[:, 0], cell_mask[:, -1]):
            on_border += np.bincount(edge.ravel(), minlength=n + 1)
    total = outline + on_border
    return (on_border[1:] / np.maximum(total[1:], 1)).astype(np.float32)


def border_weights(fractions: np.ndarray, strength: float) -> np.ndarray:
    """Per-cell weights 1 - strength x border fraction, in [0, 1] (strength 0: all 1). A cell cut in
    half by the border has a fraction of about 0.4, a thin sliver about 0.5, an inner cell 0."""
    return np.clip(1.0 - strength * np.asarray(fractions, np.float64), 0.0, 1.0)


def build_record(image_id: str, cell_mask: np.ndarray, backend: str = "classical") -> BBoxRecord:
    """Boxes, areas and alien indices of a full-resolution cell label mask (labels renumbered 1..n
    in their order if they have gaps)."""
    cell_mask = np.ascontiguousarray(cell_mask)
    if cell_mask.ndim != 2:
        raise ValueError(f"cell mask must be 2-D, got shape {cell_mask.shape}")
    if cell_mask.dtype != np.uint16:
        if cell_mask.size and (cell_mask.min() < 0 or cell_mask.max() > np.iinfo(np.uint16).max):
            raise ValueError("cell labels must fit in uint16")
        cell_mask = cell_mask.astype(np.uint16)
    present = np.unique(cell_mask)
    present = present[present > 0]
    if present.size and present[-1] != present.size:
        lookup = np.zeros(int(present[-1]) + 1, np.uint16)
        lookup[present] = np.arange(1, present.size + 1, dtype=np.uint16)
        cell_mask = lookup[cell_mask]
    n = int(present.size)
    boxes = np.zeros((n, 4), np.int32)
    offsets = np.zeros(n + 1, np.int64)
    aliens = []
    for cell_i, window in enumerate(ndi.find_objects(cell_mask)):
        boxes[cell_i] = (window[0].start, window[1].start, window[0].stop, window[1].stop)
        crop = cell_mask[window]
        alien = np.flatnonzero((crop != 0) & (crop != cell_i + 1)).astype(np.int32)
        aliens.append(alien)
        offsets[cell_i + 1] = offsets[cell_i] + alien.size
    areas = np.bincount(cell_mask.ravel(), minlength=n + 1)[1:].astype(np.int64)
    flat = np.concatenate(aliens) if aliens else np.zeros(0, np.int32)
    return BBoxRecord(image_id=image_id, cell_mask=cell_mask, boxes=boxes, areas=areas, alien_offsets=offsets,
                      alien_flat_indices=flat, image_shape=tuple(cell_mask.shape), backend=backend,
                      border_fractions=border_fractions(cell_mask))


def write_record(path: str | os.PathLike, record: BBoxRecord, compresslevel: int = 6) -> None:
    """Write a record atomically: a partial file never exists under `path`."""
    if record.cell_mask is None:
        raise ValueError("cannot write a record read without its mask")
    arrays = {"format_version": np.int32(RECORD_FORMAT_VERSION), "image_id": np.str_(record.image_id),
              "backend": np.str_(record.backend), "cell_mask": record.cell_mask, "boxes": record.boxes,
              "areas": record.areas, "alien_offsets": record.alien_offsets,
              "alien_flat_deltas": np.diff(record.alien_flat_indices.astype(np.int64), prepend=0).astype(np.int32),
              "border_fractions": (record.border_fractions if record.border_fractions is not None
                                   else border_fractions(record.cell_mask)).astype(np.float32)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as archive:
                for name in _ARRAYS:
                    buffer = io.BytesIO()
                    np.lib.format.write_array(buffer, np.asarray(arrays[name]), allow_pickle=False)
                    info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
                    archive.writestr(info, buffer.getbuffer(), compress_type=zipfile.ZIP_DEFLATED,
                                     compresslevel=compresslevel)
            handle.flush()
            os.fsync(handle.fileno())


def read_record(path: str | os.PathLike, load_mask: bool = True) -> BBoxRecord:
    """Read one record; with load_mask=False the (large) cell mask is not decompressed."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # else np.load would try it as .npy or a pickle
        raise RecordError(f"{path}: not a bbox record (not a zip archive: empty, truncated or another kind of file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            present = {name[:-4] for name in data.zip.namelist()}
            missing = set(_ARRAYS_V1) - present
            if missing:
                raise RecordError(f"{path}: not a bbox record (missing {sorted(missing)})")
            version = int(data["format_version"])
            if version not in READABLE_FORMAT_VERSIONS or (version >= 2) != ("border_fractions" in present):
                raise RecordError(f"{path}: record format {version}, this code reads {READABLE_FORMAT_VERSIONS}; "
                                  "delete the folder's records and rerun generate_cell_bboxes")
            old = version == 1
            cell_mask = data["cell_mask"] if load_mask or old else None
            fractions = border_fractions(cell_mask) if old else data["border_fractions"]
            shape = cell_mask.shape if cell_mask is not None else _npy_shape(data.zip, "cell_mask.npy")
            cell_mask = cell_mask if load_mask else None
            return BBoxRecord(image_id=str(data["image_id"]), cell_mask=cell_mask, boxes=data["boxes"],
                              areas=data["areas"], alien_offsets=data["alien_offsets"],
                              alien_flat_indices=np.cumsum(data["alien_flat_deltas"], dtype=np.int64).astype(np.int32),
                              image_shape=tuple(shape),
                              backend=str(data["backend"]), border_fractions=fractions)
    except (RecordError, FileNotFoundError):
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
        raise RecordError(f"{path}: unreadable record ({error})") from None


def _npy_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(handle)
    return shape


def list_record_ids(directory: str | os.PathLike) -> list[str]:
    """IDs of the complete records in one source folder, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name[:-len(RECORD_SUFFIX)] for p in directory.iterdir()
                  if p.name.endswith(RECORD_SUFFIX) and not p.name.startswith("."))


def iter_records(directory: str | os.PathLike, load_mask: bool = False) -> Iterator[BBoxRecord]:
    """Every record of one source folder, in ID order (masks skipped unless asked for)."""
    for image_id in list_record_ids(directory):
        yield read_record(Path(directory) / f"{image_id}{RECORD_SUFFIX}", load_mask=load_mask)


def build_cell_table(directory: str | os.PathLike) -> pd.DataFrame:
    """One row per cell of every record in the folder (CELL_TABLE_COLUMNS), read without the masks."""
    parts = []
    for record in iter_records(directory, load_mask=False):
        n = record.n_cells
        boxes = record.boxes.astype(np.int64)
        parts.append(pd.DataFrame({
            "ID": [record.image_id] * n, "cell_i": np.arange(n, dtype=np.int64),
            "y0": boxes[:, 0], "x0": boxes[:, 1], "y1": boxes[:, 2], "x1": boxes[:, 3],
            "area": record.areas.astype(np.int64), "image_height": np.full(n, record.image_shape[0], np.int64),
            "image_width": np.full(n, record.image_shape[1], np.int64),
            "border_fraction": record.border_fractions.astype(np.float64)}))
    if not parts:
        dtypes = {"ID": "object", "border_fraction": "float64"}
        return pd.DataFrame({name: pd.Series(dtype=dtypes.get(name, "int64")) for name in CELL_TABLE_COLUMNS})
    return pd.concat(parts, ignore_index=True)[list(CELL_TABLE_COLUMNS)]


def read_cell_table(directory: str | os.PathLike) -> pd.DataFrame:
    """The `cells.csv` index of one source folder (written by generate_cell_bboxes at the end of each
    run), CELL_TABLE_COLUMNS. A table written before `border_fraction` existed is rebuilt from the
    records (in memory; the file is left as it is)."""
    path = Path(directory) / CELL_TABLE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run python -m src.preprocessing.generate_cell_bboxes first")
    table = pd.read_csv(path, dtype={"ID": str})
    if "border_fraction" not in table.columns:
        return build_cell_table(directory)
    return table


def _sample_grid(start: int, stop: int, factor: float, limit: int) -> np.ndarray:
    """Record-resolution indices sampled (nearest) at field pixels start..stop-1; factor = field / record px."""
    return np.clip(((np.arange(start, stop) + 0.5) / factor).astype(np.int64), 0, limit - 1)


def cell_crop_mask(record: BBoxRecord, cell_i: int, field_shape: tuple[int, int] | None = None
                   ) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """(box, labels): the box of cell_i in field pixels and the record's labels sampled on it.

    `field_shape` (height, width) may differ from the record's (a downscaled cache): the box is
    scaled outward to whole pixels and the labels are sampled with nearest neighbour.
    """
    if record.cell_mask is None:
        raise ValueError("record was read without its mask (load_mask=False)")
    y0, x0, y1, x1 = record.box(cell_i)
    height, width = record.image_shape
    if field_shape is None or tuple(field_shape) == (height, width):
        return (y0, x0, y1, x1), record.cell_mask[y0:y1, x0:x1]
    fy, fx = field_shape[0] / height, field_shape[1] / width
    if field_shape[0] == field_shape[1] and height != width:  # the aspect-kept square (images.fit_in_square)
        fy = fx = field_shape[0] / max(height, width)
    box = (int(np.floor(y0 * fy)), int(np.floor(x0 * fx)),
           min(int(np.ceil(y1 * fy)), field_shape[0]), min(int(np.ceil(x1 * fx)), field_shape[1]))
    rows = _sample_grid(box[0], box[2], fy, height)
    cols = _sample_grid(box[1], box[3], fx, width)
    return box, record.cell_mask[np.ix_(rows, cols)]


def masked_crop(field: np.ndarray, record: BBoxRecord, cell_i: int, zero_background: bool = False) -> np.ndarray:
    """The crop of cell_i from `field` ((H, W) or (H, W, C)) with other cells' pixels set to 0, and
    with `zero_background` also every pixel outside the cell. A field at the record's resolution
    uses the stored alien indices (no mask needed); another resolution samples the mask."""
    if not 0 <= cell_i < record.n_cells:
        raise IndexError(f"cell_i {cell_i} out of range for {record.image_id} ({record.n_cells} cells)")
    same_size = tuple(field.shape[:2]) == tuple(record.image_shape)
    if same_size and not zero_background:
        y0, x0, y1, x1 = record.box(cell_i)
        crop = np.array(field[y0:y1, x0:x1], copy=True)
        flat = crop.reshape((y1 - y0) * (x1 - x0), -1)
        flat[record.alien_indices(cell_i)] = 0
        return crop
    (y0, x0, y1, x1), labels = cell_crop_mask(record, cell_i, field.shape[:2])
    crop = np.array(field[y0:y1, x0:x1], copy=True)
    drop = labels != cell_i + 1 if zero_background else (labels != 0) & (labels != cell_i + 1)
    crop[drop] = 0
    return crop
