"""Classical (weight-free) nuclei and cell segmentation of an RGBY field.

Nuclei: seeds = the smoothed blue channel above half its Otsu threshold, each grown to its own half
maximum (so a dim nucleus next to bright ones reaches its edge), holes filled, touching nuclei split
at distance-transform peaks that stand out relative to the image's median nucleus radius (pieces
joined by a wide neck are merged back: one textured nucleus), nuclei below a fraction of the median
nucleus area dropped. Cells: a watershed seeded by the nuclei on (-signal + distance to the nearest
nucleus), where signal = smoothed red + yellow (+ green), claims each cell's territory down to the
background's noise floor and splits touching cells between their nuclei (along dim gaps where there
are some, half-way otherwise); each cell then ends where its signal falls to a fraction of its own
contrast above background, never above the field-wide edge (a quarter of the Otsu threshold), so a
faint cell keeps its faint cytoplasm. The cells' smoothing and distance scale follow the median
nucleus radius, not the field size, and a field whose nuclei are small at the working scale (a
dense colony, a lower magnification) is looked at again up to `max_zoom` x finer. The shared
clean-up (postprocess.finish_masks) follows.
Everything runs at a working scale (`work_size` px on the long side, never upsampled); labels are
upscaled with nearest neighbour except in a band along the outlines, where each full-resolution
pixel is decided by the bilinearly upscaled signal (postprocess.refine_upscale): no stair steps.

Lengths in `ClassicalParams` are in pixels of a 512-px working image and are scaled with the actual
working size, so a parameter means the same fraction of the field at 256, 512, 1728, 2048 or 3072 px
(except `cell_sigma`, relative to the median nucleus radius, and lengths after a zoom, see above).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import local_maxima
from skimage.segmentation import watershed

from src.segmentation.postprocess import (drop_small_relative, finish_masks, keep_labels, object_areas, refine_upscale,
                                          upscale_labels)

REFERENCE_WORK_SIZE = 512  # px: the working size at which the lengths below are stated


@dataclass(frozen=True)
class ClassicalParams:
    """Parameters of the classical backend; lengths in px at a 512-px working image."""

    work_size: int = 512                 # long side of the working image, px (fields are never upsampled)
    min_nucleus_radius: float = 16.0     # median nuclei smaller than this (px at 512) are looked at again finer ...
    max_zoom: float = 2.0                # ... at up to this x work_size (capped at the field size)
    nucleus_sigma: float = 1.5           # Gaussian smoothing of the blue channel
    nucleus_threshold: float = 0.5       # factor on the Otsu threshold of the smoothed blue channel (seeds)
    nucleus_edge_fraction: float = 0.5   # each nucleus grows to this x its own contrast (half maximum); 0 = off
    split_nuclei: bool = True            # split touching nuclei at distance-transform peaks
    split_depth: float = 0.15            # ... that rise this fraction of the median nucleus radius above the saddle
    split_max_neck: float = 0.8          # ... unless joined by a neck wider than this x the smaller piece's diameter
    min_nucleus_fraction: float = 0.15   # drop nuclei below this fraction of the image's median nucleus area
    cell_sigma: float = 0.1              # Gaussian smoothing of the cell signal, x the median nucleus radius
    cell_threshold: float = 0.25         # x the Otsu threshold of the smoothed cell signal: the field-wide edge
    cell_edge_fraction: float = 0.1      # a cell ends where its signal falls to this x its own contrast
    use_green: bool = False              # add the protein channel to the cell signal
    distance_weight: float = 0.5         # elevation = -signal/p99.5 + this x distance to nuclei / 5 nucleus radii
    min_border_cell_fraction: float = 0.15 # drop border cells below this fraction of the median inner cell area
    min_nucleus_contrast: float = 12.0   # nuclei must be this many 8-bit grey levels above the background
    min_cell_contrast: float = 0.05      # cell signal must rise this fraction of its 99.5th percentile

    def __post_init__(self):
        if self.work_size < 32:
            raise ValueError("work_size must be >= 32 px")
        if self.max_zoom < 1:
            raise ValueError("max_zoom must be >= 1")
        for name in ("nucleus_sigma", "cell_sigma", "split_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def working_shape(shape: tuple[int, int], work_size: int) -> tuple[int, int]:
    """(height, width) of the working image: the long side shrunk to `work_size`, never enlarged."""
    height, width = shape
    factor = min(1.0, work_size / max(height, width))
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def _smooth(plane: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(plane, (0, 0), sigma) if sigma > 0 else plane


def _threshold(plane: np.ndarray, factor: float, min_contrast: float) -> float:
    """`factor` x Otsu, but at least `min_contrast` above the 1st percentile (so a field without
    objects, whose Otsu threshold falls inside the noise, yields nothing)."""
    sample = plane[::2, ::2]
    low = float(np.percentile(sample, 1))
    if float(sample.max()) - low <= min_contrast:
        return float("inf")
    return max(float(threshold_otsu(sample)) * factor, low + min_contrast)


def reconstruct_by_dilation(marker: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Greyscale reconstruction by dilation of `marker` under `mask` (8-connected), float32: the
    same fixed point as skimage.morphology.reconstruction, reached by repeated 3x3 dilations, which
    is several times faster on distance maps (their plateaus are short) than skimage's sort."""
    mask = np.ascontiguousarray(mask, np.float32)
    current = np.minimum(np.asarray(marker, np.float32), mask)
    kernel = np.ones((3, 3), np.uint8)
    while True:
        previous = current
        for _ in range(8):
            current = np.minimum(cv2.dilate(current, kernel), mask)
        if np.array_equal(current, previous):
            return current


