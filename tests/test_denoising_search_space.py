"""The approximate kNN path and memory-lean steps at scale: symmetrisation in blocks, connected components without a copy, the exact sample neighbours, and the PCA width chosen
from the data (kept when the principal components carry the neighbourhoods, refused when they do not)."""
from __future__ import annotations

import numpy as np
import pytest

import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from src.denoising import graph, search_space, spectrum
from src.denoising.synthetic import make_clustered_cells


def test_block_symmetrisation_equals_dense_max_of_w_and_its_transpose():
    rng = np.random.default_rng(0)
    n_rows, k = 230, 7
    neighbours = rng.integers(-1, n_rows, size=(n_rows, k)).astype(np.int32)
    neighbours[::5, 0] = np.arange(0, n_rows, 5)       # self links are dropped
    neighbours[::7, 1] = neighbours[::7, 2]            # repeats count once
    dense = np.zeros((n_rows, n_rows), dtype=np.float32)
    for row, found in enumerate(neighbours):
        for other in found:
            if other >= 0 and other != row:
                dense[row, other] = 1.0
    expected = np.maximum(dense, dense.T)
    for block_rows in (17, 64, 1000):
        adjacency = graph.adjacency_from_neighbours(neighbours, block_rows=block_rows)
        assert adjacency.dtype == np.float32 and adjacency.has_sorted_indices
        np.testing.assert_array_equal(adjacency.toarray(), expected)
        assert all(np.all(np.diff(adjacency.indices[a:b]) > 0) for a, b in zip(adjacency.indptr[:-1], adjacency.indptr[1:]))


def test_exact_sample_neighbours_match_a_full_search_over_kept_rows():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(300, 12)).astype(np.float16)
    kept_rows = np.sort(rng.permutation(300)[:250])
    sample = np.array([0, 5, 100, 249])
    found = search_space.exact_sample_neighbours(
        embeddings, kept_rows, sample, 9, lambda rows, a, b: np.asarray(rows[a:b], dtype=np.float32), block_rows=37)
    kept = embeddings[kept_rows].astype(np.float64)
    for query, row in zip(sample, found):
        distances = ((kept - kept[query]) ** 2).sum(axis=1)
        np.testing.assert_array_equal(row, np.argsort(distances, kind="stable")[:10])
    assert search_space.recall_of(found, found, sample, 9) == 1.0


def test_narrowest_width_by_hand():
    assert search_space.narrowest_width({128: 0.90, 256: 0.96, 512: 0.99}) == 256
    assert search_space.narrowest_width({128: 0.97, 256: 0.96}) == 128
    assert search_space.narrowest_width({128: 0.5, 256: 0.6}) is None


def cells_of(style, n_cells=2500, n_dims=96):
    return make_clustered_cells(n_cells, n_dims=n_dims, n_clusters=8, latent_dims=4, seed=3, dtype=np.float32,
                                embedding_style=style)


def test_pca_width_is_chosen_where_it_keeps_the_neighbours(monkeypatch):
    monkeypatch.setattr(search_space, "CANDIDATE_PCA_DIMS", (8, 16, 48))
    monkeypatch.setattr(graph, "EXACT_MAX_CELLS", 1000)
    cells = cells_of("relu")
    info = {}
    adjacency = graph.knn_graph(cells.embeddings, 20, info=info, seed=4)
    assert info["method"] == "ivf" and info["pca_dims"] in (8, 16, 48)
    assert info["full_recall"] >= 0.9
    exact = graph.knn_graph(cells.embeddings, 20, method="exact")
    assert exact.multiply(adjacency).nnz / exact.nnz >= 0.9


def test_noise_dominated_embeddings_fall_back_to_the_exact_search(monkeypatch):
    monkeypatch.setattr(search_space, "CANDIDATE_PCA_DIMS", (8, 16))
    monkeypatch.setattr(graph, "EXACT_MAX_CELLS", 1000)
    cells = cells_of("gaussian")
    info = {}
    adjacency = graph.knn_graph(cells.embeddings, 20, info=info)
    assert info == {"method": "exact", "pca_dims": 0, "recall": 1.0, "full_recall": 1.0}
    exact = graph.knn_graph(cells.embeddings, 20, method="exact")
    assert (adjacency != exact).nnz == 0
    # too large for the exact fallback: the widest width is searched, and its true recall is reported
    monkeypatch.setattr(graph, "EXACT_FALLBACK_MAX_WORK", 1.0)
    graph.knn_graph(cells.embeddings, 20, info=info)
    assert info["method"] == "ivf" and info["pca_dims"] == 16 and info["full_recall"] < 0.95
    assert info["recall"] > info["full_recall"]


@pytest.mark.parametrize("style", ["gaussian", "relu"])
def test_embedding_styles_keep_cluster_labels(style):
    cells = cells_of(style, n_cells=800)
    assert cells.embeddings.shape == (800, 96) and np.isfinite(cells.embeddings).all()
    same_cluster = cells.cluster[:, None] == cells.cluster[None, :]
    assert (cells.positive[:, None, :] == cells.positive[None, :, :]).all(axis=2)[same_cluster].all()
    with pytest.raises(ValueError, match="embedding_style"):
        make_clustered_cells(10, n_dims=4, n_clusters=2, embedding_style="other")


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_component_labels_equal_scipys_components(seed):
    rng = np.random.default_rng(seed)
    n_nodes = 600
    # sparse random edges (many components, isolated nodes) plus a long path (many hops to propagate)
    rows = np.concatenate([rng.integers(0, n_nodes, 350), np.arange(100, 299)])
    cols = np.concatenate([rng.integers(0, n_nodes, 350), np.arange(101, 300)])
    directed = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_nodes, n_nodes))
    adjacency = directed.maximum(directed.T).tocsr()
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    count, expected = connected_components(adjacency, directed=False)
    for block_rows in (7, 1000):
        labels = spectrum.component_labels(adjacency, block_rows=block_rows)
        assert same_partition(labels, expected) and len(np.unique(labels)) == count
        assert (labels <= np.arange(n_nodes)).all()


def test_normalisation_in_blocks_and_in_place_equals_the_dense_formula():
    rng = np.random.default_rng(5)
    dense = np.triu(rng.random((70, 70)) < 0.1, 1) * rng.uniform(0.5, 2.0, (70, 70))
    dense = (dense + dense.T).astype(np.float32)
    dense[3] = dense[:, 3] = 0  # an isolated node keeps a zero row
    degrees = dense.sum(axis=1)
    inv_sqrt = np.where(degrees > 0, 1 / np.sqrt(np.where(degrees > 0, degrees, 1)), 0)
    expected = inv_sqrt[:, None] * dense * inv_sqrt[None, :]
    adjacency = sp.csr_matrix(dense)
    kept = adjacency.data.copy()
    normalized, found_degrees = spectrum.normalized_adjacency(adjacency, block_rows=9)
    np.testing.assert_allclose(normalized.toarray(), expected, rtol=1e-6)
    np.testing.assert_allclose(found_degrees, degrees, rtol=1e-6)
    np.testing.assert_array_equal(adjacency.data, kept)  # untouched without overwrite
    overwritten, _ = spectrum.normalized_adjacency(adjacency, block_rows=9, overwrite=True)
    np.testing.assert_allclose(overwritten.toarray(), expected, rtol=1e-6)
    assert overwritten.data is adjacency.data or np.shares_memory(overwritten.data, adjacency.data)
