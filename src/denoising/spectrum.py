"""The m smallest eigenpairs of a graph's normalised Laplacian L = I - D^-1/2 W D^-1/2, checked.

Why not plain Lanczos on the whole graph: a graph with C connected components has the eigenvalue 0
C times, and Lanczos in exact arithmetic finds a repeated eigenvalue only once (further copies
appear only through rounding), so components went missing silently (38 of 40 found at 10k cells).
Here the zero eigenvalues are given explicitly: one per component with edges, its vector the
component's indicator weighted by sqrt(degree), normalised. The remaining smallest eigenpairs are
the largest of the deflated operator S - 2 U U^T (S = D^-1/2 W D^-1/2, U the zero eigenvectors,
whose eigenvalue 1 of S is moved to -1 where it cannot compete), found by Lanczos (ARPACK) with
float64 vectors. Every returned pair is then checked: residual ||L v - e v|| and orthonormality.
An isolated cell (no edges) is its own eigenvector with e = 1 (a zero row of S); it never takes part
in the zero eigenvalues.
"""
from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from src.utils.io import UserInputError

try:  # installed with scikit-learn
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    def threadpool_limits(*_args, **_kwargs):
        return contextlib.nullcontext()

log = logging.getLogger(__name__)

DENSE_MAX_NODES = 600       # below this, dense eigh of the whole Laplacian is cheaper than anything clever
RESIDUAL_LIMIT = 1e-3       # ||L v - e v|| above this for any returned pair fails the check
ORTHONORMAL_LIMIT = 1e-4    # max |V^T V - I| above this fails the check


class EigenCheckError(RuntimeError):
    """The eigensolver's pairs did not pass the residual or orthonormality check."""


def weighted_degrees(adjacency: sp.csr_matrix, block_rows: int = 65536) -> np.ndarray:
    """(N,) float64 row sums, a block of rows at a time (a whole-matrix float64 sum copies the graph)."""
    return np.concatenate([np.asarray(adjacency[start:start + block_rows].sum(axis=1, dtype=np.float64)).ravel()
                           for start in range(0, adjacency.shape[0], block_rows)] or [np.zeros(0)])


def normalized_adjacency(adjacency: sp.csr_matrix, block_rows: int = 65536,
                         overwrite: bool = False) -> tuple[sp.csr_matrix, np.ndarray]:
    """S = D^-1/2 W D^-1/2 (float32 CSR) and the degrees; isolated nodes get zero rows (no 1/0).

    S shares its index arrays with `adjacency`, and its values are formed block_rows rows at a time:
    at 1M cells x ~280 entries per row each whole-matrix temporary would take over 1 GB. With
    `overwrite` (and float32 values) S's values are written over the adjacency's.
    """
    adjacency = sp.csr_matrix(adjacency)
    degrees = weighted_degrees(adjacency)
    inv_sqrt = np.zeros(len(degrees), dtype=np.float32)
    inv_sqrt[degrees > 0] = 1.0 / np.sqrt(degrees[degrees > 0])
    row_sizes = np.diff(adjacency.indptr)
    in_place = overwrite and adjacency.data.dtype == np.float32
    data = adjacency.data if in_place else np.empty(adjacency.nnz, dtype=np.float32)
    for start in range(0, adjacency.shape[0], block_rows):
        stop = min(start + block_rows, adjacency.shape[0])
        first, last = adjacency.indptr[start], adjacency.indptr[stop]
        scale = np.repeat(inv_sqrt[start:stop], row_sizes[start:stop])
        scale *= inv_sqrt[adjacency.indices[first:last]]
        if in_place:
            data[first:last] *= scale
        else:
            data[first:last] = scale * adjacency.data[first:last]
    scaled = sp.csr_matrix((data, adjacency.indices, adjacency.indptr), shape=adjacency.shape)
    return scaled, degrees


def component_labels(adjacency: sp.csr_matrix, block_rows: int = 65536) -> np.ndarray:
    """(N,) int64: one node id per connected component of a symmetric graph, the same for all its nodes.

    Min-label propagation with hooking and pointer jumping, a block of rows at a time: no copy of the
    graph is made (scipy's connected_components works on a float64 copy, 12 bytes per stored entry,
    the peak of the whole stage at 1M cells). Labels only decrease and always name a node of the
    same component; when a pass changes nothing, every edge joins equal labels.
    """
    n_nodes = adjacency.shape[0]
    indptr, indices = adjacency.indptr, adjacency.indices
    labels = np.arange(n_nodes, dtype=np.int64)
    changed = True
    while changed:
        changed = False
        for start in range(0, n_nodes, block_rows):
            stop = min(start + block_rows, n_nodes)
            first, last = indptr[start], indptr[stop]
            if first == last:
                continue
            rows = np.arange(start, stop)[np.diff(indptr[start:stop + 1]) > 0]
            lowest = np.minimum.reduceat(labels[indices[first:last]], indptr[rows] - first)
            current = labels[rows]
            better = lowest < current
            if better.any():
                changed = True
                np.minimum.at(labels, current[better], lowest[better])  # hook the old root too
                np.minimum.at(labels, rows[better], lowest[better])
        while True:  # pointer jumping: every node points at its root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    return labels