def split_touching(mask: np.ndarray, depth: float, max_neck: float = 0.8) -> np.ndarray:
    """Label `mask`, splitting blobs at distance-transform peaks that rise more than `depth` px above
    the saddle between them (h-maxima), then merging back pieces joined by a neck wider than
    `max_neck` x the smaller piece's equivalent diameter (a textured nucleus is not two nuclei).
    Returns int32 labels."""
    if depth <= 0:
        return ndi.label(mask)[0]
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    # h-maxima = regional maxima of the reconstruction of (distance - depth) under distance.
    # (skimage's h_maxima keeps every top of equal height, so it would split blobs whose distance
    # map has two equal peaks joined by a ridge.)
    capped = reconstruct_by_dilation(np.maximum(distance - depth, 0), distance)
    markers, count = ndi.label(local_maxima(capped, connectivity=2) & mask, structure=np.ones((3, 3)))
    if count <= 1:
        return ndi.label(mask)[0]
    labels = watershed(-distance, markers, mask=mask, watershed_line=False)
    unlabeled = mask & (labels == 0)
    if unlabeled.any():  # blobs too flat to peak keep their own label
        extra, _ = ndi.label(unlabeled)
        labels = np.where(unlabeled, extra + labels.max(), labels)
    return merge_wide_necks(labels.astype(np.int32), max_neck)


def merge_wide_necks(labels: np.ndarray, max_neck: float) -> np.ndarray:
    """Merge touching labels whose shared border (px) exceeds `max_neck` x the smaller one's
    equivalent diameter; returns labels renumbered 1..n."""
    n = int(labels.max())
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        touching = (a != b) & (a > 0) & (b > 0)
        low, high = np.minimum(a[touching], b[touching]), np.maximum(a[touching], b[touching])
        pairs.append(low.astype(np.int64) * (n + 1) + high)
    codes, necks = np.unique(np.concatenate(pairs), return_counts=True)
    parent = np.arange(n + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    areas = np.bincount(labels.ravel(), minlength=n + 1)
    for code, neck in zip(codes, necks):
        a, b = divmod(int(code), n + 1)
        diameter = 2.0 * np.sqrt(min(areas[a], areas[b]) / np.pi)
        if neck > max_neck * diameter:
            parent[root(b)] = root(a)
    roots = np.array([root(i) for i in range(n + 1)])
    _, renumbered = np.unique(roots, return_inverse=True)
    return renumbered[labels].astype(np.int32)


def grow_to_own_level(smooth: np.ndarray, seeds: np.ndarray, background: float, floor: float, fraction: float
                      ) -> np.ndarray:
    """Each blob of `seeds` grown, within the territory a watershed on -smooth gives it down to
    `floor`, to where `smooth` exceeds `background` + `fraction` x the blob's contrast (the
    intensity-weighted mean of its pixels above `background`). With fraction 0.5 a blurred uniform
    blob ends at its half maximum whatever its brightness, so dim nuclei reach their edge. Grow
    only: cutting seeds at their half maximum would fragment textured nuclei bridged to bright ones."""
    seed_labels, count = ndi.label(seeds)
    territory = watershed(-smooth, seed_labels, mask=(smooth > floor) | seeds)
    values = np.where(seeds, smooth, 0).ravel()
    weight = np.bincount(seed_labels.ravel(), weights=values, minlength=count + 1)
    level = np.bincount(seed_labels.ravel(), weights=values * values, minlength=count + 1) / np.maximum(weight, 1e-12)
    edge = np.maximum(background + fraction * (level - background), floor).astype(np.float32)
    edge[0] = np.inf
    return seeds | (smooth > edge[territory])


def segment_nuclei(blue: np.ndarray, params: ClassicalParams, unit: float) -> np.ndarray:
    """Nuclei labels (uint16) of a working-scale blue plane (float32); `unit` = working px per 512-scale px."""
    smooth = _smooth(blue, params.nucleus_sigma * unit)
    threshold = _threshold(smooth, params.nucleus_threshold, params.min_nucleus_contrast)
    seeds = smooth > threshold
    if params.nucleus_edge_fraction > 0 and seeds.any():
        background, floor = background_level(smooth, threshold, 4.0 * params.nucleus_sigma * unit,
                                             float(np.percentile(smooth[::2, ::2], 99.5)))
        seeds = grow_to_own_level(smooth, seeds, background, floor, params.nucleus_edge_fraction)
    mask = ndi.binary_fill_holes(seeds)
    radius = max(1, int(round(1.5 * unit)))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))) > 0
    if not mask.any():
        return np.zeros(blue.shape, np.uint16)
    labels = ndi.label(mask)[0]
    if params.split_nuclei and params.split_depth > 0:
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas >= (3.0 * unit) ** 2]
        if areas.size:
            nucleus_radius = float(np.sqrt(np.median(areas) / np.pi))
            labels = split_touching(mask, params.split_depth * nucleus_radius, params.split_max_neck)
    labels = labels.astype(np.uint16)
    # Specks of a few pixels are noise whatever the median says.
    labels = _drop_tiny(labels, (3.0 * unit) ** 2)
    return drop_small_relative(labels, params.min_nucleus_fraction)


