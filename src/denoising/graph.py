"""kNN graph of cell embeddings and the smallest eigenpairs of its normalised Laplacian.

The graph: every cell linked to its k nearest other cells, 0/1 weights, symmetrised by
W = max(W, W^T), so every cell has degree >= k. Its normalised Laplacian is
L = I - D^-1/2 W D^-1/2. The m smallest eigenpairs of L are the m largest of
S = D^-1/2 W D^-1/2 (e = 1 - mu), found by Lanczos on S without shift-invert.

Everything is float32 and processed in row blocks so memory stays near the size of the inputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from src.utils.io import UserInputError, atomic_path

try:  # installed with scikit-learn
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    def threadpool_limits(*_args, **_kwargs):
        return contextlib.nullcontext()

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2")
KNN_METHODS = ("exact", "ivf")
DEFAULT_BLOCK_ROWS = 8192
FAISS_DATABASE_BLOCK = 16384  # rows; the distance buffer is 4096 x this float32 (256 MB)
PCA_FIT_ROWS = 32768  # principal components of 1024-d rows are stable well before this many rows


def check_finite_rows(embeddings: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
    """Raise UserInputError naming the first bad rows when any embedding holds NaN or inf."""
    bad_rows = []
    for start in range(0, len(embeddings), block_rows):
        block = np.asarray(embeddings[start:start + block_rows])
        bad_rows.extend((start + np.flatnonzero(~np.isfinite(block).all(axis=1))).tolist())
    if bad_rows:
        raise UserInputError(f"{len(bad_rows)} of {len(embeddings)} embeddings hold NaN or inf "
                             f"(rows {bad_rows[:10]}{' ...' if len(bad_rows) > 10 else ''}); "
                             "fix the pseudo-labelling output before denoising")


def prepare_points(embeddings: np.ndarray, metric: str = "cosine", pca_dims: int = 0,
                   block_rows: int = DEFAULT_BLOCK_ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 search points from raw embeddings, and a mask of rows that can take part in the graph.

    Args:
        embeddings: (N, D) array of any float type (float16 from the HDF5 is fine).
        metric: 'cosine' (rows L2-normalised, then L2 search: the same neighbours as cosine) or 'l2'.
        pca_dims: project onto this many principal components before the search (0 = keep all).
            Distances between projected rows approximate the full ones; it makes the search ~D/pca_dims faster.
            The components are fitted on at most PCA_FIT_ROWS rows drawn with `seed`.
    Returns:
        points (N, D') float32 C-contiguous, usable (N,) bool: False for zero-norm rows under
        'cosine' (direction undefined); such cells get no edges and the caller leaves their labels as they are.
    """
    if metric not in METRICS:
        raise UserInputError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise UserInputError(f"embeddings must be a non-empty 2-D array, got shape {embeddings.shape}")
    check_finite_rows(embeddings, block_rows)
    n_rows, n_dims = embeddings.shape
    points = np.empty((n_rows, n_dims), dtype=np.float32)
    usable = np.ones(n_rows, dtype=bool)
    for start in range(0, n_rows, block_rows):
        block = np.asarray(embeddings[start:start + block_rows], dtype=np.float32)
        if metric == "cosine":
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            usable[start:start + len(block)] = norms > 0
            block = block / np.where(norms > 0, norms, 1.0)[:, None]
        points[start:start + len(block)] = block
    if 0 < pca_dims < n_dims:
        fit_rows = np.flatnonzero(usable)
        if len(fit_rows) > PCA_FIT_ROWS:
            fit_rows = np.sort(np.random.default_rng(seed).choice(fit_rows, PCA_FIT_ROWS, replace=False))
        points = pca_project(points, pca_dims, fit_rows, block_rows)
    return points, usable


