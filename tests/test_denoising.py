"""Graph denoising: graph, eigenpairs, solver against a slow reference, bad input, both CLIs."""
from __future__ import annotations

import argparse

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from src.data.classes import CLASS_NAMES, NUM_CLASSES
from src.data.schema import OutputLayout
from src.denoising import graph, graph_denoising, reference, select_candidates, solver, spectrum
from src.denoising.synthetic import make_clustered_cells, write_pseudo_label_store
from src.utils.io import UserInputError

CLASS_MITOTIC = CLASS_NAMES.index("Mitotic spindle")


def small_cells(n_cells=600, n_dims=32, seed=0, **kwargs):
    return make_clustered_cells(n_cells, n_dims=n_dims, n_clusters=6, center_scale=1.0, latent_scale=0.3,
                                seed=seed, dtype=np.float32, **kwargs)


def with_nothing_there(predictions):
    return graph_denoising.initial_labels(predictions)


# ----------------------------------------------------------------------------- closed-form steps

def test_soft_threshold_by_hand():
    values = np.array([-3.0, -0.5, 0.0, 0.2, 1.5])
    np.testing.assert_allclose(solver.soft_threshold(values, 1.0), [-2.0, 0.0, 0.0, 0.0, 0.5])
    # per-row thresholds broadcast over columns, as in the A-step
    matrix = np.array([[1.0, -1.0], [1.0, -1.0]])
    np.testing.assert_allclose(solver.soft_threshold(matrix, np.array([[0.25], [2.0]])), [[0.75, -0.75], [0, 0]])


def test_y_step_by_hand():
    gamma = 0.12
    smooth = np.array([0.9, 0.1, 0.55, -0.5, 0.05])
    initial = np.array([0.2, 0.8, 0.5, 0.3, 0.0])
    # z far above y0 -> z - gamma; far below -> z + gamma; within gamma -> y0; negative result -> 0
    expected = [0.78, 0.22, 0.5, 0.0, 0.0]
    np.testing.assert_allclose(solver.y_step(smooth, initial, gamma), expected, atol=1e-12)


def test_y_step_matches_candidate_search():
    rng = np.random.default_rng(1)
    smooth = rng.normal(0.3, 0.5, (200, 7))
    initial = rng.uniform(0, 1, (200, 7))
    np.testing.assert_allclose(solver.y_step(smooth, initial, 0.12),
                               reference.reference_y_step(smooth, initial, 0.12), atol=1e-12)


def test_a_step_thresholds_per_eigenvalue():
    vectors = np.linalg.qr(np.random.default_rng(2).normal(size=(40, 3)))[0]
    labels = vectors @ np.array([[2.0], [0.3], [-0.05]])  # V^T Y = (2, 0.3, -0.05)
    eigenvalues = np.array([0.0, 0.25, 1.0])
    coefficients = solver.a_step(vectors.astype(np.float32), labels.astype(np.float32), eigenvalues, lam=0.2)
    # thresholds 0.2 * sqrt(e) = (0, 0.1, 0.2)
    np.testing.assert_allclose(coefficients[:, 0], [2.0, 0.2, 0.0], atol=1e-5)


def test_a_step_equals_iterative_lasso():
    rng = np.random.default_rng(3)
    vectors = np.linalg.qr(rng.normal(size=(300, 12)))[0]
    labels = rng.uniform(0, 1, (300, 4))
    eigenvalues = np.sort(rng.uniform(0, 1.5, 12))
    lam = 0.4  # large enough that many coefficients are thresholded to zero
    closed = solver.a_step(vectors.astype(np.float32), labels.astype(np.float32), eigenvalues, lam)
    weights = lam * np.sqrt(eigenvalues)
    for column in range(4):
        iterative = reference.weighted_lasso_coordinate_descent(vectors.T @ vectors, vectors.T @ labels[:, column],
                                                                weights)
        np.testing.assert_allclose(closed[:, column], iterative, atol=1e-4)
    assert (closed == 0).any()


# ----------------------------------------------------------------------------- graph and eigenpairs

def test_knn_graph_symmetric_binary_and_exact():
    cells = small_cells(500)
    k = 15
    adjacency = graph.knn_graph(cells.embeddings, k)
    assert isinstance(adjacency, sp.csr_matrix) and adjacency.dtype == np.float32
    assert (adjacency != adjacency.T).nnz == 0
    assert set(np.unique(adjacency.data)) == {1.0}
    assert adjacency.diagonal().sum() == 0
    assert np.diff(adjacency.indptr).min() >= k - 1
    expected = reference.reference_adjacency(cells.embeddings, k)
    np.testing.assert_array_equal(adjacency.toarray(), expected)


