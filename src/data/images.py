"""Reading one microscopy field as an (H, W, C) uint8 array from per-channel files.

Files are named `{image_dir}/{ID}_{channel}.{ext}` with ext one of png, tif, tiff, jpg, jpeg
(searched in that order). 8-bit data is used as is; 16-bit data is scaled to 8 bits by
round(value / 257) so that 65535 maps to 255. A colour file for one channel (some public JPGs)
is reduced to one plane by the maximum over its colour planes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

RGBY: tuple[str, ...] = ("red", "green", "blue", "yellow")
EXTENSIONS: tuple[str, ...] = ("png", "tif", "tiff", "jpg", "jpeg")


class ImageReadError(Exception):
    """A channel file is missing, empty, truncated or not an image. `path` names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def channel_path(image_dir: str | os.PathLike, image_id: str, channel: str) -> Path:
    """The existing file for one channel, trying each known extension; raises ImageReadError."""
    image_dir = Path(image_dir)
    for ext in EXTENSIONS:
        candidate = image_dir / f"{image_id}_{channel}.{ext}"
        if candidate.is_file():
            return candidate
    raise ImageReadError(image_dir / f"{image_id}_{channel}.png",
                         f"missing (no {image_id}_{channel}.{{{','.join(EXTENSIONS)}}})")


def check_field_files(image_dir: str | os.PathLike, image_id: str, channels: Sequence[str] = RGBY) -> None:
    """Raise ImageReadError unless every channel file of the field exists and is not empty (no decoding)."""
    for channel in channels:
        path = channel_path(image_dir, image_id, channel)
        if path.stat().st_size == 0:
            raise ImageReadError(path, "zero-byte file")


def to_uint8(plane: np.ndarray) -> np.ndarray:
    """uint8 unchanged; uint16 -> round(x / 257); float in [0, 1] -> round(x * 255)."""
    if plane.dtype == np.uint8:
        return plane
    if plane.dtype == np.uint16:
        return ((plane.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    if np.issubdtype(plane.dtype, np.floating):
        return np.clip(np.rint(plane * 255.0), 0, 255).astype(np.uint8)
    raise TypeError(f"unsupported pixel type {plane.dtype}")


def read_channel(path: str | os.PathLike) -> np.ndarray:
    """One channel file -> (H, W) uint8. Raises ImageReadError for empty, truncated or unreadable files."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "missing") from None
    if size == 0:
        raise ImageReadError(path, "zero-byte file")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        # OpenCV decodes a truncated JPEG silently (grey bottom rows); a complete one ends with EOI.
        with open(path, "rb") as handle:
            handle.seek(-2, os.SEEK_END)
            if handle.read(2) != b"\xff\xd9":
                raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
    plane = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if plane is None:
        raise ImageReadError(path, "truncated or not a readable image")
    if plane.ndim == 3:
        plane = plane.max(axis=2)
    return to_uint8(plane)


def read_field(image_dir: str | os.PathLike, image_id: str, channels: Sequence[str] = RGBY,
               size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read the channels of one field into an (H, W, len(channels)) uint8 array.

    Parameters
    ----------
    image_dir : folder with `{image_id}_{channel}.{ext}` files.
    channels : channel names in output order (RGBY by default; any number).
    size : optional output size in pixels, an int for a square or (height, width); area interpolation.
    """
    planes = []
    for channel in channels:
        plane = read_channel(channel_path(image_dir, image_id, channel))
        if planes and plane.shape != planes[0].shape:
            raise ImageReadError(channel_path(image_dir, image_id, channel),
                                 f"shape {plane.shape} differs from the first channel's {planes[0].shape}")
        planes.append(plane)
    field = np.stack(planes, axis=-1)
    if size is not None:
        field = resize_field(field, size)
    return field


def resize_field(field: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) array to `size` (int or (height, width)); area interpolation when shrinking."""
    height, width = (size, size) if isinstance(size, int) else size
    if field.shape[:2] == (height, width):
        return field
    shrinking = height <= field.shape[0] and width <= field.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    channels = field.shape[2]
    # cv2.resize handles at most 4 channels per call reliably; do larger stacks in groups.
    parts = [cv2.resize(np.ascontiguousarray(field[..., i:i + 4]), (width, height), interpolation=interpolation)
             for i in range(0, channels, 4)]
    parts = [p[..., None] if p.ndim == 2 else p for p in parts]
    return np.concatenate(parts, axis=-1)


def fit_in_square(field: np.ndarray, size: int) -> np.ndarray:
    """(size, size, C): the field scaled by one factor so that its long side is `size`, at the top left
    of a zero square, so a non-square field keeps its aspect. A square field is simply resized."""
    height, width = field.shape[:2]
    if height == width:
        return resize_field(field, size)
    scale = size / max(height, width)
    inner = resize_field(field, (max(1, round(height * scale)), max(1, round(width * scale))))
    square = np.zeros((size, size) + field.shape[2:], field.dtype)
    square[:inner.shape[0], :inner.shape[1]] = inner
    return square


def write_channel(path: str | os.PathLike, plane: np.ndarray) -> None:
    """Write one (H, W) uint8/uint16 plane; the format follows the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), plane):
        raise ImageReadError(path, "could not be written")