def _drop_tiny(labels: np.ndarray, min_area: float) -> np.ndarray:
    if labels.max() == 0:
        return labels
    areas = object_areas(labels)
    return keep_labels(labels, areas >= max(min_area, 1))


def cell_signal(field: np.ndarray, params: ClassicalParams) -> np.ndarray:
    """Cell-body signal of a working-scale (h, w, 4) RGBY float32 field: the mean of red and yellow
    (and green), each divided by its 99.5th percentile so no channel dominates, plus half the blue."""
    planes = [field[..., 0], field[..., 3]] + ([field[..., 1]] if params.use_green else [])
    total = np.zeros(field.shape[:2], np.float32)
    for plane in planes:
        scale = float(np.percentile(plane[::2, ::2], 99.5))
        total += plane / max(scale, 1.0)
    total /= len(planes)
    blue = field[..., 2]
    total += 0.5 * blue / max(float(np.percentile(blue[::2, ::2], 99.5)), 1.0)
    return total


def background_level(signal: np.ndarray, threshold: float, margin: float, top: float) -> tuple[float, float]:
    """(level, noise floor) of the background of the smoothed `signal`, from the pixels below
    `threshold` and more than `margin` px from any pixel above it (the objects' halo excluded):
    their median, and the median + 3 robust standard deviations (1.4826 x MAD, so faint cells
    among them do not raise it), the floor at least 1% of `top` (8-bit quantisation). Both are
    capped at `threshold`."""
    size = 2 * max(1, int(round(margin))) + 1
    above = (signal >= threshold).astype(np.uint8)
    background = cv2.dilate(above, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))) == 0
    values = signal[background][::4]
    if values.size < 100:
        return min(float(np.percentile(signal, 1)), threshold), threshold
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    return min(median, threshold), min(median + max(3.0 * spread, 0.01 * top), threshold)


