"""The demo report's figure: per-class test AP bars of each prediction row, one panel per run."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.utils.io import atomic_path  # noqa: E402


def plot_per_class_ap(per_class: pd.DataFrame, rows: list[str], path: Path) -> None:
    """per_class: columns run, name, n_true_test and one AP column per entry of `rows`; classes
    without true test cells are left out of their run's panel."""
    runs = list(dict.fromkeys(per_class["run"]))
    figure, axes = plt.subplots(len(runs), 1, figsize=(12, 3.6 * len(runs)), squeeze=False)
    width = 0.8 / len(rows)
    for axis, run in zip(axes[:, 0], runs):
        table = per_class[(per_class["run"] == run) & (per_class["n_true_test"] > 0)]
        positions = np.arange(len(table))
        for k, row in enumerate(rows):
            axis.bar(positions + (k - (len(rows) - 1) / 2) * width, table[row].fillna(0), width, label=row)
        axis.set_xticks(positions, [name[:18] for name in table["name"]], rotation=35, ha="right", fontsize=8)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel("test AP")
        axis.set_title(f"{run}: " + ", ".join(f"{row} {table[row].mean():.3f}" for row in rows))
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90, format="png")
    plt.close(figure)