def test_knn_pca_and_ivf_keep_most_neighbours():
    cells = small_cells(1500, n_dims=64)
    exact = graph.knn_graph(cells.embeddings, 10)
    approximate = graph.knn_graph(cells.embeddings, 10, pca_dims=48)
    assert (approximate != approximate.T).nnz == 0
    assert exact.multiply(approximate).nnz / exact.nnz > 0.75
    edges = approximate.tocoo()
    assert np.mean(cells.cluster[edges.row] == cells.cluster[edges.col]) > 0.98
    points, _ = graph.prepare_points(cells.embeddings)
    exact_neighbours = graph.knn_indices(points, 10)
    probed = graph.knn_indices(points, 10, method="ivf", ivf_lists=16, ivf_probe=4)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact_neighbours, probed)])
    assert 0.8 < recall < 1.0


def test_duplicate_embeddings_still_get_k_other_neighbours():
    rng = np.random.default_rng(4)
    points = np.repeat(rng.normal(size=(30, 8)), 10, axis=0).astype(np.float32)  # 10 copies of each
    neighbours = graph.knn_indices(points, 12)
    assert (neighbours != np.arange(len(points))[:, None]).all()
    assert all(len(set(row)) == 12 for row in neighbours)


def test_eigenpairs_match_dense_eigh():
    cells = small_cells(900)
    adjacency = graph.knn_graph(cells.embeddings, 12)
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, 20)  # 900 > 500: Lanczos path
    expected, _ = reference.reference_eigenpairs(adjacency.toarray().astype(np.float64), 20)
    np.testing.assert_allclose(eigenvalues, expected, atol=2e-4)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(20), atol=1e-4)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    laplacian = np.eye(900) - adjacency.toarray() / np.sqrt(np.outer(degrees, degrees))
    residual = laplacian @ vectors - vectors * eigenvalues
    assert np.abs(residual).max() < 1e-2


def test_isolated_node_has_no_nan():
    adjacency = sp.csr_matrix(np.array([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    normalized, degrees = spectrum.normalized_adjacency(adjacency)
    assert np.isfinite(normalized.toarray()).all() and degrees[3] == 0
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, 2)
    np.testing.assert_allclose(eigenvalues, [0.0, 1.0], atol=1e-5)
    assert np.isfinite(vectors).all()


# ----------------------------------------------------------------------------- fast vs slow reference

def test_fast_path_reaches_reference_objective():
    cells = small_cells(1000, n_dims=48, seed=5)
    initial = with_nothing_there(cells.predictions)
    k, m, lam, gamma = 20, 15, 0.001, 0.12
    slow = reference.reference_pipeline(cells.embeddings, initial, k, m, lam, gamma)
    adjacency = graph.knn_graph(cells.embeddings, k)
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, m)
    fast = solver.denoise(vectors, eigenvalues, initial, lam, gamma, track_objective=True)
    fast_value = solver.objective(vectors, eigenvalues, fast.coefficients, fast.labels, initial, lam, gamma)
    assert fast.converged
    assert abs(fast_value - slow["objective"]) <= 0.01 * slow["objective"]
    np.testing.assert_allclose(fast.labels, slow["labels"], atol=0.02)
    # each step minimises exactly, so the objective never rises
    assert np.all(np.diff(fast.objective_history) <= 1e-6 * fast.objective_history[0])


def test_denoising_lifts_lowered_positives():
    cells = make_clustered_cells(1500, n_dims=64, n_clusters=8, center_scale=0.6, latent_scale=0.2, seed=6,
                                 dtype=np.float32)
    initial = with_nothing_there(cells.predictions)
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(graph.knn_graph(cells.embeddings, 30), 20)
    denoised = solver.denoise(vectors, eigenvalues, initial).labels[:, :NUM_CLASSES]
    low = initial[:, :NUM_CLASSES] < 0.4
    lowered_positive = denoised[cells.lowered]
    true_negative = denoised[low & ~cells.positive]
    # after denoising, a lowered positive beats a low-labelled negative of the same range almost always
    assert np.median(lowered_positive) > np.quantile(true_negative, 0.99)
    assert np.median(lowered_positive - initial[:, :NUM_CLASSES][cells.lowered]) > 0.2


# ----------------------------------------------------------------------------- bad input

def test_nan_embeddings_raise():
    cells = small_cells(300)
    cells.embeddings[7, 3] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        graph.knn_graph(cells.embeddings, 10)


def test_fewer_cells_than_k_raises():
    with pytest.raises(UserInputError, match="at least k"):
        graph.knn_graph(np.random.default_rng(0).normal(size=(19, 5)).astype(np.float32), 20)
    adjacency = graph.knn_graph(np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32), 5)
    with pytest.raises(UserInputError, match="0 < m < N"):
        spectrum.smallest_laplacian_eigenpairs(adjacency, 30)


