"""Decoded-image cache: one `.npy` file per field, (size, size, C) uint8, written atomically.

`.npy` loads without decoding and can be memory-mapped, so a crop reads only the rows it needs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from src.data.images import RGBY, read_field
from src.data.schema import DatasetLayout
from src.utils.io import save_npy_atomic


def cache_one(image_dir: str | os.PathLike, image_id: str, cache_path: str | os.PathLike, size: int | None,
              channels: Sequence[str] = RGBY) -> bool:
    """Decode, resize and store one field unless already cached. Returns True when it wrote the file."""
    cache_path = Path(cache_path)
    if cache_path.is_file():
        return False
    field = read_field(image_dir, image_id, channels=channels, size=size)
    save_npy_atomic(np.ascontiguousarray(field), cache_path)
    return True


def load_cached(cache_path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Load one cached field; with `mmap` the pixels are read lazily from disk."""
    return np.load(cache_path, mmap_mode="r" if mmap else None)


def load_field(layout: DatasetLayout, source: str, image_id: str, size: int | None = None,
               channels: Sequence[str] = RGBY) -> np.ndarray:
    """A field from the cache of this size when it holds it, else decoded from the channel files."""
    if size is not None and tuple(channels) == RGBY:
        cache_path = layout.cache_path(size, image_id)
        if cache_path.is_file():
            return load_cached(cache_path)
    return read_field(layout.image_dir(source), image_id, channels=channels, size=size)


def load_full_resolution(layout: DatasetLayout, source: str, image_id: str, shape: tuple[int, int],
                         mmap: bool = False) -> np.ndarray:
    """A field at its own (height, width): the `cache_{side}` copy of a square field when present (with
    `mmap`, memory-mapped, for reading one crop), else decoded without resizing (a non-square field is
    never squeezed into a square cache)."""
    height, width = shape
    if height == width and layout.cache_path(height, image_id).is_file():
        return load_cached(layout.cache_path(height, image_id), mmap=mmap)
    return read_field(layout.image_dir(source), image_id)
