"""Synthetic HPA-style fields with cell-level truth, for the demo and the tests.

A field holds irregular, touching cells grown around nuclei (blue), with microtubule filaments (red),
a reticular ER (yellow) and a per-cell protein pattern (green) drawn from the classes below. Image
labels follow the HPA rule: a class is labelled when present in more than `majority` of the
image's cells, so rare states (mitotic spindle, aggresome) are usually missing from them.
All lengths scale with the cell radius, so any `image_size` gives the same look.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from src.data.classes import CLASS_INDEX, NEGATIVE

NUCLEAR_CLASSES = tuple(CLASS_INDEX[n] for n in ("Nucleoplasm", "Nuclear membrane", "Nucleoli", "Nuclear speckles"))
CYTOPLASMIC_CLASSES = tuple(CLASS_INDEX[n] for n in (
    "Golgi apparatus", "Microtubules", "Centrosome", "Plasma membrane", "Mitochondria", "Cytosol",
    "Vesicles and punctate cytosolic patterns"))
MITOTIC_SPINDLE = CLASS_INDEX["Mitotic spindle"]
AGGRESOME = CLASS_INDEX["Aggresome"]
# Classes the generator draws, each with a distinct green layout; the relative frequency of each
# as an image's main localisation.
PATTERN_CLASSES = NUCLEAR_CLASSES + CYTOPLASMIC_CLASSES + (MITOTIC_SPINDLE, AGGRESOME)
MAIN_CLASS_WEIGHTS = {**{c: 1.0 for c in NUCLEAR_CLASSES + CYTOPLASMIC_CLASSES},
                      CLASS_INDEX["Nucleoplasm"]: 2.0, CLASS_INDEX["Cytosol"]: 1.6,
                      MITOTIC_SPINDLE: 1.2, AGGRESOME: 1.0}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator. Lengths are fractions of `image_size` unless stated."""

    image_size: int = 256          # px, square fields
    cells_min: int = 6             # cells per field (before border clipping)
    cells_max: int = 12
    cell_radius: float = 0.12      # mean cell radius / image_size
    debris_per_field: int = 3      # tiny bright objects that are not cells
    majority: float = 0.5          # a class is an image label when its cell fraction exceeds this
    label_noise: float = 0.05      # probability that an image's labels get one extra error
    negative_image_rate: float = 0.08  # images whose protein shows no pattern


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered white noise; sigma in px."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), max(sigma, 0.3))
    return noise / (noise.std() + 1e-6)


def _shape_distance(yy: np.ndarray, xx: np.ndarray, centre: tuple[float, float], radius: float,
                    aspect: float, angle: float, harmonics: np.ndarray) -> np.ndarray:
    """Normalised distance to an irregular blob: < 1 inside. harmonics: rows (order, amplitude, phase)."""
    dy, dx = yy - centre[0], xx - centre[1]
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    u = (dx * cos_a + dy * sin_a) / aspect
    v = -dx * sin_a + dy * cos_a
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    for order, amplitude, phase in harmonics:
        boundary += amplitude * np.cos(order * theta + phase)
    return np.sqrt(u * u + v * v) / (radius * boundary)


def _random_harmonics(rng: np.random.Generator, strength: float) -> np.ndarray:
    orders = np.array([2, 3, 4, 5], dtype=np.float32)
    return np.stack([orders, rng.uniform(0, strength, 4) / orders ** 0.5, rng.uniform(0, 2 * np.pi, 4)], axis=1)


def _place_centres(rng: np.random.Generator, count: int, size: int, radius: float) -> np.ndarray:
    """Nucleus centres in colonies, at least 1.5 radii apart, all inside the field."""
    colonies = rng.uniform(0.15 * size, 0.85 * size, size=(rng.integers(1, 3), 2))
    centres: list[np.ndarray] = []
    for _ in range(count * 60):
        if len(centres) == count:
            break
        base = colonies[rng.integers(len(colonies))]
        point = base + rng.normal(0, 0.22 * size, 2)
        if not (0 <= point[0] < size and 0 <= point[1] < size):
            continue
        if all(np.hypot(*(point - c)) >= 1.5 * radius for c in centres):
            centres.append(point)
    return np.array(centres).reshape(-1, 2)


