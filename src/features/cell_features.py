"""Hand-crafted per-cell descriptors of the protein (green) channel, for a sample-efficient cell classifier.

A CNN trained from scratch on the ~1000 cells of a small dataset does not learn one-to-two-pixel dots
(centrosome, Golgi, nucleoli); these descriptors measure them directly, at the field's own resolution:
intensity quantiles (absolute, so a dark cell stays dark), nuclear vs cytoplasmic share (nucleus = the
cell's bright blue pixels), spots from a white top-hat (count, area, share inside the nucleus), the largest
bright blob, edge-vs-interior contrast (membrane), correlation with the other three stains, how far the
protein's centre of mass sits from the nucleus, gradient texture, and the spots' shape (round dots such
as vesicles vs lines such as mitochondria), red stain (a dot at the microtubules' hub: centrosome) and
compartment. Lengths are in pixels of the field; intensities are grey levels of the uint8 field. Channels are RGBY: red microtubules, green protein, blue
nucleus, yellow ER.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from src.data.bbox_records import BBoxRecord

RED, GREEN, BLUE, YELLOW = range(4)
TOPHAT_SIDE = 7          # px: white top-hat element; spots up to ~3 px wide survive it
CELL_SCALE_TOPHAT = 0.25  # a second top-hat element, this fraction of the cell's diameter (blobs at any field scale)
MAX_ELEMENT = 31          # px: a larger second element runs on the cell shrunk to bring it to this side (speed)
SPOT_SIGMAS = (4.0, 8.0)  # spot threshold: top-hat median + k robust SDs over the cell
RING_SIDE = 5             # px: erosion that separates the cell's outer ring from its interior
FEATURE_NAMES: tuple[str, ...] = (
    "log_area", "log_q10", "log_q50", "log_q90", "log_q99", "log_max", "std_rel", "q99_q50_rel", "q90_q10_rel",
    "log_nuclear_mean", "log_cytoplasm_mean", "nuclear_mass_share", "nuclear_area_share",
    *(f"{name}_k{int(k)}" for k in SPOT_SIGMAS for name in ("log_spot_count", "spot_area_share", "spot_nuclear_share")),
    "log_tophat_max", "tophat_mass_share", "log_tophat_q99", "largest_blob_share", "log_blob_count",
    "ring_interior_ratio", "corr_red", "corr_blue", "corr_yellow", "centroid_offset", "gradient_rel",
    "log_blue_q99", "log_red_q99", "log_yellow_q99", "log_green_blue_q99_ratio",
    *(f"depth_band{k}_rel" for k in range(4)), "log_spot_mean_area", "spot_edge_share", "spot_nucleus_distance",
    "log_blob_count_cell_scale", "blob_area_share_cell_scale", "tophat_mass_share_cell_scale",
    "spot_roundness", "spot_red_ratio", "log_cytoplasm_spot_count", "log_nuclear_spot_count",
    "log_nuclear_spot_mean_area", "log_cytoplasm_spot_mean_area", "nuclear_tophat_share")
DEPTH_BANDS = (0.0, 0.2, 0.4, 0.7, 1.0)  # distance to the cell's outline over its largest such distance
N_FEATURES = len(FEATURE_NAMES)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0


def _tophat(filled: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, float, float]:
    """White top-hat with an elliptical `side`-px element, and the median and robust SD (+1 grey
    level) of its values over the cell."""
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    tophat = cv2.morphologyEx(filled, cv2.MORPH_TOPHAT, element)
    values = tophat[mask]
    centre = float(np.median(values))
    return tophat, centre, 1.4826 * float(np.median(np.abs(values - centre))) + 1.0


def _cell_scale_blobs(filled: np.ndarray, mask: np.ndarray, area: float) -> list[float]:
    """Blobs under a quarter of the cell's diameter: their count, area share and top-hat mass share.
    On a large cell (element over MAX_ELEMENT px) the cell is shrunk first; the shares do not depend on it."""
    side = max(TOPHAT_SIDE + 2, 2 * round(CELL_SCALE_TOPHAT * np.sqrt(area / np.pi)) + 1)  # odd, > TOPHAT_SIDE
    if side > MAX_ELEMENT:
        factor = side / MAX_ELEMENT
        shape = (max(1, round(filled.shape[1] / factor)), max(1, round(filled.shape[0] / factor)))
        filled = cv2.resize(filled, shape, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.uint8), shape, interpolation=cv2.INTER_NEAREST).astype(bool)
        side = MAX_ELEMENT
    if not mask.any():
        return [0.0, 0.0, 0.0]
    tophat, centre, spread = _tophat(filled, mask, side)
    blobs = mask & (tophat > centre + SPOT_SIGMAS[0] * spread)
    return [np.log1p(ndimage.label(blobs)[1]), blobs.sum() / mask.sum(), tophat[mask].sum() / (filled[mask].sum() + 1e-6)]


def _layout_features(green: np.ndarray, mask: np.ndarray, spots: np.ndarray, nucleus: np.ndarray,
                     area: float) -> list[float]:
    """Where the protein sits: mean green per band of depth into the cell (relative to the cell's mean),
    the spots' mean size, their share near the outline and their mean distance from the nucleus."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the crop's edge counts as outline
    depth = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
    depth = depth / max(float(depth.max()), 1e-6)
    mean = green[mask].mean() + 1.0
    bands = []
    for low, high in zip(DEPTH_BANDS[:-1], DEPTH_BANDS[1:]):
        band = mask & (depth >= low) & (depth <= high if high == 1.0 else depth < high)
        bands.append((green[band].mean() + 1.0) / mean if band.any() else 1.0)
    spots = spots & mask
    labels, count = ndimage.label(spots)
    spot_area = spots.sum() / count if count else 0.0
    near_edge = (spots & (depth < DEPTH_BANDS[1])).sum() / max(spots.sum(), 1)
    if count and nucleus.any():
        to_nucleus = cv2.distanceTransform((~nucleus).astype(np.uint8), cv2.DIST_L2, 3)
        distance = to_nucleus[spots].mean() / np.sqrt(area / np.pi)
    else:
        distance = 0.0
    return [*bands, np.log1p(spot_area), near_edge, distance]


def _spot_shape_features(green: np.ndarray, red: np.ndarray, mask: np.ndarray, spots: np.ndarray,
                         tophat: np.ndarray, nucleus: np.ndarray) -> list[float]:
    """Round dots or lines, and where: the spots' mean roundness (ratio of the Hessian's two curvatures of
    the green channel at 1 px, 1 for a round dot, 0 for a line; weighted by the top-hat), the red stain's
    mean on the spots over its mean on the cell (a dot at the microtubules' hub scores high), the count
    and mean area of the spots in each compartment (a spot is nuclear when most of it is), and the
    top-hat's share of the nucleus' protein (nucleoli and speckles vs an even nucleoplasm)."""
    spots = spots & mask
    nuclear_share = float(tophat[nucleus].sum() / (green[nucleus].sum() + 1e-6)) if nucleus.any() else 0.0
    if not spots.any():
        return [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, nuclear_share]
    smooth = cv2.GaussianBlur(green, (0, 0), 1.0)
    dxx, dyy = cv2.Sobel(smooth, cv2.CV_32F, 2, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 2)
    dxy = cv2.Sobel(smooth, cv2.CV_32F, 1, 1)
    half_trace, spread = (dxx + dyy) / 2, np.sqrt(((dxx - dyy) / 2) ** 2 + dxy ** 2)
    steep, shallow = half_trace - spread, half_trace + spread  # steep <= shallow; both < 0 on a bright dot
    roundness = np.clip(shallow / np.minimum(steep, -1e-6), 0.0, 1.0)
    weight = tophat[spots] + 1e-6
    labels, count = ndimage.label(spots)
    index = np.arange(1, count + 1)
    inside = np.asarray(ndimage.mean(nucleus, labels, index)) >= 0.5
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return [float((roundness[spots] * weight).sum() / weight.sum()),
            (red[spots].mean() + 1.0) / (red[mask].mean() + 1.0), np.log1p(int((~inside).sum())),
            np.log1p(int(inside.sum())), np.log1p(areas[inside].mean()) if inside.any() else 0.0,
            np.log1p(areas[~inside].mean()) if (~inside).any() else 0.0, nuclear_share]


def cell_features(crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N_FEATURES,) float32 descriptors of one cell.

    crop : (h, w, 4) uint8 RGBY pixels of the cell's bounding box.
    mask : (h, w) bool, True on the cell's own pixels. A cell under 4 pixels gives zeros.
    """
    if mask.sum() < 4:
        return np.zeros(N_FEATURES, np.float32)
    crop = crop.astype(np.float32)
    green, blue = crop[..., GREEN], crop[..., BLUE]
    area = float(mask.sum())
    green_in = green[mask]
    quantiles = np.percentile(green_in, [10, 50, 90, 99, 100])
    scale = max(quantiles[3], 1.0)
    features = [np.log1p(area), *np.log1p(quantiles), green_in.std() / scale,
                (quantiles[3] - quantiles[1]) / scale, (quantiles[2] - quantiles[0]) / scale]

    blue_in = blue[mask]
    nucleus = mask & (blue > 0.5 * (np.percentile(blue_in, 10) + np.percentile(blue_in, 95)))
    cytoplasm = mask & ~nucleus
    mass = green_in.sum() + 1e-6
    features += [np.log1p(green[nucleus].mean()) if nucleus.any() else 0.0,
                 np.log1p(green[cytoplasm].mean()) if cytoplasm.any() else 0.0,
                 green[nucleus].sum() / mass, nucleus.sum() / area]

    # outside the cell each pixel takes its nearest cell pixel's value, so the cell's outline is no step
    # for the opening to cut corners off (a flat cell has no spots)
    nearest = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
    filled = np.ascontiguousarray(green[tuple(nearest)])
    tophat, centre, spread = _tophat(filled, mask, TOPHAT_SIDE)
    tophat_in = tophat[mask]
    for sigmas in SPOT_SIGMAS:
        spots = mask & (tophat > centre + sigmas * spread)
        count = ndimage.label(spots)[1]
        features += [np.log1p(count), spots.sum() / area, (spots & nucleus).sum() / max(spots.sum(), 1)]
    features += [np.log1p(tophat_in.max()), tophat_in.sum() / mass, np.log1p(np.percentile(tophat_in, 99))]

    blobs, n_blobs = ndimage.label(mask & (green > 0.5 * quantiles[4]))
    largest = np.bincount(blobs[blobs > 0]).max() if n_blobs else 0
    features += [largest / area, np.log1p(n_blobs)]

    interior = cv2.erode(mask.astype(np.uint8), np.ones((RING_SIDE, RING_SIDE), np.uint8)).astype(bool)
    ring = mask & ~interior
    features.append((green[ring].mean() + 1) / (green[interior].mean() + 1) if interior.any() and ring.any() else 1.0)
    features += [_correlation(green_in, crop[..., channel][mask]) for channel in (RED, BLUE, YELLOW)]

    ys, xs = np.nonzero(mask)
    weights = green_in + 1e-6
    centre_y, centre_x = (ys * weights).sum() / weights.sum(), (xs * weights).sum() / weights.sum()
    if nucleus.any():
        nucleus_y, nucleus_x = np.nonzero(nucleus)
        offset = np.hypot(centre_y - nucleus_y.mean(), centre_x - nucleus_x.mean()) / np.sqrt(area / np.pi)
    else:
        offset = 0.0
    features.append(offset)
    gradient = np.hypot(cv2.Sobel(green, cv2.CV_32F, 1, 0), cv2.Sobel(green, cv2.CV_32F, 0, 1))
    features.append(gradient[interior].mean() / scale if interior.any() else 0.0)
    blue_q99 = np.percentile(blue_in, 99)
    features += [np.log1p(blue_q99), np.log1p(np.percentile(crop[..., RED][mask], 99)),
                 np.log1p(np.percentile(crop[..., YELLOW][mask], 99)), np.log1p(quantiles[3]) - np.log1p(blue_q99)]
    spots = tophat > centre + SPOT_SIGMAS[0] * spread
    features += _layout_features(green, mask, spots, nucleus, area)
    features += _cell_scale_blobs(filled, mask, area)
    features += _spot_shape_features(filled, crop[..., RED], mask, spots, tophat, nucleus)
    return np.asarray(features, np.float32)


def record_features(field: np.ndarray, record: BBoxRecord) -> np.ndarray:
    """(n_cells, N_FEATURES) descriptors of every cell of a record; `field` is (H, W, 4) uint8 at the
    record's resolution and the record must carry its cell mask."""
    if field.dtype != np.uint8:
        raise ValueError(f"{record.image_id}: the field must be uint8 grey levels, got {field.dtype}")
    if tuple(field.shape[:2]) != tuple(record.image_shape) or field.ndim != 3 or field.shape[2] < 4:
        raise ValueError(f"{record.image_id}: field {field.shape} does not match the record {record.image_shape} x 4 channels")
    if record.cell_mask is None:
        raise ValueError(f"{record.image_id}: the record was read without its cell mask")
    rows = np.zeros((record.n_cells, N_FEATURES), np.float32)
    for cell_i in range(record.n_cells):
        y0, x0, y1, x1 = record.box(cell_i)
        rows[cell_i] = cell_features(field[y0:y1, x0:x1, :4], record.cell_mask[y0:y1, x0:x1] == cell_i + 1)
    return rows
