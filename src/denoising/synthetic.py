"""Generated cells for testing and benchmarking the graph denoising: clustered embeddings whose
clusters share classes, with a known fraction of each class's positives given a wrongly low label.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.predict import pseudo_label_store as store


@dataclass
class ClusteredCells:
    """embeddings (N, D), predictions (N, C) float32 in [0, 1], and the truth behind them."""

    embeddings: np.ndarray
    predictions: np.ndarray
    cluster: np.ndarray      # (N,) int: the cluster of each cell
    positive: np.ndarray     # (N, C) bool: the class truly present in the cell
    lowered: np.ndarray      # (N, C) bool: positive but initial label pushed below `low_label_max`


def make_clustered_cells(n_cells: int, n_dims: int = 1024, n_classes: int = 19, n_clusters: int = 40,
                         lowered_fraction: float = 0.3, low_label_max: float = 0.4, center_scale: float = 0.25,
                         latent_dims: int = 8, latent_scale: float = 0.1,
                         second_class_probability: float = 0.3, seed: int = 0,
                         dtype: type = np.float16, block_rows: int = 16384,
                         embedding_style: str = "gaussian") -> ClusteredCells:
    """Cells in clusters; every cluster carries one or two classes, and so do all its cells.

    embedding_style 'gaussian': cell = center + B_c t + noise, with centers ~ N(0, center_scale^2 I),
    a random (D x latent_dims) basis B_c per cluster scaled by latent_scale, t ~ N(0, I) and unit
    noise: isotropic noise dominates the distances, so a cell's nearest neighbours are mostly chance.
    'relu': a low-dimensional manifold, as network features are: a latent_dims-d code z = c + latent_scale
    * 10 * t with cluster codes c ~ N(0, (center_scale * 10)^2 I), mapped by relu(z M) with one random
    (latent_dims x D) matrix M, plus noise of 0.05; neighbours follow the codes.

    Initial labels: positives ~ U(0.6, 1), negatives ~ 0.3 * Beta(1, 6). Then, per class, a random
    `lowered_fraction` of its positives get a label ~ U(0, low_label_max) instead: the cells that
    denoising should recover. Cluster sizes vary (Dirichlet(2) proportions).
    """
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(n_clusters, 2.0))
    cluster = rng.choice(n_clusters, size=n_cells, p=proportions)
    if embedding_style == "gaussian":
        embeddings = _gaussian_embeddings(rng, cluster, n_clusters, n_dims, center_scale, latent_dims, latent_scale,
                                          dtype, block_rows)
    elif embedding_style == "relu":
        embeddings = _relu_embeddings(rng, cluster, n_clusters, n_dims, center_scale, latent_dims, latent_scale,
                                      dtype, block_rows)
    else:
        raise ValueError(f"unknown embedding_style {embedding_style!r}: 'gaussian' or 'relu'")

    cluster_classes = np.zeros((n_clusters, n_classes), dtype=bool)
    cluster_classes[np.arange(n_clusters), np.arange(n_clusters) % n_classes] = True
    with_second = rng.random(n_clusters) < second_class_probability
    cluster_classes[np.flatnonzero(with_second), rng.integers(0, n_classes, int(with_second.sum()))] = True
    positive = cluster_classes[cluster]

    predictions = np.where(positive, rng.uniform(0.6, 1.0, positive.shape),
                           0.3 * rng.beta(1.0, 6.0, positive.shape)).astype(np.float32)
    lowered = np.zeros_like(positive)
    for class_i in range(n_classes):
        positives = np.flatnonzero(positive[:, class_i])
        chosen = rng.choice(positives, size=int(round(lowered_fraction * len(positives))), replace=False)
        lowered[chosen, class_i] = True
    predictions[lowered] = rng.uniform(0.0, low_label_max, int(lowered.sum()))
    return ClusteredCells(embeddings, predictions, cluster, positive, lowered)


def _gaussian_embeddings(rng, cluster, n_clusters, n_dims, center_scale, latent_dims, latent_scale, dtype,
                         block_rows) -> np.ndarray:
    centers = (center_scale * rng.standard_normal((n_clusters, n_dims))).astype(np.float32)
    bases = (latent_scale * rng.standard_normal((n_clusters, latent_dims, n_dims))).astype(np.float32)
    embeddings = np.empty((len(cluster), n_dims), dtype=dtype)
    for start in range(0, len(cluster), block_rows):
        stop = min(start + block_rows, len(cluster))
        noise = rng.standard_normal((stop - start, n_dims), dtype=np.float32)
        latent = rng.standard_normal((stop - start, 1, latent_dims), dtype=np.float32)
        structure = (latent @ bases[cluster[start:stop]])[:, 0]
        embeddings[start:stop] = centers[cluster[start:stop]] + structure + noise
    return embeddings


def _relu_embeddings(rng, cluster, n_clusters, n_dims, center_scale, latent_dims, latent_scale, dtype,
                     block_rows) -> np.ndarray:
    codes = (10 * center_scale * rng.standard_normal((n_clusters, latent_dims))).astype(np.float32)
    mapping = (rng.standard_normal((latent_dims, n_dims)) / np.sqrt(latent_dims)).astype(np.float32)
    embeddings = np.empty((len(cluster), n_dims), dtype=dtype)
    for start in range(0, len(cluster), block_rows):
        stop = min(start + block_rows, len(cluster))
        spread = rng.standard_normal((stop - start, latent_dims), dtype=np.float32)
        latent = codes[cluster[start:stop]] + 10 * latent_scale * spread
        noise = rng.standard_normal((stop - start, n_dims), dtype=np.float32)
        embeddings[start:stop] = np.maximum(latent @ mapping, 0.0) + 0.05 * noise
    return embeddings


def write_pseudo_label_store(path: Path, predictions: np.ndarray, embeddings: np.ndarray, cells_per_image: int,
                             compression: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write generated cells as a unified pseudo-label HDF5 at `path`, `cells_per_image` cells to an image
    (IDs img000000, img000001, ...). Returns (image IDs as str, cell_i) of the rows, in order."""
    n_cells = len(predictions)
    image_ids = store.encode_ids([f"img{i // cells_per_image:06d}" for i in range(n_cells)])
    cell_indices = (np.arange(n_cells) % cells_per_image).astype(np.int32)
    no_code = np.zeros(n_cells, np.int8)
    store.write_part(path, "generated", store.CellRows(image_ids, cell_indices, no_code.astype(np.uint8), no_code,
                                                       predictions.astype(np.float16), embeddings))
    store.unify(path, compression=compression)
    return image_ids.astype(str), cell_indices