def test_zero_norm_cells_are_isolated_and_keep_their_labels():
    cells = small_cells(600)
    cells.embeddings[[3, 100]] = 0.0
    adjacency = graph.knn_graph(cells.embeddings, 11, metric="cosine")
    degrees = np.diff(adjacency.indptr)
    assert degrees[3] == 0 and degrees[100] == 0 and np.delete(degrees, [3, 100]).min() >= 10
    initial = with_nothing_there(cells.predictions)
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, 10)
    result = solver.denoise(vectors, eigenvalues, initial, frozen_rows=degrees == 0)
    np.testing.assert_array_equal(result.labels[[3, 100]], initial[[3, 100]])
    assert np.isfinite(result.labels).all()


def test_convergence_rule_counts_zeros_as_settled():
    previous = np.array([0.0, 0.0, 1.0, 0.5])
    current = np.array([0.0, 5e-7, 1.005, 0.6])
    assert solver.fraction_settled(previous, current, 0.01, 1e-4) == 0.75


# ----------------------------------------------------------------------------- CLIs

def write_inputs(root, n_cells=900, n_dims=24, n_folds=3, seed=7):
    cells = small_cells(n_cells, n_dims=n_dims, seed=seed)
    layout = OutputLayout(root)
    layout.root.mkdir(parents=True, exist_ok=True)
    image_ids, cell_indices = write_pseudo_label_store(layout.pseudo_labels_h5, cells.predictions,
                                                       cells.embeddings.astype(np.float16), 10)
    folds = pd.DataFrame({"ID": image_ids, "cell_i": cell_indices,
                          "fold": np.random.default_rng(seed).permutation(np.arange(n_cells) % n_folds)})
    folds.sample(frac=1.0, random_state=seed).to_csv(layout.denoising_folds_csv, index=False)  # order must not matter
    return cells, folds


def test_cli_round_trip_and_reuse(tmp_path):
    cells, folds = write_inputs(tmp_path)
    forced = tmp_path / "forced.csv"
    fold_rows = folds[folds["fold"] == 1].sort_values(["ID", "cell_i"])
    fold_rows.iloc[:3][["ID", "cell_i"]].to_csv(forced, index=False)
    graph_file, basis_file = tmp_path / "g.npz", tmp_path / "e.npz"
    argv = ["--fold", "1", "--output-dir", str(tmp_path), "-k", "15", "--n-eigenvectors", "8",
            "--force-positive", f"Mitotic spindle={forced}",
            "--precomputed-graph", str(graph_file), "--precomputed-eigenbasis", str(basis_file)]
    assert graph_denoising.main(argv) == 0
    out = OutputLayout(tmp_path).denoised_h5(1)
    with h5py.File(out, "r") as h5:
        assert set(h5.keys()) == {"image_id", "cell_i", "Y_init", "Y_opt", "eigenvalues"}
        keys = pd.DataFrame({"ID": h5["image_id"][:].astype(str), "cell_i": h5["cell_i"][:]})
        y_init, y_opt, eigenvalues = h5["Y_init"][:], h5["Y_opt"][:], h5["eigenvalues"][:]
    assert sorted(map(tuple, keys.values.tolist())) == sorted(map(tuple, fold_rows[["ID", "cell_i"]].values.tolist()))
    assert y_init.shape == y_opt.shape == (len(fold_rows), NUM_CLASSES + 1) and eigenvalues.shape == (8,)
    rows = keys.reset_index().merge(fold_rows.iloc[:3], on=["ID", "cell_i"])["index"].to_numpy()
    assert (y_init[rows, CLASS_MITOTIC] == 1.0).all() and (y_init[rows, -1] == 0.0).all()
    np.testing.assert_allclose(y_init[:, -1], 1 - y_init[:, :NUM_CLASSES].max(axis=1), atol=1e-6)
    assert (y_opt >= 0).all() and not np.allclose(y_opt, y_init)
    assert out.with_name("fold1_histograms.png").is_file() and out.with_name("fold1_mitotic_before_after.png").is_file()
    assert graph_file.is_file() and basis_file.is_file()
    # second run loads the saved graph and eigenbasis and gives the same labels
    assert graph_denoising.main(argv) == 0
    with h5py.File(out, "r") as h5:
        np.testing.assert_array_equal(h5["Y_opt"][:], y_opt)
    # the saved graph is refused for another fold
    with pytest.raises(UserInputError, match="other cells"):
        graph_denoising.main(["--fold", "2"] + argv[2:])


