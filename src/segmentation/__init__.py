"""Nuclei and cell segmentation of RGBY fields: one interface, two backends.

A segmenter is any object with `segment(field) -> (nuclei, cells)`:

- `field`: (H, W, 4) RGBY array, uint8 or uint16 (channel order red, green, blue, yellow);
- `nuclei`, `cells`: (H, W) uint16 label masks at the field's full resolution, 0 = background,
  labels 1..n; nucleus k lies inside cell k; every cell has a nucleus.

Backends: `classical` (default, weight-free, src.segmentation.classical) and `hpacellseg` (the
published HPA U-Nets from local model files, run by our own code: src.segmentation.hpacellseg_backend;
it also has `segment_batch(fields)`, several fields per forward pass). Both apply the same clean-up
(src.segmentation.postprocess).
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
                   cell_model: str | None = None, device: str = "auto", use_green: bool = False,
                   batch_size: int = 4, amp: bool = False, allow_pickled_model: bool = False) -> Segmenter:
    """Build a segmenter by name. `work_size`: long side (px) at which segmentation runs (the
    classical working size; for hpacellseg the scale factor is work_size / field size). The
    hpacellseg arguments: model files, torch device ('auto': CUDA when present), fields per forward
    pass, mixed precision, and whether a whole pickled model may be loaded (that runs code from the
    file). Building it loads and checks both models, so a wrong file fails here."""
    if backend == "classical":
        from src.segmentation.classical import ClassicalParams

        return ClassicalSegmenter(ClassicalParams(work_size=work_size, use_green=use_green))
    if backend == "hpacellseg":
        from src.segmentation.hpacellseg_backend import HpaCellSegSegmenter

        return HpaCellSegSegmenter(nuclei_model=nuclei_model, cell_model=cell_model, work_size=work_size,
                                   device=device, batch_size=batch_size, amp=amp,
                                   allow_pickled_model=allow_pickled_model)
    raise ValueError(f"unknown segmentation backend {backend!r}; choose one of {BACKENDS}")


def checked_segmenter(backend: str = "classical", **settings) -> Segmenter:
    """make_segmenter for a CLI: a missing or wrong model file (found by loading and running it once)
    becomes a UserInputError, i.e. one error line before any field is processed."""
    from src.utils.io import UserInputError

    try:
        return make_segmenter(backend, **settings)
    except (RuntimeError, ValueError) as error:
        raise UserInputError(str(error)) from None