def component_null_vectors(adjacency: sp.csr_matrix, degrees: np.ndarray,
                           limit: int | None = None) -> tuple[np.ndarray, int]:
    """((N, min(C, limit)) float64, C): for each connected component with edges, sqrt(degree) on its
    nodes, normalised, and the number C of such components.

    These span the null space of L exactly; components come largest first, and only the `limit`
    largest get a column (a graph of many small components would otherwise need a dense N x C array).
    """
    component = component_labels(adjacency)
    has_edges = degrees > 0
    labels, sizes = np.unique(component[has_edges], return_counts=True)
    labels = labels[np.argsort(-sizes, kind="stable")][:limit]
    column_of = np.full(len(component), -1)
    column_of[labels] = np.arange(len(labels))
    vectors = np.zeros((len(degrees), len(labels)))
    rows = np.flatnonzero(has_edges)
    rows = rows[column_of[component[rows]] >= 0]
    vectors[rows, column_of[component[rows]]] = np.sqrt(degrees[rows])
    return vectors / np.linalg.norm(vectors, axis=0), len(sizes)


def check_eigenpairs(normalized: sp.csr_matrix, eigenvalues: np.ndarray, vectors: np.ndarray,
                     isolated: np.ndarray, block_columns: int = 8) -> tuple[float, float]:
    """(largest residual ||L v - e v||, largest |V^T V - I|) of the pairs, L = I - S off isolated rows;
    a few columns at a time, so the float64 temporaries stay small at 1M cells."""
    residual = 0.0
    for start in range(0, vectors.shape[1], block_columns):
        block = np.asarray(vectors[:, start:start + block_columns], dtype=np.float64)
        applied = block - normalized @ block
        applied[isolated] = block[isolated]  # L_ii = 1 on an isolated node, as its zero row of S gives
        applied -= block * eigenvalues[None, start:start + block_columns]
        residual = max(residual, float(np.linalg.norm(applied, axis=0).max()))
    as_float64 = np.asarray(vectors, dtype=np.float64)
    gram = as_float64.T @ as_float64
    return residual, float(np.abs(gram - np.eye(len(gram))).max())