def pca_project(points: np.ndarray, n_components: int, fit_rows: np.ndarray | None = None,
                block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """Project all rows onto the top principal components of points[fit_rows] (default: all rows),
    found from their covariance with eigh (deterministic)."""
    n_rows, n_dims = points.shape
    fit_rows = np.arange(n_rows) if fit_rows is None else fit_rows
    mean = points[fit_rows].mean(axis=0, dtype=np.float64)
    gram = np.zeros((n_dims, n_dims), dtype=np.float64)
    for start in range(0, len(fit_rows), block_rows):
        block = points[fit_rows[start:start + block_rows]]
        gram += (block.T @ block).astype(np.float64)
    covariance = gram / len(fit_rows) - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    components = np.ascontiguousarray(eigenvectors[:, ::-1][:, :n_components], dtype=np.float32)
    kept = eigenvalues[::-1][:n_components].sum() / max(eigenvalues.sum(), 1e-30)
    log.info("PCA %d -> %d dims keeps %.1f%% of the variance", n_dims, n_components, 100 * kept)
    projected = np.empty((n_rows, n_components), dtype=np.float32)
    mean32 = mean.astype(np.float32)
    for start in range(0, n_rows, block_rows):
        projected[start:start + block_rows] = (points[start:start + block_rows] - mean32) @ components
    return projected


def _build_index(points: np.ndarray, method: str, seed: int, ivf_lists: int, ivf_probe: int) -> faiss.Index:
    n_rows, n_dims = points.shape
    if method == "exact":
        index = faiss.IndexFlatL2(n_dims)
    elif method == "ivf":
        n_lists = ivf_lists or int(np.clip(4 * np.sqrt(n_rows), 1, n_rows // 39 or 1))
        quantizer = faiss.IndexFlatL2(n_dims)
        index = faiss.IndexIVFFlat(quantizer, n_dims, n_lists, faiss.METRIC_L2)
        index.cp.seed = seed
        training = points[np.random.default_rng(seed).permutation(n_rows)[:min(n_rows, 256 * n_lists)]]
        index.train(np.ascontiguousarray(training))
        index.nprobe = min(ivf_probe, n_lists)
    else:
        raise UserInputError(f"unknown kNN method {method!r}; choose one of {KNN_METHODS}")
    index.add(points)
    return index


def knn_indices(points: np.ndarray, k: int, method: str = "exact", block_rows: int = DEFAULT_BLOCK_ROWS,
                seed: int = 0, ivf_lists: int = 0, ivf_probe: int = 32) -> np.ndarray:
    """(N, k) int32 indices of each row's k nearest other rows (L2), -1 where fewer were found.

    Searches k+1 neighbours and drops the row itself; when exact duplicates push the row out of its
    own k+1 list, the farthest of the k+1 is dropped instead.
    """
    n_rows = len(points)
    if n_rows <= k:
        raise UserInputError(f"{n_rows} cells but k = {k} neighbours wanted; a kNN graph needs more than k "
                             "cells (use a smaller --n-neighbors or a larger fold)")
    points = np.ascontiguousarray(points, dtype=np.float32)
    index = _build_index(points, method, seed, ivf_lists, ivf_probe)
    neighbours = np.empty((n_rows, k), dtype=np.int32)
    started = time.perf_counter()
    with _faiss_database_block(FAISS_DATABASE_BLOCK):
        _search_blocks(index, points, k, neighbours, block_rows, started)
    return neighbours


@contextlib.contextmanager
def _faiss_database_block(rows: int):
    """Temporarily raise faiss's exact-search database block: with k ~ 200, fewer, larger distance
    blocks cut the search time by about a third (measured 2.1 -> 1.45 CPU s for 10k x 30k, 128-d)."""
    previous = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(previous, rows)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous


def _search_blocks(index: faiss.Index, points: np.ndarray, k: int, neighbours: np.ndarray, block_rows: int,
                   started: float) -> None:
    """Fill `neighbours` with each row's k nearest others, block_rows queries at a time, logging progress."""
    n_rows = len(points)
    last_report = started
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        _, found = index.search(points[start:stop], k + 1)
        is_self = found == np.arange(start, stop)[:, None]
        without_self = ~is_self.any(axis=1)
        is_self[without_self, -1] = True
        neighbours[start:stop] = found[~is_self].reshape(stop - start, k)
        if time.perf_counter() - last_report > 10 or stop == n_rows:
            last_report = time.perf_counter()
            log.info("kNN search: %d/%d cells after %.1f s", stop, n_rows, last_report - started)


def adjacency_from_neighbours(neighbours: np.ndarray) -> sp.csr_matrix:
    """Symmetric 0/1 float32 CSR adjacency max(W, W^T) from (N, k) neighbour indices.

    Entries -1 (not found), self links and repeats within a row are ignored. The directed CSR is
    assembled straight from the sorted rows (10x faster than going through COO at 100k x 200).
    """
    n_rows, k = neighbours.shape
    cleaned = np.where(neighbours == np.arange(n_rows, dtype=neighbours.dtype)[:, None], -1, neighbours)
    cleaned = np.sort(cleaned, axis=1)
    cleaned[:, 1:][cleaned[:, 1:] == cleaned[:, :-1]] = -1  # repeats are adjacent once sorted
    cleaned = np.sort(cleaned, axis=1)
    kept = cleaned >= 0
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    indices = cleaned[kept].astype(np.int32)
    directed = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(n_rows, n_rows))
    directed.has_sorted_indices = True
    symmetric = directed.maximum(directed.T.tocsr()).tocsr()
    symmetric.sort_indices()
    return symmetric.astype(np.float32)


def knn_graph(embeddings: np.ndarray, k: int = 200, metric: str = "cosine", pca_dims: int = 0,
              method: str = "exact", seed: int = 0, block_rows: int = DEFAULT_BLOCK_ROWS) -> sp.csr_matrix:
    """Symmetrised 0/1 kNN adjacency (N x N CSR, float32) of the embeddings.

    Args:
        embeddings: (N, D) embeddings; NaN/inf raise UserInputError.
        k: neighbours per cell (N must exceed k).
        metric: 'cosine' (default) or 'l2'. Under 'cosine' zero-norm rows get no edges (degree 0).
        pca_dims: principal components kept before the search (0 = off).
        method: 'exact' (faiss flat index) or 'ivf' (faiss inverted lists: approximate, faster).
        seed: draws the PCA fitting sample and the 'ivf' training sample.
    """
    started = time.perf_counter()
    points, usable = prepare_points(embeddings, metric, pca_dims, block_rows, seed)
    if not usable.all():
        log.warning("%d cells have all-zero embeddings: no direction for the cosine metric, so they get no "
                    "edges and keep their initial labels", int((~usable).sum()))
    usable_rows = np.flatnonzero(usable)
    neighbours_local = knn_indices(points if usable.all() else points[usable_rows], k, method, block_rows, seed)
    neighbours = np.full((len(points), k), -1, dtype=np.int32)
    neighbours[usable_rows] = np.where(neighbours_local >= 0, usable_rows[neighbours_local], -1)
    adjacency = adjacency_from_neighbours(neighbours)
    short = int((np.diff(adjacency.indptr)[usable_rows] < k).sum())
    if short:
        log.warning("%d cells have fewer than k = %d neighbours (approximate search)", short, k)
    log.info("kNN graph: %d cells, k = %d, %d edges, %.1f s", len(points), k, adjacency.nnz // 2,
             time.perf_counter() - started)
    return adjacency


def normalized_adjacency(adjacency: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """S = D^-1/2 W D^-1/2 (float32 CSR) and the degrees; isolated nodes get zero rows (no 1/0)."""
    adjacency = sp.csr_matrix(adjacency, dtype=np.float32)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degrees, dtype=np.float32)
    inv_sqrt[degrees > 0] = 1.0 / np.sqrt(degrees[degrees > 0])
    rows = np.repeat(np.arange(adjacency.shape[0]), np.diff(adjacency.indptr))
    scaled = adjacency.copy()
    scaled.data = (adjacency.data * inv_sqrt[rows] * inv_sqrt[adjacency.indices]).astype(np.float32)
    return scaled, degrees


def smallest_laplacian_eigenpairs(adjacency: sp.csr_matrix, m: int = 50, tol: float = 1e-4,
                                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The m smallest eigenpairs of L = I - D^-1/2 W D^-1/2.

    Found as the m largest (algebraic) eigenpairs of S = D^-1/2 W D^-1/2 by Lanczos (ARPACK),
    which needs only products with S, no factorisation (graphs of at most max(4m, 500) nodes: dense
    eigh). An isolated node is its own eigenvector with e = 1 (a zero row of S).

    Returns:
        eigenvalues (m,) float32 ascending in [0, 2] (tiny negatives from rounding clipped to 0),
        V (N, m) float32 with orthonormal columns.
    """
    n_nodes = adjacency.shape[0]
    if not 0 < m < n_nodes:
        raise UserInputError(f"{m} eigenvectors wanted from a graph of {n_nodes} cells; need 0 < m < N")
    started = time.perf_counter()
    normalized, _ = normalized_adjacency(adjacency)
    start_vector = np.random.default_rng(seed).uniform(0.5, 1.5, n_nodes).astype(np.float32)
    # Lanczos makes many small BLAS calls; with several BLAS threads on a busy machine they spin and
    # wait far more than they compute (7x slower measured on 2 shared cores), so use one.
    with threadpool_limits(limits=1, user_api="blas"):
        eigenvalues, vectors = _largest_eigenpairs(normalized, m, tol, start_vector)
    log.info("%d eigenpairs of the normalised Laplacian (%d cells) in %.1f s; e in [%.4f, %.4f]", m, n_nodes,
             time.perf_counter() - started, eigenvalues[0], eigenvalues[-1])
    return eigenvalues, vectors


def _largest_eigenpairs(normalized: sp.csr_matrix, m: int, tol: float,
                        start_vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Laplacian eigenvalues 1 - mu (ascending) and vectors of the m largest eigenpairs mu of S."""
    n_nodes = normalized.shape[0]
    if n_nodes <= max(4 * m, 500):
        mu, vectors = np.linalg.eigh(normalized.toarray().astype(np.float64))
        mu, vectors = mu[::-1][:m], vectors[:, ::-1][:, :m]
    else:
        try:
            mu, vectors = eigsh(normalized, k=m, which="LA", tol=tol, v0=start_vector,
                                ncv=min(n_nodes - 1, 2 * m + 1))
        except ArpackNoConvergence:
            log.warning("Lanczos did not converge in float32; retrying in float64 with a larger subspace")
            try:
                mu, vectors = eigsh(normalized.astype(np.float64), k=m, which="LA", tol=tol,
                                    v0=start_vector.astype(np.float64), ncv=min(n_nodes - 1, 4 * m + 1),
                                    maxiter=100 * n_nodes)
            except ArpackNoConvergence as error:
                raise RuntimeError(f"eigensolver did not converge for {m} eigenpairs of {n_nodes} cells "
                                   f"({len(error.eigenvalues)} converged); try a looser --eigen-tol") from None
    order = np.argsort(-mu)
    eigenvalues = np.clip(1.0 - mu[order], 0.0, 2.0).astype(np.float32)
    return eigenvalues, np.ascontiguousarray(vectors[:, order], dtype=np.float32)


def cells_fingerprint(image_ids: np.ndarray, cell_indices: np.ndarray, settings: str = "") -> str:
    """Short hash of the ordered (image_id, cell_i) list and the graph settings, so a saved graph or
    eigenbasis is never reused for other cells or other settings."""
    digest = hashlib.sha1()
    digest.update(np.asarray(image_ids).astype("S64").tobytes())
    digest.update(np.asarray(cell_indices, dtype=np.int64).tobytes())
    digest.update(settings.encode())
    return digest.hexdigest()[:16]


def save_graph(path: str | os.PathLike, adjacency: sp.csr_matrix, fingerprint: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, indptr=adjacency.indptr, indices=adjacency.indices, shape=np.array(adjacency.shape),
                 fingerprint=np.array(fingerprint))


def load_graph(path: str | os.PathLike, fingerprint: str) -> sp.csr_matrix:
    """Load a graph saved by save_graph; UserInputError if it was built for other cells or settings."""
    with np.load(Path(path)) as saved:
        if str(saved["fingerprint"]) != fingerprint:
            raise UserInputError(f"{path} was built for other cells or other graph settings; delete it or "
                                 "point --precomputed-graph elsewhere")
        indices = saved["indices"]
        return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, saved["indptr"]),
                             shape=tuple(saved["shape"]))


def save_eigenbasis(path: str | os.PathLike, eigenvalues: np.ndarray, vectors: np.ndarray, fingerprint: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, eigenvalues=eigenvalues, vectors=vectors, fingerprint=np.array(fingerprint))


def load_eigenbasis(path: str | os.PathLike, fingerprint: str, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Load (eigenvalues, V) saved by save_eigenbasis, keeping the first m; UserInputError on a mismatch."""
    with np.load(Path(path)) as saved:
        if str(saved["fingerprint"]) != fingerprint:
            raise UserInputError(f"{path} was computed for other cells or other graph settings; delete it or "
                                 "point --precomputed-eigenbasis elsewhere")
        if saved["eigenvalues"].shape[0] < m:
            raise UserInputError(f"{path} holds {saved['eigenvalues'].shape[0]} eigenpairs, fewer than m = {m}")
        return (saved["eigenvalues"][:m].astype(np.float32),
                np.ascontiguousarray(saved["vectors"][:, :m], dtype=np.float32))
