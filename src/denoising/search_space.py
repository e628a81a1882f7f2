"""How far the approximate kNN search may shrink the embeddings, decided by the data.

PCA before the search is only harmless when the principal components carry the neighbourhoods.
Network features usually lie near a low-dimensional manifold and do (generated 'relu' embeddings:
PCA-128 keeps 99% of the exact 1024-d neighbours); embeddings dominated by isotropic noise do not
(generated 'gaussian' ones: 34% at PCA-128, and the denoising objective moved by 14%). So the
approximate path measures, on a sample of cells, which share of their exact full-dimensional
neighbours each candidate PCA width keeps, and uses the narrowest one that keeps enough.
"""
from __future__ import annotations

import logging

import faiss
import numpy as np

log = logging.getLogger(__name__)

CANDIDATE_PCA_DIMS = (128, 256, 512)
TARGET_AGREEMENT = 0.95  # share of the exact full-width neighbours the chosen width must keep
SAMPLE_CELLS = 500  # cells whose exact full-width neighbours are found (500 x 199 pairs: +-0.3% on a share)


def recall_of(found: np.ndarray, exact: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Mean share of each row's k exact nearest others (the row itself removed from `exact`) in `found`."""
    hits = [len(np.intersect1d(truth[truth != row][:k], got[got != row])) for row, truth, got in zip(rows, exact, found)]
    return float(np.sum(hits) / (len(rows) * k))


def exact_sample_neighbours(embeddings, kept_rows: np.ndarray, sample: np.ndarray, k: int, read_block,
                            block_rows: int) -> np.ndarray:
    """(len(sample), k + 1) indices, nearest first, of the exact L2 neighbours in the full embedding
    width of the kept cells `sample` (positions in kept_rows), among all kept cells; one streamed
    pass over the rows.

    Args:
        embeddings: (N, D) row-sliceable reader.
        kept_rows: sorted rows of `embeddings` that take part in the graph; results index into it.
        read_block: (embeddings, start, stop) -> (float32 block as searched, e.g. normalised for cosine).
    """
    queries = np.concatenate([read_block(embeddings, row, row + 1) for row in kept_rows[sample]])
    query_norms = np.einsum("ij,ij->i", queries, queries)
    best_distances = np.full((len(sample), k + 1), np.inf, dtype=np.float32)
    best_indices = np.full((len(sample), k + 1), -1, dtype=np.int64)
    n_rows = embeddings.shape[0]
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        first, last = np.searchsorted(kept_rows, [start, stop])
        if first == last:
            continue
        block = read_block(embeddings, start, stop)[kept_rows[first:last] - start]
        distances = query_norms[:, None] - 2 * queries @ block.T + np.einsum("ij,ij->i", block, block)[None, :]
        distances = np.concatenate([best_distances, distances], axis=1)
        indices = np.concatenate([best_indices, np.broadcast_to(np.arange(first, last), (len(sample), last - first))],
                                 axis=1)
        keep = np.argpartition(distances, k, axis=1)[:, :k + 1]
        best_distances = np.take_along_axis(distances, keep, axis=1)
        best_indices = np.take_along_axis(indices, keep, axis=1)
    order = np.argsort(best_distances, axis=1, kind="stable")
    return np.take_along_axis(best_indices, order, axis=1)


def agreement_by_width(points: np.ndarray, sample: np.ndarray, exact: np.ndarray, k: int,
                       widths: tuple[int, ...], target: float = TARGET_AGREEMENT) -> dict[int, float]:
    """For each width w (<= points' columns, which are principal components, widest first), narrowest
    first, the share of the sample's exact full-width neighbours that an exact search on the first w
    components finds; stops after the first width that reaches `target`."""
    agreement = {}
    for width in sorted(widths):
        narrowed = np.ascontiguousarray(points[:, :width])
        _, found = faiss.knn(np.ascontiguousarray(narrowed[sample]), narrowed, k + 1)
        agreement[width] = recall_of(found, exact, sample, k)
        del narrowed
        if agreement[width] >= target:
            break
    return agreement


def narrowest_width(agreement: dict[int, float], target: float = TARGET_AGREEMENT) -> int | None:
    """The smallest width whose agreement reaches `target`, or None when none does."""
    good = [width for width, share in sorted(agreement.items()) if share >= target]
    return good[0] if good else None