def _draw_polyline(canvas: np.ndarray, points: np.ndarray, value: float, thickness: int) -> None:
    cv2.polylines(canvas, [np.round(points[:, ::-1] * 16).astype(np.int32)], False, float(value),
                  thickness=thickness, lineType=cv2.LINE_AA, shift=4)


def _draw_dots(canvas: np.ndarray, centres: np.ndarray, radius: float, values: np.ndarray) -> None:
    for (y, x), value in zip(centres, values):
        cv2.circle(canvas, (int(round(x * 16)), int(round(y * 16))), max(int(round(radius * 16)), 8),
                   float(value), -1, lineType=cv2.LINE_AA, shift=4)


def _points_in(rng: np.random.Generator, mask: np.ndarray, count: int, weights: np.ndarray | None = None) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if ys.size == 0 or count == 0:
        return np.zeros((0, 2))
    p = None
    if weights is not None:
        w = weights[ys, xs].astype(np.float64)
        p = w / w.sum() if w.sum() > 0 else None
    pick = rng.choice(ys.size, size=count, replace=True, p=p)
    return np.stack([ys[pick], xs[pick]], axis=1).astype(np.float64) + rng.uniform(-0.5, 0.5, (count, 2))


def _depth(mask: np.ndarray) -> np.ndarray:
    """Distance (px) of each pixel of `mask` to its outside; the field border counts as outside."""
    return cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]


def _ring(mask: np.ndarray, width: float) -> np.ndarray:
    """Pixels of `mask` within `width` px of its outside."""
    return mask & (_depth(mask) <= max(width, 1.0))


def _spindle(canvas: np.ndarray, centre: np.ndarray, axis_angle: float, half_length: float, plate_half: float,
             value: float, thickness: int, rng: np.random.Generator) -> None:
    """Bipolar spindle: fibres from two poles to points along the metaphase plate."""
    direction = np.array([np.sin(axis_angle), np.cos(axis_angle)])
    normal = np.array([direction[1], -direction[0]])
    for pole_sign in (-1, 1):
        pole = centre + pole_sign * half_length * direction
        for offset in np.linspace(-plate_half, plate_half, 7) + rng.normal(0, 0.05 * plate_half, 7):
            _draw_polyline(canvas, np.stack([pole, centre + offset * normal]), value, thickness)


