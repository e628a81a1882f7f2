"""Model inputs for single cells: masked crops at the image-level model's scale, tiled; TTA views.

The image-level model saw whole fields resized to `img_size`. A cell is shown to it at that same
scale: its crop is cut from the field resized to `img_size` (other cells' pixels zeroed), then
repeated side by side to fill the square input, so the model sees a field-like texture of one cell.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch

from src.data.bbox_records import BBoxRecord, masked_crop

TTA_VIEWS = ("identity", "flip_v", "flip_h", "rot90")
EXTRA_TTA_VIEWS = ("scale_shift",)  # zoom 1.1x on a window shifted off-centre (cell-level inference)


def tile_to_square(crop: np.ndarray, size: int) -> np.ndarray:
    """Repeat an (h, w, C) crop to fill a (size, size, C) square; a crop larger than `size` is shrunk
    (aspect kept) to fit first."""
    height, width = crop.shape[:2]
    if height == 0 or width == 0:
        return np.zeros((size, size, crop.shape[2]), crop.dtype)
    if max(height, width) > size:
        factor = size / max(height, width)
        height, width = max(1, round(height * factor)), max(1, round(width * factor))
        crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA).reshape(height, width, -1)
    reps = (math.ceil(size / height), math.ceil(size / width), 1)
    return np.tile(crop, reps)[:size, :size]


CROP_REFERENCE = 200.0  # grey level each channel's 99th percentile over a cell input's lit pixels is scaled to


def normalise_channels(image: np.ndarray) -> np.ndarray:
    """(h, w, C) uint8 with each channel scaled so that the 99th percentile of its non-zero pixels
    becomes CROP_REFERENCE (clipped at 255); an all-zero channel stays zero. A dim cell of a dim field
    and a bright one then look alike to the cell-level model: its patterns, not the field's gain."""
    out = np.empty_like(image)
    levels = np.arange(256, dtype=np.float32)
    for channel in range(image.shape[2]):
        plane = image[..., channel]
        counts = np.bincount(plane.ravel(), minlength=256)[1:]  # lit grey levels 1..255 (a hot path: no sort)
        if not counts.any():
            out[..., channel] = 0
            continue
        # np.percentile(lit, 99) (linear) from the sorted order statistics that the counts give
        position = 0.99 * (counts.sum() - 1)
        below = int(np.floor(position))
        ranks = np.cumsum(counts)
        low, high = np.searchsorted(ranks, [below + 1, below + 2]) + 1
        high = high if below + 1 < counts.sum() else low
        percentile = low + (position - below) * (high - low)
        lookup = np.clip(np.rint(levels * np.float32(CROP_REFERENCE / max(float(percentile), 1.0))), 0, 255)
        out[..., channel] = lookup.astype(np.uint8)[plane]
    return out


def cellwise_input(crop: np.ndarray, size: int) -> np.ndarray:
    """Cell-level model input (size, size, C) from a masked cell crop (h, w, C) at full resolution.

    A crop whose short side is under half its long side is repeated along the short side (so thin
    cells fill more of the input), then zero-padded to a centred square, resized to `size` and each
    channel scaled by `normalise_channels`.
    """
    height, width = crop.shape[:2]
    if min(height, width) * 2 < max(height, width):
        repeats = max(height, width) // max(min(height, width), 1)
        crop = np.tile(crop, (repeats, 1, 1) if height < width else (1, repeats, 1))
        height, width = crop.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, crop.shape[2]), crop.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = crop
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return normalise_channels(cv2.resize(square, (size, size), interpolation=interpolation).reshape(size, size, -1))


def cell_inputs(field_at_model_scale: np.ndarray, record: BBoxRecord, size: int,
                cells: Sequence[int] | None = None) -> np.ndarray:
    """(n, C, size, size) uint8 inputs for the cells of one record.

    field_at_model_scale : the field resized to the model's input side (H, W, C); the record's boxes
        and masks are mapped onto it (nearest neighbour), so the crops carry the training scale.
    """
    cells = range(record.n_cells) if cells is None else cells
    channels = field_at_model_scale.shape[2]
    inputs = np.zeros((len(cells), channels, size, size), np.uint8)
    for row, cell_i in enumerate(cells):
        crop = masked_crop(field_at_model_scale, record, cell_i)
        inputs[row] = tile_to_square(crop, size).transpose(2, 0, 1)
    return inputs


def tta_view(batch: torch.Tensor, view: str) -> torch.Tensor:
    """One test-time view of an (N, C, H, W) batch."""
    if view == "identity":
        return batch
    if view == "flip_v":
        return torch.flip(batch, dims=(2,))
    if view == "flip_h":
        return torch.flip(batch, dims=(3,))
    if view == "rot90":
        return torch.rot90(batch, k=1, dims=(2, 3))
    if view == "scale_shift":
        height, width = batch.shape[2:]
        window_h, window_w = round(height / 1.1), round(width / 1.1)
        top, left = (height - window_h) // 3, (width - window_w) // 3
        window = batch[:, :, top:top + window_h, left:left + window_w]
        window = window.float() / 255.0 if batch.dtype == torch.uint8 else window
        return torch.nn.functional.interpolate(window, size=(height, width), mode="bilinear", align_corners=False)
    raise ValueError(f"unknown TTA view {view!r}; known: {', '.join(TTA_VIEWS + EXTRA_TTA_VIEWS)}")


@torch.no_grad()
def predict_views(model: torch.nn.Module, batch: torch.Tensor, views: Sequence[str],
                  amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid (N, classes) and mean embedding (N, D) over the TTA views, in float32."""
    probabilities, embeddings = 0.0, 0.0
    for view in views:
        with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, embedding = model(tta_view(batch, view), return_embedding=True)
        probabilities = probabilities + torch.sigmoid(logits.float())
        embeddings = embeddings + embedding.float()
    return probabilities / len(views), embeddings / len(views)
