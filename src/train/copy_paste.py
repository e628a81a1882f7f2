"""Copy-paste augmentation of rare cells for image-level training (`train_bestfitting --paste-rare P`).

Rare states (mitotic spindle, aggresome) reach the image labels only when most of an image's cells
show them, so the image-level model, whose per-cell predictions become the pseudo-labels, sees few
labelled examples. With probability P a training field gets one donor cell pasted at a random place
(its pixels only, at the field's scale, under the donor's record mask), and the field's target gets
the donor's class. Donors: the cells of the other training images labelled with a rare class (with
the majority rule most of them show it). The choice is a pure function of (seed, epoch, index).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from src.data.bbox_records import cell_crop_mask, read_record, record_path
from src.data.cache import load_field
from src.data.classes import CLASS_INDEX
from src.train.datasets import SAMPLE_READ_ERRORS, ImageLevelDataset, SampleReadError

RARE_CLASSES = (CLASS_INDEX["Mitotic spindle"], CLASS_INDEX["Aggresome"])
PASTE_STREAM = 7  # keeps these draws apart from the dihedral flips' stream


def paste_cell(field: np.ndarray, pixels: np.ndarray, mask: np.ndarray, top: int, left: int) -> np.ndarray:
    """A copy of `field` (H, W, C) with `pixels[mask]` ((h, w, C), (h, w) bool) written at (top, left)."""
    out = np.array(field, copy=True)
    height, width = mask.shape
    out[top:top + height, left:left + width][mask] = pixels[mask]
    return out


class RarePasteDataset(Dataset):
    """Wraps an ImageLevelDataset (training split): same items, some with a rare donor cell pasted in."""

    def __init__(self, base: ImageLevelDataset, bboxes_dir, probability: float, seed: int = 0,
                 classes: tuple[int, ...] = RARE_CLASSES):
        self.base, self.bboxes_dir, self.probability, self.seed = base, bboxes_dir, probability, seed
        self.donors: list[tuple[int, int, int]] = []  # (row of the donor image, cell_i, class)
        self._records: OrderedDict = OrderedDict()
        for row, target in enumerate(base.targets):
            for cls in classes:
                if target[cls] >= 0.5:
                    path = record_path(bboxes_dir, base.sources[row], base.ids[row])
                    if path.is_file():
                        try:
                            n_cells = read_record(path, load_mask=False).n_cells
                        except SAMPLE_READ_ERRORS as error:
                            raise SampleReadError(f"donor record {path}: {error}") from None
                        self.donors += [(row, cell_i, cls) for cell_i in range(n_cells)]

    def __len__(self) -> int:
        return len(self.base)

    def _record(self, row: int):
        if row not in self._records:
            self._records[row] = read_record(record_path(self.bboxes_dir, self.base.sources[row], self.base.ids[row]))
            if len(self._records) > 32:
                self._records.popitem(last=False)
        return self._records[row]

    def donor_cell(self, row: int, cell_i: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixels (h, w, C), mask (h, w)) of one donor cell at the base dataset's input scale."""
        base = self.base
        try:  # as the base dataset's reads: one error line, also from a DataLoader worker
            field = load_field(base.layout, base.sources[row], base.ids[row], base.img_size)[..., :base.in_channels]
            record = self._record(row)
        except SAMPLE_READ_ERRORS as error:
            raise SampleReadError(f"{base.sources[row]} image {base.ids[row]} (rare-cell donor): {error}") from None
        (y0, x0, y1, x1), labels = cell_crop_mask(record, cell_i, field.shape[:2])
        return np.asarray(field[y0:y1, x0:x1]), labels == cell_i + 1

    def __getitem__(self, key: int | tuple[int, int]):
        image, target, index = self.base[key]
        epoch = key[1] if isinstance(key, tuple) else 0
        rng = np.random.default_rng([self.seed, epoch, index, PASTE_STREAM])
        if not self.donors or rng.random() >= self.probability:
            return image, target, index
        row, cell_i, cls = self.donors[int(rng.integers(len(self.donors)))]
        if row == index:
            return image, target, index
        pixels, mask = self.donor_cell(row, cell_i)
        field = image.numpy().transpose(1, 2, 0)
        if mask.shape[0] > field.shape[0] or mask.shape[1] > field.shape[1] or not mask.any():
            return image, target, index
        top = int(rng.integers(field.shape[0] - mask.shape[0] + 1))
        left = int(rng.integers(field.shape[1] - mask.shape[1] + 1))
        pasted = paste_cell(field, pixels, mask, top, left)
        target = target.clone()
        target[cls] = 1.0
        return torch.from_numpy(np.ascontiguousarray(pasted.transpose(2, 0, 1))), target, index