def _paint_cell(rng: np.random.Generator, channels: np.ndarray, window: tuple[slice, slice], cell_local: np.ndarray,
                nucleus_local: np.ndarray, centre: np.ndarray, radius: float, classes: set[int], mitotic: bool,
                brightness: float) -> None:
    """Add one cell's signal to `channels` (4, H, W float32 in [0, ~1]) inside `window`."""
    shape = cell_local.shape
    origin = np.array([window[0].start, window[1].start], dtype=np.float64)
    local_centre = centre - origin
    thickness = max(1, int(round(radius / 25)))
    cytoplasm = cell_local & ~nucleus_local
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    distance_to_centre = np.hypot(yy - local_centre[0], xx - local_centre[1]).astype(np.float32)
    red, green, blue, yellow = (np.zeros(shape, np.float32) for _ in range(4))
    cell_f = cell_local.astype(np.float32)

    # Nuclei: textured fill, condensed and brighter in mitosis.
    nucleus_texture = 1 + 0.15 * _smooth_noise(rng, shape, radius / 12)
    blue += nucleus_local * nucleus_texture * (0.95 if mitotic else rng.uniform(0.45, 0.7))

    # Microtubules: curved filaments radiating from the nucleus; spindle fibres in mitosis.
    filaments = np.zeros(shape, np.float32)
    spindle_axis = rng.uniform(0, np.pi)
    if mitotic:
        _spindle(filaments, local_centre, spindle_axis, 0.55 * radius, 0.4 * radius, 0.6, thickness, rng)
    else:
        for _ in range(rng.integers(14, 24)):
            angle = rng.uniform(0, 2 * np.pi)
            steps = np.linspace(0.2, 1.3, 5) * radius
            bend = np.cumsum(rng.normal(0, 0.12, 5))
            points = local_centre + np.stack([np.sin(angle + bend) * steps, np.cos(angle + bend) * steps], axis=1)
            _draw_polyline(filaments, points, rng.uniform(0.25, 0.45), thickness)
    red += cv2.GaussianBlur(filaments, (0, 0), 0.6 * thickness) * cell_f + 0.14 * cell_f

    # ER: reticular network, densest around the nucleus.
    band = _smooth_noise(rng, shape, radius / 14) - 0.7 * _smooth_noise(rng, shape, radius / 5)
    network = np.exp(-(band / 0.35) ** 2)
    falloff = np.exp(-distance_to_centre / (1.2 * radius))
    yellow += (0.6 * network + 0.2) * falloff * cytoplasm

    # Protein of interest.
    texture = np.clip(1 + 0.2 * _smooth_noise(rng, shape, radius / 10), 0.3, None)
    nucleus_radius = 0.45 * radius
    for cls in classes:
        layer = np.zeros(shape, np.float32)
        if cls == CLASS_INDEX["Nucleoplasm"]:
            layer = 0.6 * nucleus_local * texture
        elif cls == CLASS_INDEX["Nuclear membrane"]:
            layer = 0.8 * _ring(nucleus_local, 0.12 * nucleus_radius)
        elif cls == CLASS_INDEX["Nucleoli"]:
            count = rng.integers(2, 5)
            _draw_dots(layer, _points_in(rng, _erode(nucleus_local, 0.3 * nucleus_radius), count),
                       0.16 * nucleus_radius, rng.uniform(0.7, 1.0, count))
        elif cls == CLASS_INDEX["Nuclear speckles"]:
            count = rng.integers(12, 22)
            _draw_dots(layer, _points_in(rng, _erode(nucleus_local, 0.1 * nucleus_radius), count),
                       0.07 * nucleus_radius, rng.uniform(0.5, 0.9, count))
        elif cls == CLASS_INDEX["Golgi apparatus"]:
            side = rng.uniform(0, 2 * np.pi)
            anchor = local_centre + 1.15 * nucleus_radius * np.array([np.sin(side), np.cos(side)])
            blobs = anchor + rng.normal(0, 0.12 * radius, (8, 2))
            _draw_dots(layer, blobs, 0.07 * radius, rng.uniform(0.5, 0.9, 8))
        elif cls == CLASS_INDEX["Microtubules"]:
            layer = 1.4 * filaments
        elif cls == MITOTIC_SPINDLE and mitotic:
            _spindle(layer, local_centre, spindle_axis, 0.55 * radius, 0.4 * radius, 0.9, thickness, rng)
            layer = cv2.GaussianBlur(layer, (0, 0), 0.6 * thickness)
        elif cls == CLASS_INDEX["Centrosome"]:
            side = rng.uniform(0, 2 * np.pi)
            anchor = local_centre + 1.1 * nucleus_radius * np.array([np.sin(side), np.cos(side)])
            _draw_dots(layer, anchor + rng.normal(0, 0.03 * radius, (2, 2)), 0.05 * radius, np.array([1.0, 0.9]))
        elif cls == CLASS_INDEX["Plasma membrane"]:
            layer = 0.7 * _ring(cell_local, 0.07 * radius)
        elif cls == CLASS_INDEX["Mitochondria"]:
            count = rng.integers(40, 70)
            centres = _points_in(rng, cytoplasm, count, weights=np.exp(-distance_to_centre / radius))
            for (y, x), angle in zip(centres, rng.uniform(0, 180, count)):
                cv2.ellipse(layer, (int(x * 16), int(y * 16)), (int(0.09 * radius * 16) + 8, int(0.03 * radius * 16) + 8),
                            float(angle), 0, 360, 0.7, -1, lineType=cv2.LINE_AA, shift=4)
        elif cls == AGGRESOME:
            side = rng.uniform(0, 2 * np.pi)
            anchor = local_centre + 1.05 * nucleus_radius * np.array([np.sin(side), np.cos(side)])
            _draw_dots(layer, anchor[None], 0.18 * radius, np.array([1.0]))
        elif cls == CLASS_INDEX["Cytosol"]:
            layer = 0.45 * cytoplasm * texture
        elif cls == CLASS_INDEX["Vesicles and punctate cytosolic patterns"]:
            count = rng.integers(18, 32)
            _draw_dots(layer, _points_in(rng, cytoplasm, count), 0.05 * radius, rng.uniform(0.6, 1.0, count))
        green += layer * cell_f
    green *= brightness
    for index, plane in enumerate((red, green, blue, yellow)):
        channels[index][window] += plane


