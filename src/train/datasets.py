"""Image-level training data: fold split, the field dataset with seeded dihedral flips, a resumable sampler.

Items are `(image, target, index)`: image a (C, S, S) uint8 tensor (the model normalises it), target a
float32 (19,) multi-hot vector, index the row in the dataset (used to de-duplicate padded evaluation
shards under DDP). The sampler yields `(index, epoch)` pairs so that the flip of an image is a pure
function of (seed, epoch, index): identical with any number of workers, processes, or after a resume.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from src.data.cache import load_field
from src.data.images import RGBY, ImageReadError
from src.data.labels import labels_to_multihot, read_label_tables
from src.data.schema import FOLDS_COLUMNS, DatasetLayout
from src.utils.io import UserInputError

log = logging.getLogger(__name__)


class SampleReadError(UserInputError):
    """A training sample whose files cannot be read.

    Its constructor takes one string, so a DataLoader worker's error is re-raised in the main process with
    its own type; the re-raise prefixes the worker's traceback, which is cut back to the original line."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "  # the traceback's last line: module.SampleReadError: message
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


# What reading a damaged or missing field / cache / record raises.
SAMPLE_READ_ERRORS = (ImageReadError, OSError, ValueError, EOFError)


def read_folds(layout: DatasetLayout) -> pd.DataFrame:
    path = layout.folds_csv
    if not path.is_file():
        raise UserInputError(f"{path}: folds table not found (run src.preprocessing.create_imagelevel_folds)")
    folds = pd.read_csv(path, dtype={"ID": str, "source": str})
    missing = set(FOLDS_COLUMNS) - set(folds.columns)
    if missing:
        raise UserInputError(f"{path}: missing column(s) {sorted(missing)}")
    return folds[list(FOLDS_COLUMNS)]


def fold_split(layout: DatasetLayout, fold: int, use_public: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) tables with ID, source, Label, fold: valid = folds.csv fold == `fold`, train = the rest.

    Images of the label tables absent from folds.csv (e.g. filtered out when the folds were made) are left
    out, with a log line.
    """
    public_csv = layout.public_csv if use_public else None
    if use_public and not layout.public_csv.is_file():
        raise UserInputError(f"{layout.public_csv}: public label table not found")
    labels = read_label_tables(layout.train_csv, public_csv)
    folds = read_folds(layout)
    table = labels.merge(folds, on=["ID", "source"], how="inner")
    left_out = len(labels) - len(table)
    if left_out:
        log.info("%d labelled images are not in %s and are left out", left_out, layout.folds_csv)
    known = sorted(int(f) for f in table["fold"].unique())
    if fold not in known:
        raise UserInputError(f"fold {fold} not in {layout.folds_csv} (folds: {known})")
    valid = table[table["fold"] == fold].reset_index(drop=True)
    train = table[table["fold"] != fold].reset_index(drop=True)
    return train, valid


def dihedral(field: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 symmetries of the square on an (H, W, C) array: rot90 by transform % 4, then a
    left-right flip when transform >= 4. 0 is the identity."""
    out = np.rot90(field, transform % 4, axes=(0, 1))
    return out[:, ::-1] if transform >= 4 else out


def dihedral_index(seed: int, epoch: int, index: int) -> int:
    return int(np.random.default_rng([seed, epoch, index]).integers(8))


class ImageLevelDataset(Dataset):
    """Fields at `img_size` from the decoded-image cache (or decoded from PNG when not cached)."""

    def __init__(self, layout: DatasetLayout, table: pd.DataFrame, img_size: int, augment: bool = False,
                 seed: int = 0, in_channels: int = 4, targets: np.ndarray | None = None):
        if in_channels > len(RGBY):
            raise ValueError(f"the data has {len(RGBY)} channels; in_channels={in_channels}")
        self.layout, self.img_size, self.augment, self.seed = layout, img_size, augment, seed
        self.in_channels = in_channels
        self.ids = table["ID"].tolist()
        self.sources = table["source"].tolist()
        self.targets = (labels_to_multihot(table["Label"].tolist()) if targets is None else targets).astype(np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            field = load_field(self.layout, self.sources[index], self.ids[index], self.img_size)
        except SAMPLE_READ_ERRORS as error:
            raise SampleReadError(f"{self.sources[index]} image {self.ids[index]}: {error}") from None
        field = field[..., :self.in_channels]
        if self.augment:
            field = dihedral(field, dihedral_index(self.seed, epoch, index))
        image = torch.from_numpy(np.ascontiguousarray(field.transpose(2, 0, 1)))
        return image, torch.from_numpy(self.targets[index]), index


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, padded equal shards per rank) that yields
    `(index, epoch)` and can start part-way through its epoch (`set_start(n)` skips this rank's first n)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside 0..{self.num_samples}")
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return iter([(int(i), self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def micro_batch_sizes(num_samples: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """Sizes of the batches a DataLoader makes from `num_samples` samples."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest and not drop_last else [])


def make_loader(dataset: Dataset, sampler: ResumableDistributedSampler, batch_size: int, workers: int,
                pin_memory: bool = False, seed: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader whose worker seeding draws from its own generator, so it never consumes the global RNG
    (which the dropout masks use and a resume restores)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=drop_last, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))
