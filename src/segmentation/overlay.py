"""HPA-style picture of a field with cell outlines: microtubules red, protein green, nuclei blue,
ER yellow; predicted cells outlined in white with their cell_i, nuclei in light blue, reference
cells (when given) in magenta."""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

CELL_COLOUR = (255, 255, 255)
NUCLEUS_COLOUR = (120, 200, 255)
REFERENCE_COLOUR = (255, 0, 255)


def composite_rgb(field: np.ndarray) -> np.ndarray:
    """(H, W, 4) RGBY -> (H, W, 3) uint8 RGB: red = max(red, yellow), green = max(green, yellow),
    blue = blue; each channel stretched so its 99.8th percentile is full scale."""
    planes = field.astype(np.float32)
    if field.dtype == np.uint16:
        planes /= 257.0
    red, green, blue, yellow = (planes[..., i] for i in range(4))
    rgb = np.stack([np.maximum(red, yellow), np.maximum(green, yellow), blue], axis=-1)
    top = np.percentile(rgb[::4, ::4].reshape(-1, 3), 99.8, axis=0)
    rgb *= 255.0 / np.maximum(top, 20.0)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of each object that touch another label (inner boundary)."""
    grown = ndi.grey_dilation(labels, size=3)
    shrunk = ndi.grey_erosion(labels, size=3)
    return (labels > 0) & ((grown != labels) | (shrunk != labels))


def overlay(field: np.ndarray, cells: np.ndarray, nuclei: np.ndarray | None = None,
            reference: np.ndarray | None = None, max_side: int = 1024, numbers: bool = True) -> np.ndarray:
    """RGB uint8 picture of `field` (shrunk to `max_side`) with the label masks' outlines."""
    height, width = field.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    picture = composite_rgb(field)
    if factor < 1:
        picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)

    def small(labels: np.ndarray) -> np.ndarray:
        if labels.shape != (height, width):
            raise ValueError(f"mask shape {labels.shape} differs from the field's {(height, width)}")
        return cv2.resize(labels.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST) if factor < 1 else labels

    if reference is not None:
        picture[_outline(small(reference))] = REFERENCE_COLOUR
    if nuclei is not None:
        picture[_outline(small(nuclei))] = NUCLEUS_COLOUR
    shown = small(cells)
    picture[_outline(shown)] = CELL_COLOUR
    if numbers and shown.max() > 0:
        scale = max(0.35, min(size) / 1400)
        for index, centre in enumerate(ndi.center_of_mass(shown > 0, shown, range(1, int(shown.max()) + 1))):
            if np.isnan(centre[0]):
                continue
            cv2.putText(picture, str(index), (int(centre[1]), int(centre[0])), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        CELL_COLOUR, 1, cv2.LINE_AA)
    return picture
