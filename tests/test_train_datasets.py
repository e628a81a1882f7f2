"""Fold split, the field dataset (cache, flips) and the resumable sampler."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.data.schema import DatasetLayout
from src.train.datasets import (ImageLevelDataset, ResumableDistributedSampler, dihedral, dihedral_index,
                                fold_split, micro_batch_sizes)
from src.utils.io import UserInputError
from tests.test_train_helpers import make_tiny_dataset


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> DatasetLayout:
    return DatasetLayout(make_tiny_dataset(tmp_path_factory.mktemp("ds"), num_images=10, size=16, folds=3))


def test_fold_split(layout: DatasetLayout) -> None:
    train, valid = fold_split(layout, 1)
    folds = pd.read_csv(layout.folds_csv)
    assert sorted(valid["ID"]) == sorted(folds.loc[folds["fold"] == 1, "ID"])
    assert set(train["ID"]).isdisjoint(valid["ID"]) and len(train) + len(valid) == 10
    with pytest.raises(UserInputError, match="fold 7"):
        fold_split(layout, 7)


def test_images_missing_from_folds_are_left_out(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path, num_images=6, size=16, folds=2)
    folds = pd.read_csv(root / "folds.csv")
    folds.iloc[1:].to_csv(root / "folds.csv", index=False)
    train, valid = fold_split(DatasetLayout(root), 0)
    assert "img000" not in set(train["ID"]) | set(valid["ID"]) and len(train) + len(valid) == 5


def test_dataset_items_targets_and_cache(layout: DatasetLayout) -> None:
    train, _ = fold_split(layout, 0)
    dataset = ImageLevelDataset(layout, train, img_size=16)
    image, target, index = dataset[2]
    assert image.shape == (4, 16, 16) and str(image.dtype) == "torch.uint8" and index == 2
    labels = [int(v) for v in train["Label"][2].split("|")]
    assert sorted(np.flatnonzero(target.numpy()).tolist()) == sorted(labels)
    cached = np.full((8, 8, 4), 7, np.uint8)
    layout.cache_dir(8).mkdir(parents=True, exist_ok=True)
    np.save(layout.cache_path(8, train["ID"][0]), cached)
    assert (ImageLevelDataset(layout, train, img_size=8)[0][0].numpy() == 7).all()
    rgb = ImageLevelDataset(layout, train, img_size=16, in_channels=3)[2][0]
    assert np.array_equal(rgb.numpy(), image.numpy()[:3])


def test_dihedral_flips_are_seeded_by_epoch_and_index(layout: DatasetLayout) -> None:
    field = np.random.default_rng(0).integers(0, 255, (5, 5, 2)).astype(np.uint8)
    views = {dihedral(field, t).tobytes() for t in range(8)}
    assert len(views) == 8 and np.array_equal(dihedral(field, 0), field)
    train, _ = fold_split(layout, 0)
    dataset = ImageLevelDataset(layout, train, img_size=16, augment=True, seed=3)
    plain = ImageLevelDataset(layout, train, img_size=16)
    for epoch in range(3):
        for index in range(len(dataset)):
            expected = dihedral(plain[index][0].numpy().transpose(1, 2, 0), dihedral_index(3, epoch, index))
            assert np.array_equal(dataset[(index, epoch)][0].numpy().transpose(1, 2, 0), expected)
    transforms = {dihedral_index(3, epoch, 0) for epoch in range(30)}
    assert len(transforms) > 4


def test_sampler_shards_start_and_tags() -> None:
    data = list(range(10))
    single = ResumableDistributedSampler(data, shuffle=True, seed=5)
    single.set_epoch(2)
    order = [index for index, _ in single]
    assert sorted(order) == data and all(epoch == 2 for _, epoch in single)
    shards = []
    for rank in range(2):
        sampler = ResumableDistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(2)
        shards.append([index for index, _ in sampler])
    assert sorted(shards[0] + shards[1]) == data
    assert shards[0] == order[0::2] and shards[1] == order[1::2]
    single.set_start(4)
    assert [index for index, _ in single] == order[4:] and len(single) == 6
    assert micro_batch_sizes(10, 4) == [4, 4, 2] and micro_batch_sizes(10, 4, drop_last=True) == [4, 4]
