"""A second synthetic style, drawn another way than `src.data.synthetic` (style 1), for cross-style checks.

What differs from style 1: non-square fields of several sizes; a dense monolayer of small polygonal
cells (an anisotropic Voronoi partition of Poisson-disk nuclei, not blobs grown around colonies);
nuclei off-centre; patterns drawn as Gaussian spots, random-walk tubules, arcs and spindle-shaped
fills (not anti-aliased discs and straight fibres); many cells express their image's classes only
partly and some express a class the image is not labelled with; 16-bit channel files with a dim,
field-dependent gain and shot noise. The label story is the same: a class is an image label when more
than `majority` of the image's cells show it (`image_labels_from_cells`), so rare states (mitotic
spindle, aggresome) are usually missing from the labels while the truth keeps them per cell.
Lengths are in pixels (the cells are about 30 px across whatever the field size).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from src.data.classes import CLASS_INDEX
from src.data.synthetic import _depth, _draw_polyline, _points_in, _smooth_noise, cell_class_sets

# Classes this style draws and their weight as an image's main localisation.
STYLE2_CLASS_WEIGHTS = {CLASS_INDEX[name]: weight for name, weight in (
    ("Nucleoplasm", 1.4), ("Nucleoli", 1.2), ("Nuclear speckles", 1.0), ("Golgi apparatus", 0.8),
    ("Centrosome", 0.8), ("Plasma membrane", 0.8), ("Mitochondria", 1.4), ("Cytosol", 1.2),
    ("Vesicles and punctate cytosolic patterns", 1.0), ("Mitotic spindle", 1.0), ("Aggresome", 1.0))}
NUCLEAR = {CLASS_INDEX[n] for n in ("Nucleoplasm", "Nucleoli", "Nuclear speckles")}
MITOTIC_SPINDLE, AGGRESOME = CLASS_INDEX["Mitotic spindle"], CLASS_INDEX["Aggresome"]


@dataclass(frozen=True)
class Style2Config:
    """Parameters of the style-2 generator (lengths in px)."""

    style: int = 2
    sizes: tuple[int, ...] = (128, 160, 192)  # field height and width, each drawn from these
    cell_radius: float = 15.0       # mean cell radius
    confluence: float = 0.8         # fraction of the field (in smooth patches) where cells may sit
    majority: float = 0.5           # a class is an image label when its cell fraction exceeds this
    label_noise: float = 0.05       # probability that an image's labels get one extra error
    negative_image_rate: float = 0.08
    bit_depth: int = 16             # 16: uint16 PNGs (gain 0.3-0.8 of full scale); 8: uint8


def _place_nuclei(rng: np.random.Generator, shape: tuple[int, int], radius: float, confluence: float) -> np.ndarray:
    """Poisson-disk centres (at least 1.7 radii apart) inside smooth patches covering `confluence` of the field."""
    height, width = shape
    patches = _smooth_noise(rng, shape, 0.25 * min(shape))
    allowed = patches >= np.quantile(patches, 1 - confluence)
    target = int(confluence * height * width / (np.pi * (1.05 * radius) ** 2))
    centres: list[np.ndarray] = []
    for _ in range(target * 30):
        if len(centres) >= target:
            break
        point = rng.uniform((2, 2), (height - 2, width - 2))
        if not allowed[int(point[0]), int(point[1])]:
            continue
        if all(np.hypot(*(point - c)) >= 1.7 * radius for c in centres):
            centres.append(point)
    if not centres:
        centres.append(np.array([height / 2, width / 2]))
    return np.array(centres)


def _partition(rng: np.random.Generator, shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray,
               aspects: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Cell label mask: each pixel to the nearest centre in its cell's own scaled metric, while that
    scaled distance stays under a noisy reach (free edges are ragged, touching edges polygonal)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    best = np.full(shape, np.inf, np.float32)
    labels = np.zeros(shape, np.uint16)
    for index, (centre, radius, aspect, angle) in enumerate(zip(centres, radii, aspects, angles), start=1):
        dy, dx = yy - centre[0], xx - centre[1]
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / aspect
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        distance = np.sqrt(u * u + v * v) / radius
        closer = distance < best
        best[closer] = distance[closer]
        labels[closer] = index
    reach = 1.25 + 0.15 * _smooth_noise(rng, shape, 6.0)
    labels[best >= reach] = 0
    return labels


def _gaussian_spots(canvas: np.ndarray, points: np.ndarray, sigma: float, values: np.ndarray) -> None:
    """Add Gaussian spots (sigma in px) at sub-pixel `points` (y, x)."""
    reach = int(np.ceil(3 * sigma))
    for (y, x), value in zip(points, values):
        y0, x0 = int(np.floor(y)) - reach, int(np.floor(x)) - reach
        yy, xx = np.mgrid[y0:y0 + 2 * reach + 2, x0:x0 + 2 * reach + 2]
        spot = value * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))
        ys, xs = slice(max(y0, 0), min(y0 + 2 * reach + 2, canvas.shape[0])), slice(max(x0, 0), min(x0 + 2 * reach + 2, canvas.shape[1]))
        canvas[ys, xs] += spot[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]


def draw_cell_states_style2(rng: np.random.Generator, count: int, negative_image_rate: float) -> tuple[list[set[int]], np.ndarray]:
    """Per-cell class sets and mitotic flags: one or two main classes expressed in a random share of the
    cells (often well under all of them), plus occasional minority expression of another class."""
    classes = np.array(list(STYLE2_CLASS_WEIGHTS))
    p = np.array(list(STYLE2_CLASS_WEIGHTS.values()))
    p = p / p.sum()
    main = {int(rng.choice(classes, p=p))}
    if rng.random() < 0.45:
        main.add(int(rng.choice(classes, p=p)))
    mitotic_rate = rng.uniform(0.3, 0.6) if MITOTIC_SPINDLE in main else 0.06
    mitotic = rng.random(count) < mitotic_rate
    if MITOTIC_SPINDLE in main and not mitotic.any():
        mitotic[rng.integers(count)] = True
    share = {cls: rng.uniform(0.45, 1.0) for cls in main}
    if AGGRESOME in main:
        share[AGGRESOME] = rng.uniform(0.1, 0.45)
    if rng.random() < 0.3:  # a minority-expressed extra class, rarely an image label
        share.setdefault(int(rng.choice(classes, p=p)), rng.uniform(0.1, 0.35))
    negative_image = rng.random() < negative_image_rate
    return cell_class_sets(rng, share, mitotic, negative_image, NUCLEAR), mitotic


def _paint(rng: np.random.Generator, planes: np.ndarray, cell: np.ndarray, nucleus: np.ndarray,
           centre: np.ndarray, radius: float, classes: set[int], mitotic: bool, level: float) -> None:
    """Add one cell's four channels to `planes` (4, h, w), all arrays local to the cell's window."""
    shape = cell.shape
    cytoplasm = cell & ~nucleus
    cytoplasm = cytoplasm if cytoplasm.any() else cell
    depth = _depth(cell)
    mtoc = _points_in(rng, _ring(nucleus, cell, 3.0), 1)
    mtoc = mtoc[0] if len(mtoc) else centre
    red, green, blue, yellow = (np.zeros(shape, np.float32) for _ in range(4))
    blue += nucleus * (0.9 if mitotic else rng.uniform(0.55, 0.8)) * (1 + 0.25 * np.abs(_smooth_noise(rng, shape, 1.5)))
    # microtubules: straight rays from the organising centre to the cell edge
    edge = _points_in(rng, cell & (depth <= 1.5), 10 if mitotic else 16)
    rays = np.zeros(shape, np.float32)
    for end in edge:
        _draw_polyline(rays, np.stack([mtoc, end]), rng.uniform(0.2, 0.35), 1)
    red += rays * cell + 0.12 * cell
    yellow += cytoplasm * np.clip(0.35 + 0.25 * np.tanh(_smooth_noise(rng, shape, 2.0)), 0.05, None) \
        * np.exp(-np.maximum(depth.max() - depth, 0) / (2.0 * radius))
    for cls in classes:
        layer = np.zeros(shape, np.float32)
        if cls == CLASS_INDEX["Nucleoplasm"]:
            layer += 0.5 * nucleus * np.clip(1 + 0.3 * _smooth_noise(rng, shape, 1.0), 0.2, None)
        elif cls == CLASS_INDEX["Nucleoli"]:
            n = int(rng.integers(1, 4))
            _gaussian_spots(layer, _points_in(rng, _inner(nucleus, 2.0), n), rng.uniform(0.9, 1.4), rng.uniform(0.8, 1.1, n))
        elif cls == CLASS_INDEX["Nuclear speckles"]:
            n = int(rng.integers(8, 16))
            _gaussian_spots(layer, _points_in(rng, _inner(nucleus, 1.0), n), 0.7, rng.uniform(0.5, 0.9, n))
        elif cls == CLASS_INDEX["Centrosome"]:
            _gaussian_spots(layer, mtoc[None], 0.8, np.array([1.2]))
        elif cls == CLASS_INDEX["Golgi apparatus"]:
            offset = mtoc - centre
            angle = np.degrees(np.arctan2(offset[0], offset[1]))
            cv2.ellipse(layer, (int(round(mtoc[1])), int(round(mtoc[0]))), (3, 2), angle, -70, 70, 0.8, 2)
        elif cls == CLASS_INDEX["Plasma membrane"]:
            layer += 0.7 * cell * np.exp(-((depth - 1.0) ** 2) / 2.0)
        elif cls == CLASS_INDEX["Mitochondria"]:
            for start in _points_in(rng, cytoplasm, int(rng.integers(8, 16))):
                steps = np.cumsum(rng.normal(0, 1.6, (5, 2)), axis=0)
                _draw_polyline(layer, start + np.vstack([[0, 0], steps]), 0.6, 1)
        elif cls == CLASS_INDEX["Cytosol"]:
            layer += 0.4 * cytoplasm * np.clip(1 + 0.2 * _smooth_noise(rng, shape, 3.0), 0.2, None)
        elif cls == CLASS_INDEX["Vesicles and punctate cytosolic patterns"]:
            n = int(rng.integers(10, 24))
            _gaussian_spots(layer, _points_in(rng, cytoplasm, n), rng.uniform(0.6, 1.1), rng.uniform(0.5, 1.0, n))
        elif cls == MITOTIC_SPINDLE and mitotic:
            axis = rng.uniform(0, np.pi)
            direction = np.array([np.sin(axis), np.cos(axis)]) * 0.6 * radius
            normal = np.array([direction[1], -direction[0]]) * 0.5
            diamond = np.stack([centre - direction, centre + normal, centre + direction, centre - normal])
            cv2.fillPoly(layer, [np.round(diamond[:, ::-1] * 16).astype(np.int32)], 0.75, cv2.LINE_AA, shift=4)
            layer = cv2.GaussianBlur(layer, (0, 0), 1.0)
        elif cls == AGGRESOME:
            _gaussian_spots(layer, _points_in(rng, _ring(nucleus, cell, 4.0), 1), 2.0, np.array([1.3]))
        green += layer * cell
    planes[0] += red
    planes[1] += green * level
    planes[2] += blue
    planes[3] += yellow


def _inner(mask: np.ndarray, width: float) -> np.ndarray:
    shrunk = _depth(mask) > width
    return shrunk if shrunk.any() else mask


def _ring(nucleus: np.ndarray, cell: np.ndarray, width: float) -> np.ndarray:
    """Cytoplasm pixels within `width` px of the nucleus (the whole cytoplasm when there are none)."""
    near = cell & ~nucleus & (_depth(~nucleus) <= width)
    return near if near.any() else cell


def make_field_style2(rng: np.random.Generator, config: Style2Config) -> tuple[np.ndarray, np.ndarray, list[set[int]]]:
    """One field: (H, W, 4) RGBY uint16 (or uint8) image, (H, W) uint16 cell mask (cells 1..n), per-cell classes."""
    shape = (int(rng.choice(config.sizes)), int(rng.choice(config.sizes)))
    centres = _place_nuclei(rng, shape, config.cell_radius, config.confluence)
    count = len(centres)
    cell_classes, mitotic = draw_cell_states_style2(rng, count, config.negative_image_rate)
    radii = config.cell_radius * rng.uniform(0.8, 1.2, count) * np.where(mitotic, 0.7, 1.0)
    aspects = np.where(mitotic, 1.0, rng.uniform(1.0, 1.6, count))
    cell_mask = _partition(rng, shape, centres, radii, aspects, rng.uniform(0, np.pi, count))
    planes = np.zeros((4,) + shape, np.float32)
    protein_level = rng.uniform(0.5, 1.0)
    windows = ndimage.find_objects(cell_mask, max_label=count)
    for index, window in enumerate(windows, start=1):
        if window is None:
            raise RuntimeError(f"style-2 generator lost cell {index}; please report the seed")
        cell = cell_mask[window] == index
        origin = np.array([window[0].start, window[1].start], dtype=np.float64)
        centre = centres[index - 1] - origin
        yy, xx = np.mgrid[0:cell.shape[0], 0:cell.shape[1]]
        if mitotic[index - 1]:  # condensed chromatin: a thin plate
            angle = rng.uniform(0, np.pi)
            u = (xx - centre[1]) * np.cos(angle) + (yy - centre[0]) * np.sin(angle)
            v = -(xx - centre[1]) * np.sin(angle) + (yy - centre[0]) * np.cos(angle)
            nucleus = (u / (0.2 * radii[index - 1])) ** 2 + (v / (0.55 * radii[index - 1])) ** 2 < 1
        else:
            shift = centre + rng.normal(0, 0.12 * radii[index - 1], 2)
            axes = 0.5 * radii[index - 1] * rng.uniform(0.85, 1.15, 2)
            nucleus = ((yy - shift[0]) / axes[0]) ** 2 + ((xx - shift[1]) / axes[1]) ** 2 < 1
        nucleus = (nucleus & cell) | ((yy == round(centre[0])) & (xx == round(centre[1])) & cell)
        local = np.zeros((4,) + cell.shape, np.float32)
        _paint(rng, local, cell, nucleus, centre, radii[index - 1], cell_classes[index - 1], bool(mitotic[index - 1]),
               protein_level * rng.uniform(0.6, 1.4))
        planes[(slice(None),) + window] += local
    exposure = rng.uniform(0.7, 1.3, 4)
    background = rng.uniform(0.03, 0.08, 4)
    for c in range(4):
        planes[c] = cv2.GaussianBlur(planes[c], (0, 0), 0.6) * exposure[c] + background[c]
    photons = 400.0 * rng.uniform(0.5, 1.5)  # shot noise: Poisson counts at this many photons per unit
    planes = rng.poisson(np.clip(planes, 0, None) * photons).astype(np.float32) / photons
    full_scale = 65535 if config.bit_depth == 16 else 255
    gain = rng.uniform(0.3, 0.8) if config.bit_depth == 16 else 1.0
    dtype = np.uint16 if config.bit_depth == 16 else np.uint8
    field = np.clip(np.rint(planes * gain * full_scale), 0, full_scale).astype(dtype).transpose(1, 2, 0)
    return np.ascontiguousarray(field), cell_mask, cell_classes
