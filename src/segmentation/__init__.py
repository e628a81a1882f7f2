"""Nuclei and cell segmentation of RGBY fields: one interface, two backends.

A segmenter is any object with `segment(field) -> (nuclei, cells)`:

- `field`: (H, W, 4) RGBY array, uint8 or uint16 (channel order red, green, blue, yellow);
- `nuclei`, `cells`: (H, W) uint16 label masks at the field's full resolution, 0 = background,
  labels 1..n; nucleus k lies inside cell k; every cell has a nucleus.

Backends: `classical` (default, weight-free, src.segmentation.classical) and `hpacellseg` (the HPA
U-Nets when that package is installed and local model files are given,
src.segmentation.hpacellseg_backend). Both apply the same clean-up (src.segmentation.postprocess).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

BACKENDS = ("classical", "hpacellseg")


class Segmenter(Protocol):
    name: str

    def segment(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 4) RGBY field -> full-resolution (nuclei, cells) uint16 label masks."""
        ...


class ClassicalSegmenter:
    """The classical backend behind the Segmenter interface."""

    name = "classical"

    def __init__(self, params=None):
        from src.segmentation.classical import ClassicalParams

        self.params = params or ClassicalParams()

    def segment(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from src.segmentation.classical import segment_field

        return segment_field(field, self.params)


def make_segmenter(backend: str = "classical", *, work_size: int = 512, nuclei_model: str | None = None,
                   cell_model: str | None = None, device: str = "cpu", use_green: bool = False) -> Segmenter:
    """Build a segmenter by name. `work_size`: long side (px) at which segmentation runs (the
    classical working size; for hpacellseg the scale factor is work_size / field size)."""
    if backend == "classical":
        from src.segmentation.classical import ClassicalParams

        return ClassicalSegmenter(ClassicalParams(work_size=work_size, use_green=use_green))
    if backend == "hpacellseg":
        from src.segmentation.hpacellseg_backend import HpaCellSegSegmenter

        return HpaCellSegSegmenter(nuclei_model=nuclei_model, cell_model=cell_model, work_size=work_size,
                                   device=device)
    raise ValueError(f"unknown segmentation backend {backend!r}; choose one of {BACKENDS}")
