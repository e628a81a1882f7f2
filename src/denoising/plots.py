"""Figures of the graph denoising: per-class histograms and a before/after view of one class."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.utils.io import atomic_path  # noqa: E402

MAX_SCATTER_POINTS = 20_000


def _save(figure: plt.Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)


def plot_histograms(initial: np.ndarray, denoised: np.ndarray, column_names: list[str],
                    path: str | os.PathLike, bins: int = 50) -> None:
    """One panel per label column: histogram of Y_opt over Y_init, log counts."""
    n_columns = initial.shape[1]
    n_cols = 5
    n_rows = int(np.ceil(n_columns / n_cols))
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 2.8 * n_rows), squeeze=False)
    upper = max(1.0, float(np.max(denoised)) if denoised.size else 1.0)
    edges = np.linspace(0.0, upper, bins + 1)
    for column, axis in enumerate(axes.ravel()):
        if column >= n_columns:
            axis.axis("off")
            continue
        # np.histogram + stairs: one artist per curve instead of one patch per bar (much faster to draw)
        axis.stairs(np.histogram(initial[:, column], edges)[0], edges, fill=True, alpha=0.4, color="tab:gray",
                    label="Y_init")
        axis.stairs(np.histogram(denoised[:, column], edges)[0], edges, fill=True, alpha=0.5, color="tab:blue",
                    label="Y_opt")
        axis.set_yscale("log")
        axis.set_title(column_names[column][:32], fontsize=9)
        axis.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(f"Denoised label values per class ({len(initial)} cells)")
    figure.tight_layout()
    _save(figure, path)


def plot_before_after(initial: np.ndarray, denoised: np.ndarray, vectors: np.ndarray, class_name: str,
                      path: str | os.PathLike, seed: int = 0) -> None:
    """One class: cells placed by the 2nd and 3rd Laplacian eigenvectors, coloured by Y_init and by
    Y_opt, plus Y_init against Y_opt. At most MAX_SCATTER_POINTS cells are drawn (seeded sample)."""
    n_cells = len(initial)
    shown = np.arange(n_cells)
    if n_cells > MAX_SCATTER_POINTS:
        shown = np.sort(np.random.default_rng(seed).choice(n_cells, MAX_SCATTER_POINTS, replace=False))
    x_axis = vectors[shown, 1] if vectors.shape[1] > 1 else np.zeros(len(shown))
    y_axis = vectors[shown, 2] if vectors.shape[1] > 2 else np.zeros(len(shown))
    upper = max(float(denoised.max()), float(initial.max()), 1e-6)
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    for axis, values, title in ((axes[0], initial, "Y_init"), (axes[1], denoised, "Y_opt")):
        order = np.argsort(values[shown])  # high values drawn last, on top
        points = axis.scatter(x_axis[order], y_axis[order], c=values[shown][order], s=3, cmap="viridis",
                              vmin=0.0, vmax=upper)
        axis.set_title(f"{class_name}: {title}")
        axis.set_xlabel("eigenvector 2")
        axis.set_ylabel("eigenvector 3")
        figure.colorbar(points, ax=axis)
    axes[2].scatter(initial[shown], denoised[shown], s=3, alpha=0.4)
    axes[2].plot([0, upper], [0, upper], color="tab:red", linewidth=0.8)
    axes[2].set_xlabel("Y_init")
    axes[2].set_ylabel("Y_opt")
    axes[2].set_title(f"{class_name}: before vs after")
    figure.tight_layout()
    _save(figure, path)
