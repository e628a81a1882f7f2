"""Slow, plain reference of the graph denoising, for tests and the benchmark only.

It solves the same objective as src.denoising.solver without the shortcuts of the fast path:
brute-force kNN over a dense float64 distance matrix, the exact dense eigendecomposition of the
normalised Laplacian (numpy.linalg.eigh), an iterative weighted-lasso solver per label column for the
A-step (cyclic coordinate descent on the Gram matrix, which does not assume V^T V = I), and a Y-step
that evaluates every candidate minimiser instead of using the clip formula. Dense N x N memory:
keep N at a few thousand.
"""
from __future__ import annotations

import numpy as np

from src.denoising.solver import fraction_settled, objective


def reference_adjacency(embeddings: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """Dense symmetric 0/1 kNN adjacency max(W, W^T) by brute force in float64 (zero-norm rows: no edges).

    k counts the cell itself, as the reference's kneighbors_graph(include_self=True) does, and the
    Laplacian ignores that self loop: each cell is linked to its k - 1 nearest others.
    """
    points = np.asarray(embeddings, dtype=np.float64)
    usable = np.ones(len(points), dtype=bool)
    if metric == "cosine":
        norms = np.linalg.norm(points, axis=1)
        usable = norms > 0
        points = points / np.where(usable, norms, 1.0)[:, None]
    usable_rows = np.flatnonzero(usable)
    kept = points[usable_rows]
    squared = (kept ** 2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * kept @ kept.T
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k - 1]
    adjacency = np.zeros((len(points), len(points)))
    adjacency[np.repeat(usable_rows, k - 1), usable_rows[nearest.ravel()]] = 1.0
    return np.maximum(adjacency, adjacency.T)


def reference_eigenpairs(adjacency: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m smallest eigenpairs of the dense L = I - D^-1/2 W D^-1/2 (isolated nodes: zero rows of W)."""
    degrees = adjacency.sum(axis=1)
    inv_sqrt = np.where(degrees > 0, 1.0 / np.sqrt(np.where(degrees > 0, degrees, 1.0)), 0.0)
    laplacian = np.eye(len(adjacency)) - inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]
    eigenvalues, vectors = np.linalg.eigh(laplacian)
    return np.maximum(eigenvalues[:m], 0.0), vectors[:, :m]


def weighted_lasso_coordinate_descent(gram: np.ndarray, correlation: np.ndarray, weights: np.ndarray,
                                      start: np.ndarray | None = None, tol: float = 1e-10,
                                      max_sweeps: int = 10_000) -> np.ndarray:
    """argmin_a 1/2 a^T G a - c^T a + sum_i w_i |a_i|, i.e. 1/2||y - V a||^2 + sum_i w_i|a_i| with
    G = V^T V, c = V^T y, by cyclic coordinate descent until no coordinate moves by more than tol."""
    coefficients = np.zeros(len(correlation)) if start is None else start.astype(np.float64).copy()
    for _ in range(max_sweeps):
        largest_move = 0.0
        for i in range(len(coefficients)):
            partial = correlation[i] - gram[i] @ coefficients + gram[i, i] * coefficients[i]
            updated = np.sign(partial) * max(abs(partial) - weights[i], 0.0) / gram[i, i]
            largest_move = max(largest_move, abs(updated - coefficients[i]))
            coefficients[i] = updated
        if largest_move <= tol:
            break
    return coefficients


def reference_y_step(smooth: np.ndarray, initial: np.ndarray, gamma: float) -> np.ndarray:
    """Elementwise argmin_{y>=0} 1/2 (y - z)^2 + gamma |y - y0|, choosing among all candidate points.

    The minimiser of this convex piecewise quadratic is a stationary point of one piece
    (z - gamma or z + gamma), the kink y0, or the bound 0; take the candidate with the lowest value.
    """
    candidates = np.stack([smooth - gamma, smooth + gamma, initial, np.zeros_like(smooth)])
    candidates = np.maximum(candidates, 0.0)
    values = 0.5 * (candidates - smooth) ** 2 + gamma * np.abs(candidates - initial)
    return np.take_along_axis(candidates, values.argmin(axis=0)[None], axis=0)[0]


def reference_denoise(vectors: np.ndarray, eigenvalues: np.ndarray, initial: np.ndarray, lam: float,
                      gamma: float, tol_fraction: float = 0.999, rel_change: float = 0.01,
                      max_iter: int = 1000, abs_floor: float = 1e-4) -> tuple[np.ndarray, np.ndarray, int]:
    """Same alternation and stopping rule as solver.denoise, in float64 with the slow steps.

    Returns (Y, A, iterations).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    initial = np.asarray(initial, dtype=np.float64)
    gram = vectors.T @ vectors
    weights = lam * np.sqrt(np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0))
    labels = initial.copy()
    coefficients = np.zeros((vectors.shape[1], initial.shape[1]))
    iteration = 0
    for iteration in range(1, max_iter + 1):
        for column in range(initial.shape[1]):
            coefficients[:, column] = weighted_lasso_coordinate_descent(
                gram, vectors.T @ labels[:, column], weights, start=coefficients[:, column])
        updated = reference_y_step(vectors @ coefficients, initial, gamma)
        settled = fraction_settled(labels, updated, rel_change, abs_floor)
        labels = updated
        if settled >= tol_fraction:
            break
    for column in range(initial.shape[1]):
        coefficients[:, column] = weighted_lasso_coordinate_descent(
            gram, vectors.T @ labels[:, column], weights, start=coefficients[:, column])
    return labels, coefficients, iteration


def reference_pipeline(embeddings: np.ndarray, initial: np.ndarray, k: int, m: int, lam: float, gamma: float,
                       metric: str = "l2", **stopping) -> dict:
    """Whole slow path: dense kNN graph, dense eigh, iterative solver. Returns a dict with
    adjacency, eigenvalues, vectors, labels (Y), coefficients (A), iterations and objective."""
    adjacency = reference_adjacency(embeddings, k, metric)
    eigenvalues, vectors = reference_eigenpairs(adjacency, m)
    labels, coefficients, iterations = reference_denoise(vectors, eigenvalues, initial, lam, gamma, **stopping)
    value = objective(vectors, eigenvalues, coefficients, labels, initial, lam, gamma)
    return {"adjacency": adjacency, "eigenvalues": eigenvalues, "vectors": vectors, "labels": labels,
            "coefficients": coefficients, "iterations": iterations, "objective": value}
