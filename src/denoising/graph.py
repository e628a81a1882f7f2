"""kNN graph of cell embeddings (its Laplacian eigenpairs: src.denoising.spectrum).

The graph follows the reference's conventions: k counts the cell itself as its own first neighbour
(as sklearn's kneighbors_graph(include_self=True) on the training set does), so k = 200 links each
cell to its 199 nearest other cells; Euclidean distance on the raw embeddings; 0/1 weights,
symmetrised by W = max(W, W^T), no self loops, so every cell has degree >= k - 1.

Everything is float32 and processed in row blocks so memory stays near the size of the inputs.
"""
from __future__ import annotations

import contextlib
import logging
import time

import faiss
import numpy as np
import scipy.sparse as sp

from src.denoising import search_space
from src.utils.io import UserInputError

log = logging.getLogger(__name__)

METRICS = ("l2", "cosine")
KNN_METHODS = ("auto", "exact", "ivf")
# 'auto' searches exactly up to this many cells and with inverted lists above (exact cost grows as N^2:
# 100k x 1024-d took 108 s exactly on 2 cores, 1M would take ~3 h)
EXACT_MAX_CELLS = 60_000
RECALL_SAMPLE = 1000  # rows whose approximate neighbours are checked against an exact search
PROBE_TARGET_RECALL = 0.97  # sampled recall the inverted-list search is tuned to (0.95 wanted, with margin)
PROBE_SAMPLE = 300
DEFAULT_BLOCK_ROWS = 8192
FAISS_DATABASE_BLOCK = 16384  # rows; the distance buffer is 4096 x this float32 (256 MB)
PCA_FIT_ROWS = 32768  # principal components of 1024-d rows are stable well before this many rows


def _raise_non_finite(bad_rows: list[int], n_rows: int) -> None:
    """UserInputError naming the first rows whose embedding holds NaN or inf (none: nothing)."""
    if bad_rows:
        raise UserInputError(f"{len(bad_rows)} of {n_rows} embeddings hold NaN or inf "
                             f"(rows {bad_rows[:10]}{' ...' if len(bad_rows) > 10 else ''}); "
                             "fix the pseudo-labelling output before denoising")