def test_cli_bad_input(tmp_path):
    write_inputs(tmp_path, n_cells=90)
    base = ["--output-dir", str(tmp_path), "--no-plots"]
    with pytest.raises(UserInputError, match="fold 5 not in"):
        graph_denoising.main(["--fold", "5"] + base)
    with pytest.raises(UserInputError, match="at least k"):
        graph_denoising.main(["--fold", "0", "-k", "200"] + base)
    with pytest.raises(UserInputError, match="not found"):
        graph_denoising.main(["--fold", "0", "--pseudo-labels", str(tmp_path / "absent.h5")] + base)
    with pytest.raises(UserInputError, match="CLASS=path"):
        graph_denoising.main(["--fold", "0", "-k", "5", "--force-positive", "nonsense"] + base)


def test_cli_zero_norm_and_nan_embeddings(tmp_path):
    write_inputs(tmp_path, n_cells=300)
    layout = OutputLayout(tmp_path)
    folds = pd.read_csv(layout.denoising_folds_csv, dtype={"ID": str})
    with h5py.File(layout.pseudo_labels_h5, "r+") as h5:
        keys = pd.DataFrame({"ID": h5["image_id"][:].astype(str), "cell_i": h5["cell_i"][:]})
        in_fold = keys.merge(folds, on=["ID", "cell_i"])["fold"].to_numpy() == 0
        zero_rows = np.flatnonzero(in_fold)[:2]
        embeddings = h5["embeddings"][:]
        embeddings[zero_rows] = 0
        h5["embeddings"][...] = embeddings
    argv = ["--fold", "0", "--output-dir", str(tmp_path), "-k", "10", "--n-eigenvectors", "5", "--no-plots",
            "--metric", "cosine"]
    assert graph_denoising.main(argv) == 0
    with h5py.File(layout.denoised_h5(0), "r") as h5:
        out_keys = pd.DataFrame({"ID": h5["image_id"][:].astype(str), "cell_i": h5["cell_i"][:]})
        rows = out_keys.reset_index().merge(keys.iloc[zero_rows], on=["ID", "cell_i"])["index"].to_numpy()
        assert len(rows) == 2 and h5.attrs["isolated_cells"] == 2
        np.testing.assert_array_equal(h5["Y_opt"][:][rows], h5["Y_init"][:][rows])
    with h5py.File(layout.pseudo_labels_h5, "r+") as h5:
        embeddings[zero_rows[0], 5] = np.nan
        h5["embeddings"][...] = embeddings
    with pytest.raises(UserInputError, match="NaN"):
        graph_denoising.main(argv)


