"""Decoded-image cache: one `.npy` file per field, (size, size, C) uint8, written atomically.

`.npy` loads without decoding and can be memory-mapped, so a crop reads only the rows it needs.
A non-square field is stored with its aspect kept (`images.fit_in_square`: long side = size, zero
padding at the bottom or right). Size NATIVE (`cache_native/`) keeps every field at its own height
and width: the full-resolution copy that cell crops read, for fields of any shape. A damaged file
(empty, truncated, not `.npy`, wrong shape) is found from its header and length: `cache_one` rebuilds
it and `load_field` decodes the field instead, with one warning line.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from src.data.images import RGBY, ImageReadError, fit_in_square, read_field
from src.data.schema import NATIVE, DatasetLayout
from src.utils.io import save_npy_atomic

log = logging.getLogger(__name__)
_warned: set[Path] = set()


def _unreadable(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    # numpy takes a file without the .npy magic string for a pickle; say what it is
    return "not a .npy file (no .npy header)" if "pickle" in text else f"not a readable .npy file ({text})"


def _expected_shape(size: int | tuple[int, int] | str | None) -> tuple[int, int] | None:
    """(height, width) a cache file must hold: (size, size) for a side, the pair as given, None (any)
    for None or NATIVE."""
    if size is None or size == NATIVE:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def _shape_problem(shape: tuple[int, ...], size: int | tuple[int, int] | str | None) -> str | None:
    expected = _expected_shape(size)
    if expected is not None and tuple(shape[:2]) != expected:
        return f"holds a {shape[0]}x{shape[1]} field, not {expected[0]}x{expected[1]}"
    return None


def cache_file_problem(cache_path: str | os.PathLike, size: int | tuple[int, int] | str | None = None) -> str | None:
    """Why a cache file cannot be used, or None: its `.npy` header must parse, describe uint8 (H, W, C)
    data ((H, W) = (size, size), or = size when a pair; any for None or NATIVE), and the file must
    hold exactly the bytes it announces."""
    try:
        with open(cache_path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(handle)
            expected = handle.tell() + int(np.prod(shape)) * dtype.itemsize
            actual = os.fstat(handle.fileno()).st_size
    except (ValueError, OSError, EOFError) as error:
        return _unreadable(error)
    if dtype != np.uint8 or len(shape) != 3 or fortran_order:
        return f"holds {dtype} {shape}, not a (H, W, C) uint8 field"
    wrong_shape = _shape_problem(shape, size)
    if wrong_shape:
        return wrong_shape
    if actual != expected:
        return f"{actual} bytes where its header announces {expected} (truncated or padded)"
    return None


def cache_one(image_dir: str | os.PathLike, image_id: str, cache_path: str | os.PathLike, size: int | str | None,
              channels: Sequence[str] = RGBY) -> bool:
    """Decode, fit to `size` (aspect kept; None or NATIVE: as decoded) and store one field unless a
    sound copy is already cached. Returns True when it wrote the file (a damaged file is rewritten)."""
    cache_path = Path(cache_path)
    if cache_path.is_dir():
        raise ImageReadError(cache_path, "a folder stands where the cache file goes; remove it")
    if cache_path.is_file() and cache_file_problem(cache_path, size) is None:
        return False
    field = read_field(image_dir, image_id, channels=channels)
    if _expected_shape(size) is not None:
        field = fit_in_square(field, size)
    save_npy_atomic(np.ascontiguousarray(field), cache_path)
    return True


def load_cached(cache_path: str | os.PathLike, mmap: bool = False,
                size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Load one cached field; with `mmap` the pixels are read lazily from disk. A damaged file raises
    ImageReadError (with `size`, also a file whose field is not size x size, or not (H, W) for a pair)."""
    try:  # np.load parses the header anyway: no second open on this hot path
        field = np.load(cache_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        problem = None
    except (ValueError, OSError, EOFError) as error:
        problem = _unreadable(error)
    if problem is None and (field.dtype != np.uint8 or field.ndim != 3):
        problem = f"holds {field.dtype} {field.shape}, not a (H, W, C) uint8 field"
    if problem is None:
        problem = _shape_problem(field.shape, size)
    if problem:
        raise ImageReadError(cache_path, f"damaged cache file, {problem}: rerun src.preprocessing.cache_images")
    return field


def _load_or_none(cache_path: Path, size: int | tuple[int, int], mmap: bool = False) -> np.ndarray | None:
    """The cached field, or None when absent or damaged (said once per file and process)."""
    if not cache_path.is_file():
        return None
    try:
        return load_cached(cache_path, mmap=mmap, size=size)
    except ImageReadError as error:
        if cache_path not in _warned:
            _warned.add(cache_path)
            log.warning("%s; decoding the field instead", error)
        return None


def load_field(layout: DatasetLayout, source: str, image_id: str, size: int | None = None,
               channels: Sequence[str] = RGBY) -> np.ndarray:
    """A field at (size, size) (aspect kept, as cached) from the cache when it holds a sound copy, else
    decoded from the channel files; at its own size when `size` is None."""
    if size is not None and tuple(channels) == RGBY:
        cached = _load_or_none(layout.cache_path(size, image_id), size)
        if cached is not None:
            return cached
    field = read_field(layout.image_dir(source), image_id, channels=channels)
    return field if size is None else fit_in_square(field, size)


def load_full_resolution(layout: DatasetLayout, source: str, image_id: str, shape: tuple[int, int],
                         mmap: bool = False) -> np.ndarray:
    """A field at its own (height, width): its `cache_native` copy when present, else the `cache_{side}`
    copy of a square field (with `mmap`, memory-mapped, for reading one crop), else decoded without
    resizing (a non-square field is never squeezed into a square cache)."""
    height, width = shape
    cached = _load_or_none(layout.cache_path(NATIVE, image_id), (height, width), mmap=mmap)
    if cached is not None:
        return cached
    if height == width:
        cached = _load_or_none(layout.cache_path(height, image_id), height, mmap=mmap)
        if cached is not None:
            return cached
    return read_field(layout.image_dir(source), image_id)