def _erode(mask: np.ndarray, width: float) -> np.ndarray:
    shrunk = _depth(mask) > width
    return shrunk if shrunk.any() else mask


def draw_cell_states(rng: np.random.Generator, count: int, negative_image_rate: float) -> tuple[list[set[int]], np.ndarray]:
    """One image's protein: per-cell class sets and mitotic flags (the HPA sampling story).

    Most images show one or two main classes in most cells; mitotic-spindle proteins show only in
    the (few) mitotic cells, aggresome proteins in a minority of cells; some images are negative.
    """
    classes = np.array(list(MAIN_CLASS_WEIGHTS))
    weights = np.array(list(MAIN_CLASS_WEIGHTS.values()))
    main = {int(rng.choice(classes, p=weights / weights.sum()))}
    if rng.random() < 0.35:
        main.add(int(rng.choice(classes, p=weights / weights.sum())))
    negative_image = rng.random() < negative_image_rate
    mitotic_rate = 0.05
    if MITOTIC_SPINDLE in main:
        mitotic_rate = rng.uniform(0.55, 0.75) if rng.random() < 0.3 else rng.uniform(0.1, 0.3)
    mitotic = rng.random(count) < mitotic_rate
    if MITOTIC_SPINDLE in main and not mitotic.any():
        mitotic[rng.integers(count)] = True
    expression = {cls: rng.uniform(0.6, 1.0) for cls in main}
    if AGGRESOME in main:
        expression[AGGRESOME] = rng.uniform(0.55, 0.8) if rng.random() < 0.3 else rng.uniform(0.15, 0.4)
    return cell_class_sets(rng, expression, mitotic, negative_image, NUCLEAR_CLASSES), mitotic


def cell_class_sets(rng: np.random.Generator, rates: dict[int, float], mitotic: np.ndarray, negative_image: bool,
                    nuclear_classes) -> list[set[int]]:
    """Each cell's classes: a class of `rates` with its probability, mitotic spindle exactly in the
    mitotic cells, no nuclear class in a mitotic cell (its nucleus has dissolved); {Negative} when empty."""
    cell_classes = []
    for cell in range(len(mitotic)):
        present = set()
        if not negative_image:
            for cls, rate in rates.items():
                if cls == MITOTIC_SPINDLE:
                    if mitotic[cell]:
                        present.add(cls)
                elif not (mitotic[cell] and cls in nuclear_classes) and rng.random() < rate:
                    present.add(cls)
        cell_classes.append(present or {NEGATIVE})
    return cell_classes


def image_labels_from_cells(cell_classes: list[set[int]], majority: float) -> list[int]:
    """Classes present in more than `majority` of the cells; when none is, the most frequent class."""
    if not cell_classes:
        return [NEGATIVE]
    counts: dict[int, int] = {}
    for present in cell_classes:
        for cls in present:
            counts[cls] = counts.get(cls, 0) + 1
    labels = sorted(cls for cls, n in counts.items() if n / len(cell_classes) > majority)
    if not labels:
        labels = [min(counts, key=lambda cls: (-counts[cls], cls))]
    return labels


def add_label_noise(labels: list[int], rng: np.random.Generator, rate: float) -> list[int]:
    """With probability `rate`, drop one label (when there are several) or add a wrong pattern class."""
    if rng.random() >= rate:
        return list(labels)
    if len(labels) > 1 and rng.random() < 0.5:
        dropped = labels[rng.integers(len(labels))]
        return [cls for cls in labels if cls != dropped]
    candidates = [cls for cls in PATTERN_CLASSES if cls not in labels]
    noisy = [cls for cls in labels if cls != NEGATIVE] + [int(rng.choice(candidates))]
    return sorted(noisy)