def test_cli_runs_as_module_with_one_line_error(tmp_path):
    import subprocess
    import sys
    completed = subprocess.run([sys.executable, "-m", "src.denoising.graph_denoising", "--fold", "0", "--output-dir",
                                str(tmp_path)], capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("error:") and "denoising folds" in completed.stderr


def write_denoised(path, ids, cell_indices, y_init, y_opt):
    columns = NUM_CLASSES + 1
    full_init = np.zeros((len(ids), columns), np.float32)
    full_opt = np.zeros((len(ids), columns), np.float32)
    full_init[:, CLASS_MITOTIC], full_opt[:, CLASS_MITOTIC] = y_init, y_opt
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["image_id"] = np.array(ids, dtype="S64")
        h5["cell_i"] = np.array(cell_indices, dtype=np.int32)
        h5["Y_init"], h5["Y_opt"] = full_init, full_opt
        h5["eigenvalues"] = np.zeros(3, np.float32)


def test_select_candidates_on_constructed_case(tmp_path):
    layout = OutputLayout(tmp_path / "output")
    # fold 0: max 1.0 -> threshold 0.92; fold 1: max 0.5 -> threshold 0.46 (per-fold maximum)
    write_denoised(layout.denoised_h5(0), ["a", "a", "b", "c", "d"], [0, 1, 0, 2, 0],
                   [0.1, 0.39, 0.4, 0.9, 0.2], [0.95, 0.92, 0.99, 1.0, 0.91])
    write_denoised(layout.denoised_h5(1), ["e", "f", "g"], [0, 3, 1], [0.3, 0.35, 0.1], [0.5, 0.47, 0.45])
    crops_requested = []

    def fake_crop(image_id, cell_i):
        crops_requested.append((image_id, cell_i))
        return np.full((16, 16, 4), 128, np.uint8) if image_id == "a" else None

    args = select_candidates.build_parser().parse_args(
        ["--class", "Mitotic spindle", "--rule", "reference", "--output-dir", str(layout.root),
         "--input-dir", str(tmp_path / "input")])
    selected = select_candidates.run(args, load_crop=fake_crop)
    csv_path = tmp_path / "input" / "mitotic_cells_selection.csv"
    table = pd.read_csv(csv_path, dtype={"ID": str})
    assert list(table.columns) == ["ID", "cell_i"]
    assert table.values.tolist() == [["a", 0], ["a", 1], ["e", 0], ["f", 3]]
    assert len(selected) == 4 and len(crops_requested) == 4
    assert (layout.root / "denoising" / "mitotic_selection_grid.png").is_file()
    # one fold only, without any crop loader
    args = select_candidates.build_parser().parse_args(
        ["--class", "11", "--rule", "reference", "--folds", "1", "--output-dir", str(layout.root), "--out", str(tmp_path / "s.csv"),
         "--grid-png", str(tmp_path / "grid.png")])
    select_candidates.run(args)
    assert pd.read_csv(tmp_path / "s.csv")["ID"].tolist() == ["e", "f"] and (tmp_path / "grid.png").is_file()


def test_select_cells_nothing_when_max_is_zero():
    assert not select_candidates.select_cells(np.zeros(5), np.zeros(5)).any()


def test_select_cells_absolute_threshold_ignores_the_maximum():
    initial = np.array([0.1, 0.2, 0.5, 0.3])
    denoised = np.array([0.6, 0.3, 0.9, 3.0])  # a hub cell at 3.0 would set the relative threshold to 2.76
    assert select_candidates.select_cells(initial, denoised, rule="reference").tolist() == [False, False, False, True]
    assert select_candidates.select_cells(initial, denoised, denoised_above=0.5).tolist() == [True, False, False, True]


def test_select_candidates_bad_input(tmp_path):
    parse = select_candidates.build_parser().parse_args
    with pytest.raises(UserInputError, match="no denoised fold files"):
        select_candidates.run(parse(["--class", "Mitotic spindle", "--output-dir", str(tmp_path)]))
    with pytest.raises(UserInputError, match="unknown class"):
        select_candidates.run(parse(["--class", "Spindle-ish", "--output-dir", str(tmp_path)]))
    assert isinstance(parse(["--class", "0"]), argparse.Namespace)


def test_outlier_rule_by_hand():
    # low cells (Y_init < 0.4): Y_opt 0.10 0.11 0.12 0.13 0.14 0.15 0.60 -> median 0.13; absolute
    # deviations 0 .01 .01 .02 .02 .03 .47 -> MAD 0.02; threshold 0.13 + 4 * 1.4826 * 0.02 = 0.24861
    initial = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.1, 0.0, 0.35, 0.05])
    denoised = np.array([0.2, 0.9, 0.10, 0.12, 0.14, 0.11, 0.13, 0.15, 0.60])
    assert select_candidates.selection_threshold(initial, denoised) == pytest.approx(0.13 + 4 * 1.4826 * 0.02)
    assert np.flatnonzero(select_candidates.select_cells(initial, denoised)).tolist() == [8]
    # scale- and shift-free: a hub-inflated scale or an offset selects the same cells
    assert np.flatnonzero(select_candidates.select_cells(initial, 3 * denoised + 0.5)).tolist() == [8]
    # ties make the MAD 0: the mean absolute deviation stands in (0.8 / 7 * 1.2533)
    tied = np.array([0.2, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9])
    assert select_candidates.selection_threshold(initial, tied) == pytest.approx(0.1 + 4 * 1.2533 * 0.8 / 7)
    assert np.flatnonzero(select_candidates.select_cells(initial, tied)).tolist() == [8]
    # all low cells equal, or no confident positive: nothing
    assert not select_candidates.select_cells(initial, np.full(9, 0.3)).any()
    assert not select_candidates.select_cells(np.full(9, 0.2), denoised).any()