def _float_block(embeddings, start: int, stop: int, metric: str,
                 bad_rows: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows start:stop as float32 (L2-normalised under 'cosine') and their usable mask; the indices
    of rows holding NaN or inf (as float32) are appended to `bad_rows` when given."""
    block = np.asarray(embeddings[start:stop], dtype=np.float32)
    if bad_rows is not None:
        bad_rows.extend((start + np.flatnonzero(~np.isfinite(block).all(axis=1))).tolist())
    usable = np.ones(len(block), dtype=bool)
    if metric == "cosine":
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        usable = norms > 0
        block = block / np.where(usable, norms, 1.0)[:, None]
    return block, usable


def prepare_points(embeddings, metric: str = "l2", pca_dims: int = 0, block_rows: int = DEFAULT_BLOCK_ROWS,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 search points from raw embeddings, and a mask of rows that can take part in the graph.

    Args:
        embeddings: (N, D) array of any float type, or anything with .shape and row slicing (the
            rows are read block_rows at a time, so an HDF5-backed reader streams).
        metric: 'l2' (the reference's) or 'cosine' (rows L2-normalised, then L2 search: the same
            neighbours as cosine distance).
        pca_dims: project onto this many principal components before the search (0 = keep all),
            fitted on at most PCA_FIT_ROWS rows drawn with `seed`; each block is projected as it
            is read, so the full-width float32 copy is never held.
    Returns:
        points (N, D') float32 C-contiguous, usable (N,) bool: False for zero-norm rows under
        'cosine' (direction undefined); such cells get no edges and the caller leaves their labels as they are.
    """
    if metric not in METRICS:
        raise UserInputError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if len(embeddings.shape) != 2 or embeddings.shape[0] == 0:
        raise UserInputError(f"embeddings must be a non-empty 2-D array, got shape {embeddings.shape}")
    n_rows, n_dims = embeddings.shape
    usable = np.ones(n_rows, dtype=bool)
    bad_rows: list[int] = []  # NaN/inf rows, found during the first pass over the rows (no pass of its own)
    if not 0 < pca_dims < n_dims:
        points = np.empty((n_rows, n_dims), dtype=np.float32)
        for start in range(0, n_rows, block_rows):
            stop = min(start + block_rows, n_rows)
            points[start:stop], usable[start:stop] = _float_block(embeddings, start, stop, metric, bad_rows)
        _raise_non_finite(bad_rows, n_rows)
        return points, usable
    fit_rows = np.sort(np.random.default_rng(seed).permutation(n_rows)[:PCA_FIT_ROWS])
    fit_blocks = []
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        block, usable[start:stop] = _float_block(embeddings, start, stop, metric, bad_rows)
        chosen = fit_rows[(fit_rows >= start) & (fit_rows < stop)] - start
        fit_blocks.append(block[chosen[usable[start + chosen]]])
    _raise_non_finite(bad_rows, n_rows)
    mean, components = pca_components(np.concatenate(fit_blocks), pca_dims)
    points = np.empty((n_rows, pca_dims), dtype=np.float32)
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        points[start:stop] = (_float_block(embeddings, start, stop, metric)[0] - mean) @ components
    return points, usable


def pca_components(sample: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and top principal directions (D, n_components) float32 of the sample rows, from the
    covariance with eigh (deterministic)."""
    mean = sample.mean(axis=0, dtype=np.float64)
    covariance = (sample.T @ sample).astype(np.float64) / len(sample) - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    components = np.ascontiguousarray(eigenvectors[:, ::-1][:, :n_components], dtype=np.float32)
    kept = eigenvalues[::-1][:n_components].sum() / max(eigenvalues.sum(), 1e-30)
    log.info("PCA %d -> %d dims keeps %.1f%% of the variance (fitted on %d rows)", sample.shape[1], n_components,
             100 * kept, len(sample))
    return mean.astype(np.float32), components


def _build_index(points: np.ndarray, method: str, seed: int, ivf_lists: int) -> faiss.Index:
    n_rows, n_dims = points.shape
    if method == "exact":
        index = faiss.IndexFlatL2(n_dims)
    elif method == "ivf":
        n_lists = ivf_lists or int(np.clip(4 * np.sqrt(n_rows), 1, n_rows // 39 or 1))
        quantizer = faiss.IndexFlatL2(n_dims)
        index = faiss.IndexIVFFlat(quantizer, n_dims, n_lists, faiss.METRIC_L2)
        index.cp.seed = seed
        training = points[np.random.default_rng(seed).permutation(n_rows)[:min(n_rows, 64 * n_lists)]]
        index.train(np.ascontiguousarray(training))
    else:
        raise UserInputError(f"unknown kNN method {method!r}; choose one of {KNN_METHODS}")
    index.add(points)
    return index


def choose_probe(index: faiss.Index, points: np.ndarray, k: int, seed: int, target: float = PROBE_TARGET_RECALL,
                 sample: int = PROBE_SAMPLE) -> int:
    """Smallest nprobe (doubling from 8) whose recall on `sample` rows reaches `target`, found by
    comparing with an exact search of those rows; the data decides, not a constant."""
    rows = np.sort(np.random.default_rng(seed + 1).permutation(len(points))[:sample])
    queries = np.ascontiguousarray(points[rows])
    _, exact = faiss.knn(queries, points, k + 1)
    n_probe, recall = 8, 0.0
    while True:
        index.nprobe = min(n_probe, index.nlist)
        recall = search_space.recall_of(index.search(queries, k + 1)[1], exact, rows, k)
        if recall >= target or index.nprobe == index.nlist or n_probe >= index.nlist // 4:
            break
        n_probe *= 2
    log.info("inverted lists: %d lists, nprobe %d gives recall %.3f on %d sampled cells%s", index.nlist, index.nprobe,
             recall, len(rows), "" if recall >= target else f" (below the target {target})")
    return index.nprobe


def knn_indices(points: np.ndarray, k: int, method: str = "exact", block_rows: int = DEFAULT_BLOCK_ROWS,
                seed: int = 0, ivf_lists: int = 0, ivf_probe: int = 0) -> np.ndarray:
    """(N, k) int32 indices of each row's k nearest other rows (L2), -1 where fewer were found.

    Searches k+1 neighbours and drops the row itself; when exact duplicates push the row out of its
    own k+1 list, the farthest of the k+1 is dropped instead. For 'ivf', ivf_probe = 0 chooses the
    number of probed lists from the data (choose_probe).
    """
    n_rows = len(points)
    if n_rows <= k:
        raise UserInputError(f"{n_rows} cells but {k} other neighbours wanted per cell; a kNN graph needs more "
                             "cells (use a smaller --n-neighbors or a larger fold)")
    points = np.ascontiguousarray(points, dtype=np.float32)
    index = _build_index(points, method, seed, ivf_lists)
    if method == "ivf":
        index.nprobe = min(ivf_probe, index.nlist) if ivf_probe else choose_probe(index, points, k, seed)
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


def adjacency_from_neighbours(neighbours: np.ndarray, block_rows: int = 65536) -> sp.csr_matrix:
    """Symmetric 0/1 float32 CSR adjacency max(W, W^T) from (N, k) neighbour indices.

    Entries -1 (not found), self links and repeats within a row are ignored. Built in row blocks with
    an int8 pattern, so that at 1M cells x 199 neighbours the temporaries stay near the size of the
    result (the whole-matrix float32 route peaked at ~11 GB there).
    """
    n_rows, k = neighbours.shape
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    pieces = []
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        cleaned = np.sort(np.where(neighbours[start:stop] == np.arange(start, stop)[:, None], -1,
                                   neighbours[start:stop]), axis=1)
        cleaned[:, 1:][cleaned[:, 1:] == cleaned[:, :-1]] = -1  # repeats are adjacent once sorted
        cleaned.sort(axis=1)
        kept = cleaned >= 0
        counts[start + 1:stop + 1] = kept.sum(axis=1)
        pieces.append(cleaned[kept].astype(np.int32))
    directed = sp.csr_matrix((np.ones(int(counts.sum()), dtype=np.int8), np.concatenate(pieces), np.cumsum(counts)),
                             shape=(n_rows, n_rows))
    del pieces
    directed.has_sorted_indices = True
    transposed = directed.T.tocsr()  # sorted indices, int8 data
    counts[:] = 0
    pieces = []
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        union = directed[start:stop].maximum(transposed[start:stop]).tocsr()
        union.sort_indices()
        counts[start + 1:stop + 1] = np.diff(union.indptr)
        pieces.append(union.indices.astype(np.int32, copy=False))
    del directed, transposed
    indices = np.concatenate(pieces)
    del pieces
    symmetric = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, np.cumsum(counts)),
                              shape=(n_rows, n_rows))
    symmetric.has_sorted_indices = True
    return symmetric


PCA_FROM_DATA = -1  # pca_dims value: the approximate search picks the width from the data (search_space)
# exact search in all dims stands in for the approximate one when no PCA width keeps the neighbours and
# N^2 * D multiply-adds stay below this (1e13, 100k x 1024-d, took 108 s on 2 quiet cores)
EXACT_FALLBACK_MAX_WORK = 2.5e13


def choose_search(n_cells: int, n_dims: int, method: str = "auto", pca_dims: int | None = None) -> tuple[str, int]:
    """(kNN method, PCA dims) for 'auto': exact search in full dims up to EXACT_MAX_CELLS, else
    inverted lists on a PCA width chosen from the data (PCA_FROM_DATA). An explicit method or
    pca_dims (0 = off) is kept."""
    if method not in KNN_METHODS:
        raise UserInputError(f"unknown kNN method {method!r}; choose one of {KNN_METHODS}")
    if method == "auto":
        method = "exact" if n_cells <= EXACT_MAX_CELLS else "ivf"
    if pca_dims is None:
        narrower = [width for width in search_space.CANDIDATE_PCA_DIMS if width < n_dims]
        pca_dims = PCA_FROM_DATA if method == "ivf" and narrower else 0
    return method, pca_dims


def sampled_recall(points: np.ndarray, neighbours: np.ndarray, seed: int = 0, sample: int = RECALL_SAMPLE) -> float:
    """Mean share of the exact k nearest others (in the same search space) that `neighbours` found,
    over `sample` rows drawn with `seed` (other rows than choose_probe's)."""
    k = neighbours.shape[1]
    rows = np.sort(np.random.default_rng(seed + 2).permutation(len(points))[:sample])
    _, exact = faiss.knn(np.ascontiguousarray(points[rows]), points, k + 1)
    return search_space.recall_of(neighbours[rows], exact, rows, k)


def _search_space(embeddings, metric: str, method: str, pca_dims: int, k: int, seed: int,
                  block_rows: int) -> tuple[str, int, np.ndarray, np.ndarray, tuple | None]:
    """(method, PCA dims, kept points, kept rows, (sample, its exact full-width neighbours) or None).

    A narrowed search (PCA) is checked against exact full-width neighbours on a sample; with
    PCA_FROM_DATA the narrowest candidate width that keeps TARGET_AGREEMENT of them is used, or, when
    none does, the exact search in all dims if it is affordable, else the widest candidate (warned).
    """
    n_rows, n_dims = embeddings.shape
    widths = tuple(w for w in search_space.CANDIDATE_PCA_DIMS if w < n_dims) if pca_dims == PCA_FROM_DATA \
        else ((pca_dims,) if pca_dims else ())
    points, usable = prepare_points(embeddings, metric, max(widths, default=0), block_rows, seed)
    if not usable.all():
        log.warning("%d cells have all-zero embeddings: no direction for the cosine metric, so they get no "
                    "edges and keep their initial labels", int((~usable).sum()))
    kept_rows = np.flatnonzero(usable)
    kept = points if usable.all() else points[kept_rows]
    del points
    if not widths:
        return method, 0, kept, kept_rows, None
    sample = np.sort(np.random.default_rng(seed + 3).permutation(len(kept_rows))[:search_space.SAMPLE_CELLS])
    exact = search_space.exact_sample_neighbours(embeddings, kept_rows, sample, k,
                                                 lambda rows, a, b: _float_block(rows, a, b, metric)[0], block_rows)
    agreement = search_space.agreement_by_width(kept, sample, exact, k, widths)
    log.info("share of the exact %d-d neighbours kept by an exact search after PCA, on %d sampled cells: %s",
             n_dims, len(sample), ", ".join(f"{w} dims {share:.3f}" for w, share in agreement.items()))
    if pca_dims == PCA_FROM_DATA:
        pca_dims = search_space.narrowest_width(agreement)
        if pca_dims is None and float(n_rows) ** 2 * n_dims <= EXACT_FALLBACK_MAX_WORK:
            log.warning("no PCA width keeps %.0f%% of the neighbours (the embeddings' neighbourhoods are not in "
                        "their principal components): exact search in all %d dims instead",
                        100 * search_space.TARGET_AGREEMENT, n_dims)
            del kept
            points, _ = prepare_points(embeddings, metric, 0, block_rows, seed)
            return "exact", 0, (points if usable.all() else points[kept_rows]), kept_rows, None
        if pca_dims is None:
            pca_dims = max(widths)
            log.warning("no PCA width keeps %.0f%% of the exact neighbours and an exact search of %d cells in %d "
                        "dims is too slow: searching %d dims (this changes the graph; see the README)",
                        100 * search_space.TARGET_AGREEMENT, n_rows, n_dims, pca_dims)
    return method, pca_dims, np.ascontiguousarray(kept[:, :pca_dims]), kept_rows, (sample, exact)


def knn_graph(embeddings, k: int = 200, metric: str = "l2", pca_dims: int | None = None, method: str = "auto",
              seed: int = 0, block_rows: int = DEFAULT_BLOCK_ROWS, info: dict | None = None) -> sp.csr_matrix:
    """Symmetrised 0/1 kNN adjacency (N x N CSR, float32) of the embeddings, the reference's way.

    Args:
        embeddings: (N, D) embeddings (or a row-sliceable reader, see prepare_points); NaN/inf raise UserInputError.
        k: neighbours per cell counting the cell itself, as the reference counts them: each cell is
            linked to its k - 1 nearest others (N must be at least k).
        metric: 'l2' (default, the reference's) or 'cosine'. Under 'cosine' zero-norm rows get no edges.
        pca_dims: principal components kept before the search (0 = off; None = chosen with the method:
            off for 'exact', from the data for 'ivf', see _search_space).
        method: 'auto' (exact up to EXACT_MAX_CELLS, else 'ivf'), 'exact' (faiss flat index) or 'ivf'
            (faiss inverted lists: approximate, its recall on a sample is logged).
        seed: draws the PCA fitting sample, the 'ivf' training sample and the recall samples.
        info: if given, filled with the method, PCA dims, the sampled recall against exact search in
            the searched space ('recall') and against exact search in all dims ('full_recall').
    """
    n_rows, n_dims = embeddings.shape
    if k < 2:
        raise UserInputError(f"k = {k}: k counts the cell itself (as in the reference), so it must be >= 2")
    if n_rows < k:
        raise UserInputError(f"{n_rows} cells but k = {k} neighbours wanted; a kNN graph needs at least k "
                             "cells (use a smaller --n-neighbors or a larger fold)")
    method, pca_dims = choose_search(n_rows, n_dims, method, pca_dims)
    log.info("kNN search: %s%s for %d cells (auto: exact up to %d cells)", method,
             " after PCA (width chosen from the data)" if pca_dims == PCA_FROM_DATA else
             f" after PCA to {pca_dims} dims" if pca_dims else f" in all {n_dims} dims", n_rows, EXACT_MAX_CELLS)
    started = time.perf_counter()
    others = k - 1
    method, pca_dims, kept_points, kept_rows, checked = _search_space(embeddings, metric, method, pca_dims, others,
                                                                      seed, block_rows)
    neighbours_local = knn_indices(kept_points, others, method, block_rows, seed)
    recall = sampled_recall(kept_points, neighbours_local, seed) if method == "ivf" else 1.0
    full_recall = recall if checked is None else search_space.recall_of(neighbours_local[checked[0]], checked[1],
                                                                       checked[0], others)
    log.info("kNN recall: %.4f against exact search in the searched space (%d sampled cells), %.4f against exact "
             "search in all %d dims (%d other sampled cells)", recall, min(RECALL_SAMPLE, len(kept_rows)), full_recall,
             n_dims, 0 if checked is None else len(checked[0]))
    del kept_points
    if len(kept_rows) == n_rows:  # every row searched: the local indices are the rows (no 1.6 GB remap at 1M)
        neighbours = neighbours_local
    else:
        neighbours = np.full((n_rows, others), -1, dtype=np.int32)
        neighbours[kept_rows] = np.where(neighbours_local >= 0, kept_rows[neighbours_local], -1)
    del neighbours_local
    adjacency = adjacency_from_neighbours(neighbours)
    short = int((np.diff(adjacency.indptr)[kept_rows] < others).sum())
    if short:
        log.warning("%d cells have fewer than k - 1 = %d neighbours (approximate search)", short, others)
    log.info("kNN graph: %d cells, k = %d (self included), %d edges, %.1f s", n_rows, k, adjacency.nnz // 2,
             time.perf_counter() - started)
    if info is not None:
        info.update(method=method, pca_dims=pca_dims, recall=recall, full_recall=full_recall)
    return adjacency
