"""The published HPA cell-segmentation U-Nets behind the Segmenter interface, without the
hpacellseg package: our loader and pre-processing (src.segmentation.hpa_models), the package's
label_cell re-implemented (src.segmentation.hpa_labels), then the clean-up every backend ends with.

Several fields go through each model in one forward pass (`segment_batch`); fields are grouped by
working shape. The network runs at `work_size` px on the long side (scale factor = work_size / side:
0.25 for 2048-px fields, as the package is used on HPA fields); the prediction maps are scaled back
to the field size and labelled there, with the package's pixel sizes scaled to the field
(hpa_labels.LabelSizes). After label_cell: nuclei below a fraction of the image's median nucleus
area are dropped (the package's cut-off is a fixed pixel count), cells left without a nucleus are
dropped, and small cells cut by the border are removed.
"""
from __future__ import annotations

import os

import numpy as np

from src.segmentation.hpa_labels import PACKAGE_FIELD_SIZE, PACKAGE_SIZES, label_cells_from_maps
from src.segmentation.hpa_models import (HpaModelError, check_model, full_resolution_maps, load_model, network_inputs,
                                         padding_for, predict, resolve_device, working_shape)
from src.segmentation.postprocess import drop_small_relative, finish_masks

__all__ = ["HpaCellSegSegmenter", "HpaModelError"]


class HpaCellSegSegmenter:
    """Segmenter running the HPA U-Nets. Loading checks both models with a tiny forward pass, so a
    wrong file fails here, before any field. `min_nucleus_fraction` / `min_border_cell_fraction`:
    as in ClassicalParams."""

    name = "hpacellseg"

    def __init__(self, nuclei_model: str | os.PathLike | None, cell_model: str | os.PathLike | None,
                 work_size: int = 512, device: str = "auto", batch_size: int = 4, amp: bool = False,
                 allow_pickled_model: bool = False, min_nucleus_fraction: float = 0.15,
                 min_border_cell_fraction: float = 0.15):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = resolve_device(device)
        self.models = {}
        for role, path in (("nuclei", nuclei_model), ("cell", cell_model)):
            model = load_model(path, role, self.device, allow_pickled_model)
            check_model(model, role, path, self.device)
            self.models[role] = model
        self.work_size = work_size
        self.batch_size = batch_size
        self.amp = amp
        self.min_nucleus_fraction = min_nucleus_fraction
        self.min_border_cell_fraction = min_border_cell_fraction

    def scale_for(self, shape: tuple[int, int]) -> float:
        return min(1.0, self.work_size / max(shape))

    def segment(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.segment_batch([field])[0]

    def predict_maps(self, fields: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per field, the (nuclei, cell) uint8 prediction maps at the field's size, as the package's
        pred_nuclei / pred_cells give them; up to `batch_size` fields of one working shape per pass."""
        fields = [_as_uint8_rgby(field) for field in fields]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, field in enumerate(fields):
            groups.setdefault(working_shape(field.shape[:2], self.scale_for(field.shape[:2])), []).append(index)
        maps: list = [None] * len(fields)
        for shape, indices in groups.items():
            padding = padding_for(shape)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                inputs = [network_inputs(fields[i], self.scale_for(fields[i].shape[:2])) for i in chunk]
                outputs = {}
                for position, role in enumerate(("nuclei", "cell")):
                    batch = np.stack([pair[position] for pair in inputs])
                    outputs[role] = predict(self.models[role], batch, self.device, self.amp).cpu().numpy()
                for row, i in enumerate(chunk):
                    maps[i] = (full_resolution_maps(outputs["nuclei"][row], padding, fields[i].shape[:2], True),
                               full_resolution_maps(outputs["cell"][row], padding, fields[i].shape[:2], False))
        return maps

    def segment_batch(self, fields: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(nuclei, cells) full-resolution uint16 label masks per field."""
        return [self.label_maps(nuclei_pred, cell_pred)
                for nuclei_pred, cell_pred in self.predict_maps(fields)]

    def label_maps(self, nuclei_pred: np.ndarray, cell_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One field's prediction maps -> (nuclei, cells): label_cell, then our clean-up."""
        shape = nuclei_pred.shape[:2]
        nuclei, cells = label_cells_from_maps(nuclei_pred, cell_pred, PACKAGE_SIZES.scaled(max(shape) / PACKAGE_FIELD_SIZE))
        nuclei = drop_small_relative(nuclei, self.min_nucleus_fraction)
        return finish_masks(nuclei, cells, shape, self.min_border_cell_fraction)


def _as_uint8_rgby(field: np.ndarray) -> np.ndarray:
    if field.ndim != 3 or field.shape[2] < 4:
        raise ValueError(f"expected an (H, W, 4) RGBY field, got shape {field.shape}")
    if field.dtype == np.uint16:
        from src.data.images import to_uint8

        return to_uint8(field)
    if field.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 field, got {field.dtype}")
    return field
