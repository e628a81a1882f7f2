"""Nuclei and cell labels from the HPA U-Nets' probability maps: our re-implementation of the
`label_cell` step of the HPA cell-segmentation package (CellProfiling/HPA-Cell-Segmentation).

Inputs are the package's prediction format: (H, W, 3) uint8 maps at full field resolution, the
softmax probabilities x 255 of channel 0 background (zeroed), 1 border, 2 interior.

Nuclei: seeds = nuclei interior > 0.15 away from the borders of either model, seeds below 500 px
dropped; mask = nuclei interior > 0.4 with holes below 1000 px filled and specks below 8 px
dropped; a watershed from the seeds over the flat mask with watershed lines; nuclei below 2500 px
dropped. Cells: mask = cell interior > max(0.22, Otsu / 2); a watershed of -interior seeded by the
nuclei; cells below 5500 px dropped; a closing with a disk of radius 6; holes filled (the labels
are shrunk by their thick boundaries first, so cells that touch come apart); a second watershed
that grows the cells into the pixels where the cell border probability is > 0.05; holes filled
again; cells below 5500 px dropped; each nucleus takes the label of its cell.

Pixel sizes are the package's, stated for a 2048-px field (`PACKAGE_SIZES`); `LabelSizes.scaled`
adapts them to other field sizes. Three of the package's quirks are kept so that the masks are the
ones the package makes (see the comments at each).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components
from skimage.segmentation import watershed

FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)
CROSS = FOUR_CONNECTED.astype(np.uint8)
PROBABILITIES = np.arange(256) / 255.0  # what each uint8 map value means, as the package computes it


@dataclass(frozen=True)
class LabelSizes:
    """Areas (px) and the closing radius (px) of label_cell, for one field size."""

    nucleus_seed_min: float = 500
    nucleus_hole_max: float = 1000
    nucleus_speck_min: float = 8
    nucleus_min: float = 2500
    cell_min: float = 5500
    closing_radius: float = 6

    def scaled(self, length_factor: float) -> "LabelSizes":
        """The same sizes on a field `length_factor` times as long on each side."""
        area = length_factor ** 2
        return replace(self, nucleus_seed_min=self.nucleus_seed_min * area,
                       nucleus_hole_max=self.nucleus_hole_max * area, nucleus_speck_min=self.nucleus_speck_min * area,
                       nucleus_min=self.nucleus_min * area, cell_min=self.cell_min * area,
                       closing_radius=self.closing_radius * length_factor)


PACKAGE_SIZES = LabelSizes()  # the package's pixel counts; HPA fields are 2048 px
PACKAGE_FIELD_SIZE = 2048


def drop_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """`mask` without its 4-connected components of fewer than `min_area` pixels."""
    components, count = ndi.label(mask, structure=FOUR_CONNECTED)
    if count == 0:
        return mask.astype(bool)
    keep = np.bincount(components.ravel(), minlength=count + 1) >= min_area
    keep[0] = False
    return keep[components]


def fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """`mask` with every 4-connected background component under `max_area` px filled, those touching
    the image edge included (as scikit-image's remove_small_holes does)."""
    return ~drop_small_components(~mask, max_area)


def drop_small_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Zero the labels of fewer than `min_area` pixels; the others keep their numbers."""
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def disk(radius: float) -> np.ndarray:
    """uint8 disk footprint: offsets with dy^2 + dx^2 <= radius^2 (radius rounded to whole px)."""
    radius = int(round(radius))
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2).astype(np.uint8)


def thick_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label or background (scikit-image's
    find_boundaries, connectivity 1, mode 'thick'), with cv2's max/min filters."""
    values = labels.astype(np.uint16 if labels.max() <= np.iinfo(np.uint16).max else np.float32)
    return cv2.dilate(values, CROSS) != cv2.erode(values, CROSS)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with every background region that is not 4-connected to the image edge filled
    (scipy's binary_fill_holes with its default structure)."""
    background, count = ndi.label(~mask, structure=FOUR_CONNECTED)
    reaches_edge = np.zeros(count + 1, dtype=bool)
    reaches_edge[0] = True  # id 0: the mask itself
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        reaches_edge[edge] = True
    return mask | ~reaches_edge[background]


def separate_and_fill(labels: np.ndarray) -> np.ndarray:
    """Erase the thick boundaries of the labels (so touching objects come apart), fill holes in
    the remaining foreground, and number its 4-connected components 1..n."""
    kept = (labels > 0) & ~thick_boundaries(labels)
    return ndi.label(fill_holes(kept), structure=FOUR_CONNECTED)[0]


def label_nuclei_from_maps(nuclei_pred: np.ndarray, cell_pred: np.ndarray, sizes: LabelSizes) -> np.ndarray:
    """The nuclei of label_cell (before they are paired with cells); int labels."""
    interior = nuclei_pred[..., 2]
    # The package adds the two uint8 border maps in uint8, so a sum over 255 wraps around; kept.
    border_sum = nuclei_pred[..., 1] + cell_pred[..., 1]
    away_from_borders = ((1.0 - PROBABILITIES) > 0.05)[border_sum]
    seeds = (PROBABILITIES > 0.4 - 0.25)[interior] & away_from_borders
    seeds = drop_small_components(seeds, sizes.nucleus_seed_min)
    mask = fill_small_holes((PROBABILITIES > 0.4)[interior], sizes.nucleus_hole_max)
    mask = drop_small_components(mask, sizes.nucleus_speck_min)
    markers = ndi.label(seeds, structure=FOUR_CONNECTED)[0]
    nuclei = watershed(mask.astype(np.uint8), markers, mask=mask, watershed_line=True)
    return label_components(drop_small_labels(nuclei, sizes.nucleus_min))


def label_cells_from_maps(nuclei_pred: np.ndarray, cell_pred: np.ndarray,
                          sizes: LabelSizes = PACKAGE_SIZES) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei, cells) uint16 label masks from the two models' uint8 prediction maps, as the package's
    label_cell; nucleus pixels carry the label of their cell."""
    if nuclei_pred.shape != cell_pred.shape or nuclei_pred.ndim != 3 or nuclei_pred.shape[2] != 3:
        raise ValueError(f"expected two (H, W, 3) prediction maps, got {nuclei_pred.shape} and {cell_pred.shape}")
    if nuclei_pred.dtype != np.uint8 or cell_pred.dtype != np.uint8:
        raise ValueError("prediction maps must be uint8 (probability x 255)")
    nuclei = label_nuclei_from_maps(nuclei_pred, cell_pred, sizes)
    interior = cell_pred[..., 2]
    threshold = max(0.22, float(threshold_otsu(interior / 255.0)) * 0.5)
    # The package also means to exclude cell-border pixels from this mask and to clip the landscape
    # at the threshold, but both of its expressions leave their input unchanged (np.invert of an int8
    # 0/1 array is -1/-2, both true; np.clip(a, low, a) is a); we do what it does.
    region = (PROBABILITIES > threshold)[interior]
    landscape = -interior.astype(np.float64)
    cells = watershed(landscape, nuclei, mask=region)
    # The package casts the labels to uint8 here (labels above 255 wrap around); kept.
    cells = drop_small_labels(cells, sizes.cell_min).astype(np.uint8)
    footprint = disk(sizes.closing_radius)
    if footprint.size > 1:
        cells = cv2.morphologyEx(cells, cv2.MORPH_CLOSE, footprint)  # grey closing of the label values
    cells = separate_and_fill(cells)
    grown_region = (cells > 0) | (PROBABILITIES > 0.05)[cell_pred[..., 1]]
    cells = separate_and_fill(watershed(landscape, cells, mask=grown_region))
    cells = label_components(drop_small_labels(label_components(cells > 0), sizes.cell_min)).astype(np.uint16)
    nucleus_parts = label_components((cells > 0) & (nuclei > 0))
    nucleus_kept = drop_small_labels(nucleus_parts, sizes.nucleus_min) > 0
    return np.where(nucleus_kept, cells, 0).astype(np.uint16), cells
