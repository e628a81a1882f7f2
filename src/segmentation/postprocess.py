"""Label-mask clean-up shared by every segmentation backend (the reference's fixes and more).

All functions take and return uint16 label masks (0 = background, objects 1..n) and never change
the mask in place. Areas are in pixels of the mask they are given; fractions are relative to the
image's own median object area, so the same setting works at 512, 1728, 2048 or 3072 px.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi


def object_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel count of each label 1..labels.max() (index 0 of the result = label 1)."""
    return np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)[1:]


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the labels present to 1..n, keeping their order; uint16."""
    present = np.unique(labels)
    present = present[present > 0]
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    lookup[present] = np.arange(1, present.size + 1, dtype=np.uint16)
    return lookup[labels]


def keep_labels(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Zero the labels whose entry of `keep` (bool, index 0 = label 1) is False, then renumber 1..n."""
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint16)
    return lookup[labels]


def drop_small_relative(labels: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop objects smaller than `min_fraction` x the median object area of this mask (reference fix 1).

    A fixed pixel threshold removes real nuclei of small or downscaled fields and keeps debris in
    large ones; the image's own median adapts to the magnification and the cell type.
    """
    if labels.max() == 0 or min_fraction <= 0:
        return relabel_sequential(labels)
    areas = object_areas(labels)
    present = areas > 0
    median = float(np.median(areas[present]))
    return keep_labels(labels, present & (areas >= min_fraction * median))


def border_labels(labels: np.ndarray) -> np.ndarray:
    """Bool per label (index 0 = label 1): True when the object touches the image border."""
    touching = np.zeros(int(labels.max()) + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        touching[edge] = True
    return touching[1:]


def drop_small_border_objects(labels: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop objects that touch the border and are smaller than `min_fraction` x the median area of
    the objects that do not (reference fix 2: slivers of cells cut by the field edge carry little
    signal and mislead cell-level labels). Falls back to all objects when every one touches the border.
    """
    if labels.max() == 0 or min_fraction <= 0:
        return relabel_sequential(labels)
    areas = object_areas(labels)
    present = areas > 0
    touching = border_labels(labels)
    inner = present & ~touching
    reference = areas[inner] if inner.any() else areas[present]
    median = float(np.median(reference))
    return keep_labels(labels, present & ~(touching & (areas < min_fraction * median)))


def match_cells_to_nuclei(nuclei: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make nucleus k lie inside cell k: drop cells without a nucleus, keep each cell's largest
    nucleus part, renumber both 1..n in cell order. Returns (nuclei, cells), uint16."""
    inside = nuclei > 0
    pairs = cells[inside].astype(np.int64) * (int(nuclei.max()) + 1) + nuclei[inside]
    counts = np.bincount(pairs, minlength=(int(cells.max()) + 1) * (int(nuclei.max()) + 1))
    table = counts.reshape(int(cells.max()) + 1, int(nuclei.max()) + 1)[1:, 1:]
    has_nucleus = table.sum(axis=1) > 0
    cells = keep_labels(cells, has_nucleus) if cells.max() else cells.astype(np.uint16)
    # Nucleus pixels take the id of the cell they lie in; nucleus pixels outside any cell are dropped.
    nuclei_out = np.where(inside, cells, 0).astype(np.uint16)
    return nuclei_out, cells


def fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Fill holes inside each object: a hole enclosed by a single label gets that label; holes
    bordered by several labels stay background."""
    if labels.max() == 0:
        return labels
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    if not holes.any():
        return labels
    hole_ids, _ = ndi.label(holes)
    out = labels.copy()
    height, width = labels.shape
    for index, box in enumerate(ndi.find_objects(hole_ids), start=1):
        grown = (slice(max(box[0].start - 1, 0), min(box[0].stop + 1, height)),
                 slice(max(box[1].start - 1, 0), min(box[1].stop + 1, width)))
        region = hole_ids[grown] == index
        ring = ndi.binary_dilation(region) & ~region
        around = labels[grown][ring]
        around = around[around > 0]
        if around.size and (around == around[0]).all():
            out[grown][region] = around[0]
    return out


def upscale_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label mask to (height, width)."""
    if labels.shape == tuple(shape):
        return labels
    return cv2.resize(labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def finish_masks(nuclei: np.ndarray, cells: np.ndarray, full_shape: tuple[int, int],
                 min_border_cell_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The clean-up every backend ends with: drop cells without a nucleus, fill holes in cells,
    drop small border cells, pair nucleus k with cell k, and upscale both to `full_shape`."""
    _, cells = match_cells_to_nuclei(nuclei, cells)
    cells = fill_label_holes(cells)
    cells = drop_small_border_objects(cells, min_border_cell_fraction)
    nuclei, cells = match_cells_to_nuclei(nuclei, cells)
    return upscale_labels(nuclei, full_shape), upscale_labels(cells, full_shape)


def refine_upscale(labels: np.ndarray, signal: np.ndarray, edge: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Upscale working-scale `labels` to `shape` with outlines drawn at full resolution.

    Away from outlines each pixel takes its nearest working pixel's label. In the band of working
    pixels next to a change of label (or to background), a full-resolution pixel belongs to the
    neighbouring cell (3x3 maximum of the labels) when the bilinearly upscaled `signal` is above
    that cell's edge threshold `edge[label]` (index 0 = background, +inf), else to background:
    the outline follows the signal instead of stair-stepping by the scale factor. Labels must
    be uint16 and `edge` hold one float per label 0..labels.max().
    """
    if labels.shape == tuple(shape) or labels.max() == 0:
        return upscale_labels(labels, shape)
    kernel = np.ones((3, 3), np.uint8)
    grown = np.where(labels > 0, labels, cv2.dilate(labels, kernel))
    band = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    fine_labels = upscale_labels(grown, shape)
    fine_band = upscale_labels(band.astype(np.uint8), shape) > 0
    fine_signal = cv2.resize(signal.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    inside = fine_signal > edge.astype(np.float32)[fine_labels]
    keep = np.where(fine_band, inside, upscale_labels(labels, shape) > 0)
    return np.where(keep, fine_labels, 0).astype(np.uint16)