def segment_cells(field: np.ndarray, nuclei: np.ndarray, params: ClassicalParams, unit: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells grown from `nuclei` over a working-scale (h, w, 4) float32 field.

    Returns (cells uint16, smoothed cell signal float32, edge threshold per label float32 with
    index 0 = background). A watershed seeded by the nuclei first claims each cell's territory
    down to the noise floor; each cell then ends where its signal falls below background +
    `cell_edge_fraction` x its own contrast (its intensity-weighted mean signal above background),
    never above the field-wide threshold: a faint cell next to bright ones keeps its faint
    cytoplasm, a bright one its crisp edge.
    """
    empty = np.zeros(1, np.float32)
    # Lengths follow the cells' own size (the median nucleus radius), not the field's: dense
    # colonies of small cells are smoothed no more, relative to their size, than large cells.
    radius = median_radius(nuclei) or 25.0 * unit
    signal = _smooth(cell_signal(field, params), params.cell_sigma * radius)
    if nuclei.max() == 0:
        return np.zeros(nuclei.shape, np.uint16), signal, empty
    top = max(float(np.percentile(signal[::2, ::2], 99.5)), 1e-6)
    field_threshold = _threshold(signal, params.cell_threshold, params.min_cell_contrast * top)
    if not np.isfinite(field_threshold):
        return np.zeros(nuclei.shape, np.uint16), signal, empty
    background, floor = background_level(signal, field_threshold, 4.0 * params.cell_sigma * radius, top)
    territory = ndi.binary_fill_holes((signal > floor) | (nuclei > 0))
    elevation = -signal / top
    if params.distance_weight > 0:
        to_nuclei = cv2.distanceTransform((nuclei == 0).astype(np.uint8), cv2.DIST_L2, 5)
        elevation = elevation + params.distance_weight * to_nuclei / (5.0 * radius)
    cells = watershed(elevation, nuclei.astype(np.int32), mask=territory)
    count = int(cells.max()) + 1
    weight = np.bincount(cells.ravel(), weights=signal.ravel(), minlength=count)
    level = np.bincount(cells.ravel(), weights=(signal * signal).ravel(), minlength=count) / np.maximum(weight, 1e-12)
    edge = np.clip(background + params.cell_edge_fraction * (level - background), floor, field_threshold)
    edge = edge.astype(np.float32)
    edge[0] = np.inf
    cells = np.where((signal > edge[cells]) | (nuclei > 0), cells, 0)
    return cells.astype(np.uint16), signal, edge


def _shrink(field: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """The RGBY planes at `shape` (area-averaged), float32 on the 8-bit scale."""
    small = field[..., :4]
    if shape != field.shape[:2]:
        small = cv2.resize(np.ascontiguousarray(small), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) * np.float32(scale)


def median_radius(labels: np.ndarray) -> float:
    """Equivalent radius (px) of the median object of a label mask; 0 when there is none."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0


def segment_field(field: np.ndarray, params: ClassicalParams = ClassicalParams()) -> tuple[np.ndarray, np.ndarray]:
    """Segment one (H, W, 4) RGBY field (uint8 or uint16). Returns full-resolution (nuclei, cells)
    uint16 label masks; nucleus k lies inside cell k, labels 1..n, 0 = background."""
    if field.ndim != 3 or field.shape[2] < 4:
        raise ValueError(f"expected an (H, W, 4) RGBY field, got shape {field.shape}")
    full_shape = field.shape[:2]
    work_shape = working_shape(full_shape, params.work_size)
    scale = 255.0 / 65535.0 if field.dtype == np.uint16 else 1.0
    small = _shrink(field, work_shape, scale)
    unit = max(work_shape) / REFERENCE_WORK_SIZE
    nuclei = segment_nuclei(np.ascontiguousarray(small[..., 2]), params, unit)
    radius = median_radius(nuclei)
    if 0 < radius < params.min_nucleus_radius * unit:
        # Small cells (a dense colony, a lower magnification): look again at a finer scale, with the
        # same lengths in pixels, so the nuclei are as many pixels across as usual and the gaps
        # between them survive the downscale.
        zoom = min(params.max_zoom, params.min_nucleus_radius * unit / radius)
        finer = working_shape(full_shape, int(round(params.work_size * zoom)))
        if finer != work_shape:
            work_shape = finer
            small = _shrink(field, work_shape, scale)
            nuclei = segment_nuclei(np.ascontiguousarray(small[..., 2]), params, unit)
    cells, signal, edge = segment_cells(small, nuclei, params, unit)
    nuclei, kept = finish_masks(nuclei, cells, work_shape, params.min_border_cell_fraction)
    # finish_masks renumbers the cells it keeps; carry each one's edge threshold along.
    survivors = np.zeros(int(kept.max()) + 1, np.int64)
    both = (kept > 0) & (cells > 0)  # (hole pixels that finish_masks filled are 0 in `cells`)
    survivors[kept[both]] = cells[both]
    cells = refine_upscale(kept, signal, edge[survivors], full_shape)
    nuclei = upscale_labels(nuclei, full_shape)
    # A nucleus stays inside its cell even where the outline was redrawn across it (tiny cells).
    return nuclei, np.where(nuclei > 0, nuclei, cells).astype(np.uint16)
