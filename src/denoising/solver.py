"""The graph-signal denoising objective and its alternating minimisation (fast, closed-form steps).

    min over A (m x C), Y >= 0:  1/2 ||Y - V A||_F^2 + lam * sum_j ||diag(sqrt(e)) a_j||_1 + gamma ||Y - Y0||_1

V (N x m) has orthonormal columns (smallest Laplacian eigenvectors), e their eigenvalues.
- A-step (Y fixed): since V^T V = I, 1/2||Y - V A||^2 = 1/2||V^T Y - A||^2 + const, so the minimiser is
  the row-wise soft-thresholding A = soft(V^T Y, lam * sqrt(e)).
- Y-step (A fixed, Z = V A): per entry, min_y>=0 1/2 (y - z)^2 + gamma |y - y0|, whose minimiser is
  y0 + soft(z - y0, gamma) = clip(y0, z - gamma, z + gamma), then max(., 0) (the objective is convex
  in y, so clipping the unconstrained minimiser onto y >= 0 is exact).
Both steps minimise exactly, so the objective never increases. The columns are independent.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


def soft_threshold(values: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """sign(x) * max(|x| - t, 0), elementwise with broadcasting."""
    return np.sign(values) * np.maximum(np.abs(values) - threshold, 0.0)


def coefficient_thresholds(eigenvalues: np.ndarray, lam: float) -> np.ndarray:
    """(m, 1) per-eigenvector L1 weights lam * sqrt(e) (e clipped at 0 against rounding)."""
    return (lam * np.sqrt(np.maximum(eigenvalues, 0.0))).astype(np.float32)[:, None]


def a_step(vectors: np.ndarray, labels: np.ndarray, eigenvalues: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form A = soft(V^T Y, lam * sqrt(e)) for V with orthonormal columns; (m, C) float32."""
    return soft_threshold(vectors.T @ labels, coefficient_thresholds(eigenvalues, lam)).astype(np.float32)


def y_step(smooth: np.ndarray, initial: np.ndarray, gamma: float) -> np.ndarray:
    """Elementwise argmin over y >= 0 of 1/2 (y - z)^2 + gamma |y - y0|, z = `smooth`, y0 = `initial`."""
    return np.maximum(np.clip(initial, smooth - gamma, smooth + gamma), 0.0)


def objective(vectors: np.ndarray, eigenvalues: np.ndarray, coefficients: np.ndarray, labels: np.ndarray,
              initial: np.ndarray, lam: float, gamma: float) -> float:
    """Value of the objective (float64 accumulation) at A = `coefficients`, Y = `labels`."""
    residual = labels.astype(np.float64) - vectors.astype(np.float64) @ coefficients.astype(np.float64)
    sparsity = np.sum(np.sqrt(np.maximum(eigenvalues.astype(np.float64), 0.0))[:, None] * np.abs(coefficients))
    fidelity = np.abs(labels.astype(np.float64) - initial).sum()
    return float(0.5 * np.sum(residual ** 2) + lam * sparsity + gamma * fidelity)


def fraction_settled(previous: np.ndarray, current: np.ndarray, rel_change: float, abs_floor: float) -> float:
    """Fraction of entries whose change is at most rel_change * max(|previous|, abs_floor).

    The floor keeps entries at (or near) zero from counting as unsettled because of a tiny change.
    """
    allowed = rel_change * np.maximum(np.abs(previous), abs_floor)
    return float(np.mean(np.abs(current - previous) <= allowed))


@dataclass
class DenoiseResult:
    labels: np.ndarray            # Y_opt (N, C) float32
    coefficients: np.ndarray      # A (m, C) float32
    n_iter: int
    converged: bool
    objective_history: list[float] = field(default_factory=list)


def denoise(vectors: np.ndarray, eigenvalues: np.ndarray, initial: np.ndarray, lam: float = 0.001,
            gamma: float = 0.12, tol_fraction: float = 0.999, rel_change: float = 0.01, max_iter: int = 1000,
            abs_floor: float = 1e-4, frozen_rows: np.ndarray | None = None,
            track_objective: bool = False) -> DenoiseResult:
    """Alternate the A- and Y-steps from Y = Y0 until >= tol_fraction of the entries of Y change by
    at most rel_change relative (see fraction_settled) in one iteration, or max_iter iterations.

    Args:
        vectors: V (N, m), orthonormal columns. eigenvalues: e (m,).
        initial: Y0 (N, C), values >= 0.
        lam, gamma: weights of the spectral sparsity and of the L1 fidelity to Y0.
        frozen_rows: optional (N,) bool; those rows (e.g. cells with no graph neighbours) keep Y = Y0.
        track_objective: record the objective after every iteration (costs one extra V @ A).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    initial = np.ascontiguousarray(initial, dtype=np.float32)
    eigenvalues = np.asarray(eigenvalues, dtype=np.float32)
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    if vectors.shape[0] != initial.shape[0] or vectors.shape[1] != eigenvalues.shape[0]:
        raise ValueError(f"shapes do not fit: V {vectors.shape}, e {eigenvalues.shape}, Y0 {initial.shape}")
    started = time.perf_counter()
    labels = initial.copy()
    history: list[float] = []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        coefficients = a_step(vectors, labels, eigenvalues, lam)
        updated = y_step(vectors @ coefficients, initial, gamma)
        if frozen_rows is not None:
            updated[frozen_rows] = initial[frozen_rows]
        settled = fraction_settled(labels, updated, rel_change, abs_floor)
        labels = updated
        if track_objective:
            history.append(objective(vectors, eigenvalues, coefficients, labels, initial, lam, gamma))
        if settled >= tol_fraction:
            converged = True
            break
    coefficients = a_step(vectors, labels, eigenvalues, lam)
    log_level = logging.INFO if converged else logging.WARNING
    log.log(log_level, "denoising %s after %d iterations (%.1f s; %.2f%% of entries settled)",
            "converged" if converged else "stopped at max_iter", n_iter, time.perf_counter() - started, 100 * settled)
    return DenoiseResult(labels, coefficients, n_iter, converged, history)
