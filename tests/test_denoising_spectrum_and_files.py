"""Eigenpairs on graphs with several components, the reference's conventions and flag names, the
default selection end to end, and damaged HDF5 files through the real CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from src.data.classes import NUM_CLASSES
from src.data.schema import OutputLayout
from src.denoising import graph, graph_denoising, reference, select_candidates, solver, spectrum
from src.denoising.synthetic import make_clustered_cells, write_pseudo_label_store
from src.utils.io import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[1]


def separated_blobs(n_blobs: int, per_blob: int, n_dims: int = 8, seed: int = 0) -> np.ndarray:
    """Tight Gaussian blobs whose centres are far apart: a kNN graph with k < per_blob has one
    component per blob."""
    rng = np.random.default_rng(seed)
    centres = 100.0 * rng.standard_normal((n_blobs, n_dims))
    return (np.repeat(centres, per_blob, axis=0) + rng.standard_normal((n_blobs * per_blob, n_dims))).astype(np.float32)


def dense_laplacian(adjacency: sp.csr_matrix) -> np.ndarray:
    dense = adjacency.toarray().astype(np.float64)
    degrees = dense.sum(axis=1)
    inv_sqrt = np.where(degrees > 0, 1.0 / np.sqrt(np.maximum(degrees, 1e-300)), 0.0)
    return np.eye(len(dense)) - inv_sqrt[:, None] * dense * inv_sqrt[None, :]


@pytest.mark.parametrize("n_blobs, per_blob, m", [(5, 150, 12), (40, 30, 50)])
def test_separated_clusters_give_exactly_one_zero_eigenvalue_each(n_blobs, per_blob, m):
    adjacency = graph.knn_graph(separated_blobs(n_blobs, per_blob), 11)
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, m)
    assert int(np.sum(eigenvalues < 1e-6)) == n_blobs
    assert eigenvalues[n_blobs] > 1e-3
    laplacian = dense_laplacian(adjacency)
    assert np.abs(laplacian @ vectors - vectors * eigenvalues).max() < 1e-3
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(m), atol=1e-4)
    # the zero eigenvectors span exactly the sqrt(degree)-weighted component indicators
    degrees = np.diff(adjacency.indptr).astype(np.float64)
    indicators = np.zeros((len(degrees), n_blobs))
    indicators[np.arange(len(degrees)), np.arange(len(degrees)) // per_blob] = np.sqrt(degrees)
    indicators /= np.linalg.norm(indicators, axis=0)
    zero_space = vectors[:, :n_blobs].astype(np.float64)
    np.testing.assert_allclose(zero_space @ (zero_space.T @ indicators), indicators, atol=1e-5)


def test_more_components_than_eigenvectors_keep_only_the_largest_indicators():
    sizes = [40] * 3 + [25] * 27  # 30 components, m = 8: the three of 40 cells come first
    points = np.concatenate([separated_blobs(1, size, seed=i) + 50.0 * i for i, size in enumerate(sizes)])
    adjacency = graph.knn_graph(points, 6)
    _, degrees = spectrum.normalized_adjacency(adjacency)
    every, count = spectrum.component_null_vectors(adjacency, degrees)
    kept, same_count = spectrum.component_null_vectors(adjacency, degrees, limit=8)
    assert count == same_count == 30 and every.shape[1] == 30 and kept.shape[1] == 8
    np.testing.assert_array_equal(kept, every[:, :8])
    assert (np.count_nonzero(kept[:, :3], axis=0) == 40).all()
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, 8)
    assert (eigenvalues == 0).all()
    np.testing.assert_allclose(vectors, every[:, :8], atol=1e-7)


@pytest.mark.parametrize("n_blobs", [1, 3])
def test_eigenpairs_agree_with_dense_eigh(n_blobs):
    rng = np.random.default_rng(n_blobs)
    points = separated_blobs(n_blobs, 900 // n_blobs, seed=n_blobs) if n_blobs > 1 else \
        rng.standard_normal((900, 6)).astype(np.float32)
    adjacency = graph.knn_graph(points, 13)
    expected_values, expected_vectors = np.linalg.eigh(dense_laplacian(adjacency))
    # cut the subspace where the dense spectrum has its widest gap between 8 and 24, so the
    # subspace is well defined whatever the signs or rotations inside repeated eigenvalues
    m = 8 + int(np.argmax(np.diff(expected_values[7:25])))
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, m)
    np.testing.assert_allclose(eigenvalues, np.maximum(expected_values[:m], 0), atol=1e-5)
    projector_gap = vectors @ vectors.T.astype(np.float64) - expected_vectors[:, :m] @ expected_vectors[:, :m].T
    assert np.linalg.norm(projector_gap, 2) < 1e-3


def test_objective_equals_slow_reference_on_a_graph_with_components():
    cells = make_clustered_cells(1200, n_dims=16, n_clusters=4, center_scale=30.0, latent_scale=0.3, seed=21,
                                 dtype=np.float32)
    initial = graph_denoising.initial_labels(cells.predictions)
    k, m, lam, gamma = 20, 12, 0.001, 0.12
    slow = reference.reference_pipeline(cells.embeddings, initial, k, m, lam, gamma)
    adjacency = graph.knn_graph(cells.embeddings, k)
    np.testing.assert_array_equal(adjacency.toarray(), slow["adjacency"])
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, m)
    assert int(np.sum(eigenvalues < 1e-6)) == int(np.sum(slow["eigenvalues"] < 1e-6)) == 4
    fast = solver.denoise(vectors, eigenvalues, initial, lam, gamma)
    fast_value = solver.objective(vectors, eigenvalues, fast.coefficients, fast.labels, initial, lam, gamma)
    assert abs(fast_value - slow["objective"]) <= 0.01 * slow["objective"]


def test_k_counts_the_cell_itself_like_the_reference():
    points = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=np.float32)
    # k = 2: each point linked to its one nearest other point, then symmetrised
    adjacency = graph.knn_graph(points, 2).toarray()
    expected = np.zeros((5, 5))
    for a, b in [(0, 1), (1, 0), (2, 1), (3, 2), (4, 3)]:
        expected[a, b] = expected[b, a] = 1
    np.testing.assert_array_equal(adjacency, expected)


def test_reference_flag_names_mean_ours():
    parse = graph_denoising.build_parser().parse_args
    ours = parse(["--fold", "1", "-k", "15", "--n-eigenvectors", "8", "--precomputed-graph", "g.npz"])
    theirs = parse(["--fold", "1", "--num-graph-neighbours", "15", "--num-eigenvectors", "8",
                    "--precomputed-knn-graph-path", "g.npz"])
    assert vars(ours) == vars(theirs)
    assert ours.metric == "l2" and ours.knn_method == "auto" and ours.n_neighbors == 15


def write_pseudo_labels(root: Path, cells, compression: str | None = "gzip") -> pd.DataFrame:
    layout = OutputLayout(root)
    layout.root.mkdir(parents=True, exist_ok=True)
    image_ids, cell_indices = write_pseudo_label_store(layout.pseudo_labels_h5, cells.predictions,
                                                       cells.embeddings.astype(np.float16), 10, compression)
    folds = pd.DataFrame({"ID": image_ids, "cell_i": cell_indices, "fold": 0})
    folds.to_csv(layout.denoising_folds_csv, index=False)
    return folds


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO_ROOT)


def test_defaults_find_planted_missed_labels_end_to_end(tmp_path):
    # generated unlike the bench and the tuning sets: 12 clusters in 96 dims, 25% of positives lowered
    cells = make_clustered_cells(2400, n_dims=96, n_clusters=12, center_scale=0.6, latent_scale=0.3,
                                 lowered_fraction=0.25, seed=33, dtype=np.float32)
    write_pseudo_labels(tmp_path, cells)
    completed = run_module("src.denoising.graph_denoising", "--fold", "0", "--output-dir", str(tmp_path), "--no-plots")
    assert completed.returncode == 0, completed.stderr
    assert "kNN search: exact" in completed.stderr
    with h5py.File(OutputLayout(tmp_path).denoised_h5(0), "r") as h5:
        initial, denoised = h5["Y_init"][:, :NUM_CLASSES], h5["Y_opt"][:, :NUM_CLASSES]
        assert h5.attrs["k"] == 200 and h5.attrs["metric"] == "l2"
    selected = np.stack([select_candidates.select_cells(initial[:, c], denoised[:, c]) for c in range(NUM_CLASSES)], 1)
    hits = int((selected & cells.lowered).sum())
    assert hits / cells.lowered.sum() >= 0.7 and hits / selected.sum() >= 0.7
    # the reference's rule finds almost none of them on the same output
    reference_rule = np.stack([select_candidates.select_cells(initial[:, c], denoised[:, c], rule="reference")
                               for c in range(NUM_CLASSES)], 1)
    assert (reference_rule & cells.lowered).sum() < hits / 2


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def text(path: Path) -> None:
    path.write_text("ID,cell_i\nabc,1\n")


def flip_bits_in_embeddings(path: Path) -> None:
    """Flip one byte in the middle of the first compressed chunk of the embeddings."""
    with h5py.File(path, "r") as h5:
        chunk = h5["embeddings"].id.get_chunk_info(0)
    with open(path, "r+b") as handle:
        handle.seek(chunk.byte_offset + chunk.size // 2)
        byte = handle.read(1)[0]
        handle.seek(chunk.byte_offset + chunk.size // 2)
        handle.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("damage", [truncate, empty, text, flip_bits_in_embeddings])
def test_damaged_pseudo_label_file_gives_one_line(tmp_path, damage):
    cells = make_clustered_cells(300, n_dims=16, n_clusters=4, seed=2, dtype=np.float32)
    write_pseudo_labels(tmp_path, cells)
    layout = OutputLayout(tmp_path)
    argv = ["--fold", "0", "--output-dir", str(tmp_path), "--num-graph-neighbours", "10",
            "--num-eigenvectors", "5", "--no-plots"]
    assert run_module("src.denoising.graph_denoising", *argv).returncode == 0
    good_output = layout.denoised_h5(0).read_bytes()
    folds_before = layout.denoising_folds_csv.read_bytes()
    damage(layout.pseudo_labels_h5)
    completed = run_module("src.denoising.graph_denoising", *argv)
    assert completed.returncode == 2
    # progress lines may come first (the embeddings are streamed); then one error line and nothing else
    lines = completed.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and str(layout.pseudo_labels_h5) in errors[0]
    assert all(" INFO " in line for line in lines[:-1]) and "Traceback" not in completed.stderr
    # the previous good output and the other inputs are untouched, and no temporary file is left
    assert layout.denoised_h5(0).read_bytes() == good_output
    assert layout.denoising_folds_csv.read_bytes() == folds_before
    assert sorted(p.name for p in layout.denoised_h5(0).parent.iterdir()) == ["fold0.h5"]


def test_damaged_denoised_fold_file_gives_one_line(tmp_path):
    layout = OutputLayout(tmp_path)
    layout.denoised_h5(0).parent.mkdir(parents=True)
    layout.denoised_h5(0).write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))  # an HDF5 signature, then nothing
    completed = run_module("src.denoising.select_candidates", "--class", "Mitotic spindle", "--output-dir",
                           str(tmp_path), "--input-dir", str(tmp_path / "input"))
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fold0.h5" in lines[0]
    assert not (tmp_path / "input").exists()


def test_fold_rows_stream_the_same_values_as_a_full_read(tmp_path):
    values = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5["x"] = values
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        for rows in (np.arange(10, 60, 2), np.array([0, 50, 199]), np.array([7])):  # dense, sparse, single
            view = graph_denoising.FoldRows(h5["x"], rows, tmp_path / "a.h5")
            assert view.shape == (len(rows), 3)
            np.testing.assert_array_equal(np.concatenate([view[i:i + 2] for i in range(0, len(rows), 2)]), values[rows])
            assert view[len(rows):].shape == (0, 3)


class CountingRows:
    """Row-sliceable embeddings that count how many rows were read (as FoldRows reads the HDF5)."""

    def __init__(self, values: np.ndarray):
        self.values, self.shape, self.rows_read = values, values.shape, 0

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, key: slice) -> np.ndarray:
        block = self.values[key]
        self.rows_read += len(block)
        return block


@pytest.mark.parametrize("pca_dims, passes", [(0, 1), (4, 2)])
def test_prepare_points_reads_each_row_once_per_pass_and_still_refuses_nan(pca_dims, passes):
    values = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float16)
    reader = CountingRows(values)
    points, _ = graph.prepare_points(reader, "l2", pca_dims, block_rows=16)
    assert reader.rows_read == passes * len(values)  # the NaN/inf check adds no pass of its own
    if not pca_dims:
        np.testing.assert_array_equal(points, values.astype(np.float32))
    for bad in (np.nan, np.inf):
        damaged = values.copy()
        damaged[[5, 40], 2] = bad
        with pytest.raises(UserInputError, match=r"2 of 50 embeddings hold NaN or inf \(rows \[5, 40\]\)"):
            graph.prepare_points(CountingRows(damaged), "l2", pca_dims, block_rows=16)


def test_cli_finds_every_component(tmp_path):
    embeddings = separated_blobs(6, 120, n_dims=16, seed=8)
    predictions = np.random.default_rng(8).uniform(0, 1, (len(embeddings), NUM_CLASSES)).astype(np.float32)
    cells = type("Cells", (), {"embeddings": embeddings, "predictions": predictions})
    write_pseudo_labels(tmp_path, cells)
    argv = ["--fold", "0", "--output-dir", str(tmp_path), "-k", "11", "--n-eigenvectors", "12", "--no-plots"]
    assert graph_denoising.main(argv) == 0
    with h5py.File(OutputLayout(tmp_path).denoised_h5(0), "r") as h5:
        eigenvalues = h5["eigenvalues"][:]
    assert int(np.sum(eigenvalues < 1e-6)) == 6 and eigenvalues[6] > 1e-3
