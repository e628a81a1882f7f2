"""Tiny HPA-format datasets for the training tests (no tests here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.data.classes import NUM_CLASSES
from src.data.images import RGBY, write_channel


def make_tiny_dataset(root: Path, num_images: int = 16, size: int = 32, folds: int = 2, seed: int = 0) -> Path:
    """train.csv, train/{ID}_{channel}.png and folds.csv; the green channel brightens with class 0 and 1
    so that something is learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_images):
        image_id = f"img{index:03d}"
        labels = sorted(set(rng.choice(NUM_CLASSES, size=rng.integers(1, 3), replace=False).tolist()))
        for channel in RGBY:
            plane = rng.integers(0, 60, size=(size, size), dtype=np.uint8)
            if channel == "green":
                plane = plane + np.uint8(80 * (0 in labels) + 40 * (1 in labels))
            write_channel(root / "train" / f"{image_id}_{channel}.png", plane)
        rows.append((image_id, "|".join(map(str, labels))))
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"ID": [r[0] for r in rows], "source": "train",
                  "fold": [i % folds for i in range(num_images)]}).to_csv(root / "folds.csv", index=False)
    return root