def make_field(rng: np.random.Generator, config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, list[set[int]]]:
    """One field: (H, W, 4) RGBY uint8 image, (H, W) uint16 cell label mask (cells 1..n), per-cell classes."""
    size = config.image_size
    mean_radius = config.cell_radius * size
    centres = _place_centres(rng, int(rng.integers(config.cells_min, config.cells_max + 1)), size, mean_radius)
    count = len(centres)
    cell_classes, mitotic = draw_cell_states(rng, count, config.negative_image_rate)
    radii = mean_radius * rng.uniform(0.85, 1.25, count) * np.where(mitotic, 0.75, 1.0)

    best_distance = np.full((size, size), np.inf, np.float32)
    cell_mask = np.zeros((size, size), np.uint16)
    nucleus_mask = np.zeros((size, size), np.uint16)
    windows = []
    for index, (centre, radius) in enumerate(zip(centres, radii), start=1):
        reach = 1.8 * radius
        y0, y1 = int(max(centre[0] - reach, 0)), int(min(centre[0] + reach + 1, size))
        x0, x1 = int(max(centre[1] - reach, 0)), int(min(centre[1] + reach + 1, size))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        if mitotic[index - 1]:
            body = _shape_distance(yy, xx, centre, radius, 1.0, 0.0, np.zeros((0, 3)))
        else:
            body = _shape_distance(yy, xx, centre, radius, rng.uniform(1.0, 1.5), rng.uniform(0, np.pi),
                                   _random_harmonics(rng, 0.25))
        window = (slice(y0, y1), slice(x0, x1))
        closer = (body < 1) & (body < best_distance[window])
        best_distance[window][closer] = body[closer]
        cell_mask[window][closer] = index
        if mitotic[index - 1]:
            nucleus = _shape_distance(yy, xx, centre, 0.3 * radius, 3.0, rng.uniform(0, np.pi), np.zeros((0, 3)))
        else:
            nucleus = _shape_distance(yy, xx, centre, 0.45 * radius, rng.uniform(1.0, 1.3), rng.uniform(0, np.pi),
                                      _random_harmonics(rng, 0.08))
        nucleus_mask[window][nucleus < 1] = index
        windows.append(window)
    nucleus_mask[nucleus_mask != cell_mask] = 0

    channels = np.zeros((4, size, size), np.float32)
    exposure = rng.uniform(0.8, 1.2, 4)
    protein_level = rng.uniform(0.5, 1.0)
    for index, window in enumerate(windows, start=1):
        cell_local = cell_mask[window] == index
        _paint_cell(rng, channels, window, cell_local, nucleus_mask[window] == index, centres[index - 1],
                    radii[index - 1], cell_classes[index - 1], bool(mitotic[index - 1]),
                    protein_level * rng.uniform(0.7, 1.3))
    for _ in range(config.debris_per_field):
        y, x = rng.uniform(0, size, 2)
        spot = np.zeros((size, size), np.float32)
        _draw_dots(spot, np.array([[y, x]]), rng.uniform(0.004, 0.01) * size, np.array([1.0]))
        outside = cell_mask == 0
        channels[2] += spot * outside * rng.uniform(0.6, 1.0)
        channels[int(rng.integers(0, 4))] += spot * outside * rng.uniform(0.2, 0.6)
    blur = max(size / 1024, 0.5)
    for index in range(4):
        channels[index] = cv2.GaussianBlur(channels[index], (0, 0), blur) * exposure[index]
    channels += 0.03 + 0.012 * rng.standard_normal(channels.shape).astype(np.float32)
    field = np.clip(channels * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    if np.unique(cell_mask).size - 1 != count:  # every cell keeps at least its centre pixel
        raise RuntimeError(f"synthetic generator lost a cell ({count} placed); please report the seed")
    return np.ascontiguousarray(field), cell_mask, cell_classes
