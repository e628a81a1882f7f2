"""The HPA cell-segmentation U-Nets (package `hpacellseg`) behind the Segmenter interface.

Used when `hpacellseg` is importable. The nuclei and cell model files are local paths (checked to
exist first: the package would otherwise try to download them). The calls mirror the package's API:

    CellSegmentator(nuclei_model, cell_model, scale_factor, device, padding, multi_channel_model=True)
    pred_nuclei([blue, ...])                     -> [(H, W, 3) uint8 prediction, ...]
    pred_cells([[red, ...], [yellow, ...], [blue, ...]]) -> [(H, W, 3) uint8 prediction, ...]
    hpacellseg.utils.label_cell(nuclei_pred, cell_pred) -> (nuclei_mask, cell_mask)

after which the same clean-up as the classical backend is applied: nuclei below a fraction of the
image's median nucleus area are dropped (the package's cut-off is a fixed pixel count), cells left
without a nucleus are dropped, and small cells cut by the border are removed.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from src.segmentation.postprocess import drop_small_relative, finish_masks


class HpaCellSegUnavailable(RuntimeError):
    """hpacellseg is not installed or its model files are missing; the message says which."""


def hpacellseg_available() -> bool:
    try:
        importlib.import_module("hpacellseg.cellsegmentator")
        importlib.import_module("hpacellseg.utils")
    except ImportError:
        return False
    return True


class HpaCellSegSegmenter:
    """Segmenter running the HPA U-Nets at `work_size` px on the long side (scale_factor = work_size / side).

    `min_nucleus_fraction` / `min_border_cell_fraction`: as in ClassicalParams.
    """

    name = "hpacellseg"

    def __init__(self, nuclei_model: str | os.PathLike | None, cell_model: str | os.PathLike | None,
                 work_size: int = 512, device: str = "cpu", padding: bool = False,
                 min_nucleus_fraction: float = 0.15, min_border_cell_fraction: float = 0.15):
        for flag, path in (("nuclei model", nuclei_model), ("cell model", cell_model)):
            if path is None:
                raise HpaCellSegUnavailable(f"the hpacellseg backend needs a local {flag} file (nothing is downloaded)")
            if not Path(path).is_file():
                raise HpaCellSegUnavailable(f"{flag} file {path} not found (nothing is downloaded)")
        try:
            self._cellsegmentator = importlib.import_module("hpacellseg.cellsegmentator")
            self._utils = importlib.import_module("hpacellseg.utils")
        except ImportError as error:
            raise HpaCellSegUnavailable(
                f"the hpacellseg backend needs the hpacellseg package ({error}); use --backend classical") from None
        self.nuclei_model = str(nuclei_model)
        self.cell_model = str(cell_model)
        self.work_size = work_size
        self.device = device
        self.padding = padding
        self.min_nucleus_fraction = min_nucleus_fraction
        self.min_border_cell_fraction = min_border_cell_fraction
        self._segmentators: dict[float, object] = {}  # one per scale factor (field size); models load once each

    def _segmentator(self, scale_factor: float):
        key = round(scale_factor, 6)
        if key not in self._segmentators:
            self._segmentators[key] = self._cellsegmentator.CellSegmentator(
                nuclei_model=self.nuclei_model, cell_model=self.cell_model, scale_factor=scale_factor,
                device=self.device, padding=self.padding, multi_channel_model=True)
        return self._segmentators[key]

    def segment(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if field.ndim != 3 or field.shape[2] < 4:
            raise ValueError(f"expected an (H, W, 4) RGBY field, got shape {field.shape}")
        if field.dtype == np.uint16:
            from src.data.images import to_uint8

            field = to_uint8(field)
        full_shape = field.shape[:2]
        scale_factor = min(1.0, self.work_size / max(full_shape))
        red, blue, yellow = (np.ascontiguousarray(field[..., c]) for c in (0, 2, 3))
        segmentator = self._segmentator(scale_factor)
        nuclei_pred = segmentator.pred_nuclei([blue])[0]
        cell_pred = segmentator.pred_cells([[red], [yellow], [blue]])[0]
        nuclei, cells = self._utils.label_cell(nuclei_pred, cell_pred)
        nuclei = drop_small_relative(np.asarray(nuclei).astype(np.uint16), self.min_nucleus_fraction)
        return finish_masks(nuclei, np.asarray(cells).astype(np.uint16), full_shape, self.min_border_cell_fraction)