def _lanczos(normalized: sp.csr_matrix, null_vectors: np.ndarray, count: int, tol: float, seed: int,
             subspace: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` largest eigenpairs mu of S - 2 U U^T (float64 vectors, float32 sparse products)."""
    n_nodes = normalized.shape[0]

    def apply(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(n_nodes, -1)
        product = (normalized @ x.astype(np.float32)).astype(np.float64)
        product -= 2.0 * null_vectors @ (null_vectors.T @ x)
        return product.reshape(-1) if product.shape[1] == 1 else product

    operator = LinearOperator((n_nodes, n_nodes), matvec=apply, matmat=apply, dtype=np.float64)
    start = np.random.default_rng(seed).uniform(0.5, 1.5, n_nodes)
    start -= null_vectors @ (null_vectors.T @ start)
    mu, vectors = eigsh(operator, k=count, which="LA", tol=tol, v0=start,
                        ncv=min(n_nodes - 1, max(subspace, count + 1)), maxiter=max(1000, 20 * n_nodes))
    return mu, vectors


def _rest_eigenpairs(normalized: sp.csr_matrix, null_vectors: np.ndarray, count: int, tol: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Laplacian eigenvalues 1 - mu (ascending) and vectors of the next `count` pairs above the zeros."""
    n_nodes = normalized.shape[0]
    if n_nodes <= DENSE_MAX_NODES or count >= n_nodes - null_vectors.shape[1] - 1:
        dense = normalized.toarray().astype(np.float64) - 2.0 * null_vectors @ null_vectors.T
        mu, vectors = np.linalg.eigh(dense)
        mu, vectors = mu[::-1][:count], vectors[:, ::-1][:, :count]
    else:
        try:
            mu, vectors = _lanczos(normalized, null_vectors, count, tol, seed, 2 * count + 1)
        except ArpackNoConvergence:
            log.warning("Lanczos did not converge; retrying with a subspace twice as large")
            try:
                mu, vectors = _lanczos(normalized, null_vectors, count, tol, seed, 4 * count + 1)
            except ArpackNoConvergence as error:
                raise EigenCheckError(f"eigensolver did not converge for {count} eigenpairs of {n_nodes} cells "
                                      f"({len(error.eigenvalues)} converged); try fewer --n-eigenvectors") from None
    order = np.argsort(-mu)
    return 1.0 - mu[order], vectors[:, order]


def smallest_laplacian_eigenpairs(adjacency: sp.csr_matrix, m: int = 50, tol: float = 1e-6, seed: int = 0,
                                  overwrite_adjacency: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The m smallest eigenpairs of L = I - D^-1/2 W D^-1/2, every one checked.

    Returns:
        eigenvalues (m,) float32 ascending in [0, 2] (exactly 0 once per connected component with
        edges), V (N, m) float32 with orthonormal columns.
    overwrite_adjacency: the adjacency's float32 values may be overwritten (saves 4 bytes per stored
        entry; the stage passes True once the graph is no longer needed).
    Raises:
        UserInputError when m is not in (0, N); EigenCheckError when a pair fails its residual or
        orthonormality check after one refinement.
    """
    n_nodes = adjacency.shape[0]
    if not 0 < m < n_nodes:
        raise UserInputError(f"{m} eigenvectors wanted from a graph of {n_nodes} cells; need 0 < m < N")
    started = time.perf_counter()
    normalized, degrees = normalized_adjacency(adjacency, overwrite=overwrite_adjacency)
    null_vectors, n_components = component_null_vectors(normalized, degrees, limit=m)  # S has W's pattern
    isolated = degrees == 0
    if n_components >= m:
        log.warning("the graph has %d connected components, at least m = %d: the eigenbasis holds only "
                    "component indicators (denoising then averages within each component)", n_components, m)
        eigenvalues, vectors = np.zeros(m), null_vectors[:, :m]
        residual, orthonormality = check_eigenpairs(normalized, eigenvalues, vectors, isolated)
    else:
        # Lanczos makes many small BLAS calls; several BLAS threads on a busy machine spin far more
        # than they compute (7x slower measured on 2 shared cores), so use one.
        with threadpool_limits(limits=1, user_api="blas"):
            rest_values, rest_vectors = _rest_eigenpairs(normalized, null_vectors, m - n_components, tol, seed)
            eigenvalues = np.concatenate([np.zeros(n_components), rest_values])
            vectors = np.hstack([null_vectors, rest_vectors])
            residual, orthonormality = check_eigenpairs(normalized, eigenvalues, vectors, isolated)
            if residual > RESIDUAL_LIMIT or orthonormality > ORTHONORMAL_LIMIT:
                log.warning("eigenpairs failed the check (residual %.2g, orthonormality %.2g); refining with "
                            "tolerance %.0e", residual, orthonormality, tol / 100)
                rest_values, rest_vectors = _rest_eigenpairs(normalized, null_vectors, m - n_components,
                                                             tol / 100, seed + 1)
                eigenvalues = np.concatenate([np.zeros(n_components), rest_values])
                vectors = np.hstack([null_vectors, rest_vectors])
                residual, orthonormality = check_eigenpairs(normalized, eigenvalues, vectors, isolated)
    if residual > RESIDUAL_LIMIT or orthonormality > ORTHONORMAL_LIMIT:
        raise EigenCheckError(f"eigenpairs of the {n_nodes}-cell graph failed the check: residual {residual:.2g} "
                              f"(limit {RESIDUAL_LIMIT:g}), orthonormality {orthonormality:.2g} "
                              f"(limit {ORTHONORMAL_LIMIT:g}); try a smaller --eigen-tol or fewer eigenvectors")
    eigenvalues = np.clip(eigenvalues, 0.0, 2.0)
    log.info("%d eigenpairs of the normalised Laplacian (%d cells, %d connected components with edges, %d "
             "isolated) in %.1f s; e in [%.4f, %.4f]; residual %.1e, orthonormality %.1e", m, n_nodes,
             n_components, int(isolated.sum()), time.perf_counter() - started, eigenvalues[0], eigenvalues[-1],
             residual, orthonormality)
    return eigenvalues.astype(np.float32), np.ascontiguousarray(vectors, dtype=np.float32)
