"""Benchmark of the graph denoising stage on generated clustered embeddings (not part of the tests).

    .venv/bin/python bench/bench_graph_denoising.py [--sizes 10000 100000 300000] [--exact-up-to 100000]
    .venv/bin/python bench/bench_graph_denoising.py --sizes 1000000      # the full-HPA fold size, alone

For each size, in fresh processes (own peak memory): writes a pseudo-label HDF5 + one-fold CSV of
generated cells (1024-d, 40 clusters, 30% of each class's positives lowered below 0.4; embeddings
--embedding-style 'gaussian' (noise-dominated) or 'relu' (a manifold, as network features)), runs the
stage end to end with its defaults (`denoise_fold`: the search is chosen from N and the data), and,
when that search was approximate (or with --approximate-too also the 'ivf' search), again with the
exact search in all dims up to --exact-up-to cells, for the objective gap and the share of the exact
graph's edges the approximate graph keeps. Then, per size, the selection of the lowered cells by the
default rule ('outliers') and the reference's rule, and cleanlab's multi-label label-issue finder on
the same cells (given labels: pseudo-label >= 0.5; its out-of-fold probabilities: a logistic
regression on 64 principal components, 5 folds), up to --cleanlab-up-to cells. Prints one table, then
the slow reference against the fast path at --reference-size cells, then the selection on
--selection-sets further data sets drawn with other sizes, cluster counts, spreads, dimensions and
missed fractions (seed --seed + 1000; the rule was chosen on other data).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.data.classes import NUM_CLASSES  # noqa: E402
from src.data.schema import OutputLayout  # noqa: E402


def generate(n_cells: int, n_dims: int, seed: int, workdir: Path, style: str) -> None:
    """Pseudo-label HDF5, one-fold folds CSV and the truth (lowered mask) under workdir."""
    from src.denoising.synthetic import make_clustered_cells, write_pseudo_label_store

    cells = make_clustered_cells(n_cells, n_dims=n_dims, seed=seed, embedding_style=style)
    layout = OutputLayout(workdir)
    layout.root.mkdir(parents=True, exist_ok=True)
    image_ids, cell_indices = write_pseudo_label_store(layout.pseudo_labels_h5, cells.predictions, cells.embeddings, 20)
    del cells.embeddings
    pd.DataFrame({"ID": image_ids, "cell_i": cell_indices, "fold": 0}).to_csv(
        layout.denoising_folds_csv, index=False)
    np.savez(workdir / "truth.npz", lowered=cells.lowered)


SEARCHES = {"auto": ["--knn-method", "auto"], "exact": ["--knn-method", "exact", "--pca-dims", "0"],
            "ivf": ["--knn-method", "ivf"]}


def measure(workdir: Path, search: str, k: int, m: int, seed: int) -> dict:
    """Run the stage end to end in this process; seconds per step, peak RSS, search used, objective."""
    from src.denoising import graph_denoising
    from src.utils.io import setup_logging

    setup_logging()
    graph_file = workdir / f"graph_{search}.npz"
    args = graph_denoising.build_parser().parse_args(
        ["--fold", "0", "--output-dir", str(workdir), "-k", str(k), "--n-eigenvectors", str(m), *SEARCHES[search],
         "--seed", str(seed), "--no-plots", "--precomputed-graph", str(graph_file)])
    started = time.perf_counter()
    summary = graph_denoising.denoise_fold(args)
    summary["seconds"] = time.perf_counter() - started
    summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    out = OutputLayout(workdir).denoised_h5(0)
    with h5py.File(out, "r") as h5:
        summary.update(method=str(h5.attrs["knn_method"]), pca_dims=int(h5.attrs["pca_dims"]),
                       recall=float(h5.attrs["knn_recall_searched_space"]), full_recall=float(h5.attrs["knn_recall"]))
    out.rename(out.with_name(f"fold0_{search}.h5"))
    return summary


def edge_overlap(workdir: Path, exact_name: str, approximate_name: str) -> float:
    """Share of the exact graph's edges that the approximate graph holds too."""
    graphs = []
    for name in (exact_name, approximate_name):
        with np.load(workdir / f"graph_{name}.npz") as saved:
            graphs.append((saved["indptr"], saved["indices"]))
    (exact_ptr, exact_idx), (approx_ptr, approx_idx) = graphs
    shared = sum(len(np.intersect1d(exact_idx[exact_ptr[row]:exact_ptr[row + 1]],
                                    approx_idx[approx_ptr[row]:approx_ptr[row + 1]], assume_unique=True))
                 for row in range(len(exact_ptr) - 1))
    return shared / len(exact_idx)


def selection_figures(initial: np.ndarray, denoised: np.ndarray, lowered: np.ndarray) -> dict:
    """Recall and precision of the lowered cells, pooled over the 19 classes, for both rules."""
    from src.denoising.select_candidates import select_cells

    figures = {}
    for rule in ("outliers", "reference"):
        chosen = np.stack([select_cells(initial[:, c], denoised[:, c], rule=rule) for c in range(NUM_CLASSES)], 1)
        hits = int((chosen & lowered).sum())
        figures[rule] = (hits / max(int(lowered.sum()), 1), hits / max(int(chosen.sum()), 1))
    return figures


def cleanlab_figures(workdir: Path, seed: int) -> dict:
    """cleanlab's per-class label issues among cells whose given label is 0, against the lowered cells."""
    try:
        from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class
    except ImportError:
        return {"error": "cleanlab not installed"}
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    with h5py.File(OutputLayout(workdir).pseudo_labels_h5, "r") as h5:
        predictions = h5["predictions"][:].astype(np.float32)
        embeddings = h5["embeddings"][:].astype(np.float32)
    lowered = np.load(workdir / "truth.npz")["lowered"]
    started = time.perf_counter()
    features = PCA(64, random_state=seed).fit_transform(embeddings)
    del embeddings
    given = predictions >= 0.5
    out_of_fold = np.zeros_like(predictions)
    for train, held in KFold(5, shuffle=True, random_state=seed).split(features):
        for c in range(NUM_CLASSES):
            if given[train, c].all() or not given[train, c].any():
                out_of_fold[held, c] = given[train, c].mean()
                continue
            model = LogisticRegression(max_iter=200).fit(features[train], given[train, c])
            out_of_fold[held, c] = model.predict_proba(features[held])[:, 1]
    model_seconds = time.perf_counter() - started
    started = time.perf_counter()
    labels = [np.flatnonzero(row).tolist() for row in given]
    issues = np.asarray(find_multilabel_issues_per_class(labels, out_of_fold, n_jobs=1), dtype=bool)
    chosen = (issues if issues.shape == given.shape else issues.T) & ~given
    hits = int((chosen & lowered).sum())
    return {"recall": hits / max(int(lowered.sum()), 1), "precision": hits / max(int(chosen.sum()), 1),
            "model_seconds": model_seconds, "seconds": time.perf_counter() - started}


def reference_speed(n_cells: int, n_dims: int, k: int, m: int, seed: int) -> dict:
    """Fast path (exact kNN, no PCA) against the slow reference on the same cells: seconds and objectives."""
    from src.denoising import graph, reference, solver, spectrum
    from src.denoising.graph_denoising import initial_labels
    from src.denoising.synthetic import make_clustered_cells

    cells = make_clustered_cells(n_cells, n_dims=n_dims, seed=seed, dtype=np.float32)
    initial = initial_labels(cells.predictions)
    started = time.perf_counter()
    eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(graph.knn_graph(cells.embeddings, k), m, seed=seed)
    fast = solver.denoise(vectors, eigenvalues, initial)
    fast_seconds = time.perf_counter() - started
    fast_value = solver.objective(vectors, eigenvalues, fast.coefficients, fast.labels, initial, 0.001, 0.12)
    started = time.perf_counter()
    slow = reference.reference_pipeline(cells.embeddings, initial, k, m, 0.001, 0.12)
    return {"fast_seconds": fast_seconds, "slow_seconds": time.perf_counter() - started,
            "fast_objective": fast_value, "slow_objective": slow["objective"]}


def selection_sets(count: int, seed: int) -> list[dict]:
    """Selection figures on `count` data sets whose generator settings are drawn with `seed`."""
    from src.denoising import graph, solver, spectrum
    from src.denoising.graph_denoising import initial_labels
    from src.denoising.synthetic import make_clustered_cells

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        settings = {"n_cells": int(rng.integers(4000, 20001)), "n_dims": int(rng.choice([128, 384, 768, 1024])),
                    "n_clusters": int(rng.integers(10, 81)), "center_scale": round(float(rng.uniform(0.2, 0.5)), 2),
                    "latent_scale": round(float(rng.uniform(0.05, 0.25)), 2),
                    "lowered_fraction": round(float(rng.uniform(0.15, 0.4)), 2), "seed": int(rng.integers(10 ** 6)),
                    "embedding_style": str(rng.choice(["gaussian", "relu"]))}
        cells = make_clustered_cells(dtype=np.float32, **settings)
        initial = initial_labels(cells.predictions)
        eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(graph.knn_graph(cells.embeddings, 200), 50)
        denoised = solver.denoise(vectors, eigenvalues, initial).labels
        rows.append({**settings, **selection_figures(initial[:, :NUM_CLASSES], denoised[:, :NUM_CLASSES],
                                                     cells.lowered)})
    return rows


def run_child(mode: list[str], args: argparse.Namespace) -> dict:
    """Run one step in a fresh process (own peak memory), with this run's settings."""
    settings = ["--dims", str(args.dims), "-k", str(args.k), "-m", str(args.m), "--seed", str(args.seed),
                "--embedding-style", args.embedding_style]
    completed = subprocess.run([sys.executable, __file__, *settings, "--child", *mode], capture_output=True,
                               text=True, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    mode, *rest = args.child
    if mode == "generate":
        generate(int(rest[0]), args.dims, args.seed, Path(rest[1]), args.embedding_style)
        result = {}
    elif mode == "measure":
        result = measure(Path(rest[0]), rest[1], args.k, args.m, args.seed)
    elif mode == "cleanlab":
        result = cleanlab_figures(Path(rest[0]), args.seed)
    elif mode == "reference":
        result = reference_speed(int(rest[0]), args.dims, args.k, args.m, args.seed)
    else:
        result = {"sets": selection_sets(int(rest[0]), args.seed + 1000)}
    print(json.dumps(result))


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def percent_pair(pair) -> str:
    return f"{100 * pair[0]:3.0f}/{100 * pair[1]:3.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--exact-up-to", type=int, default=100_000,
                        help="also run the exact search in all dims up to N cells (for the objective gap)")
    parser.add_argument("--cleanlab-up-to", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--embedding-style", choices=("gaussian", "relu"), default="gaussian",
                        help="generated embeddings: isotropic noise around cluster centres, or a low-dimensional "
                             "manifold as network features (see src/denoising/synthetic.py)")
    parser.add_argument("--approximate-too", action="store_true",
                        help="where 'auto' searches exactly, also run the approximate search (ivf) for the gap")
    parser.add_argument("-k", type=int, default=200)
    parser.add_argument("-m", type=int, default=50)
    parser.add_argument("--reference-size", type=int, default=3000, help="0 = skip the slow reference")
    parser.add_argument("--selection-sets", type=int, default=4, help="0 = skip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    print(f"graph denoising bench: dims {args.dims}, k {args.k} (self counted), m {args.m}, seed {args.seed}; "
          f"load average at start {load_average()} (2 cores shared with other work)")
    print("times in s (wall); recall: sampled kNN recall against exact search in the searched space / in all "
          "dims; on the exact row, edges and obj gap: the approximate run's share of its edges and its objective "
          "relative to it; sel R/P in %: outliers (default) and reference rule; cleanlab R/P in %")
    header = (f"{'cells':>8} {'search':>11} {'load':>5} {'graph':>6} {'eigen':>6} {'solve':>5} {'write':>5} "
              f"{'total':>6} {'peakGB':>6} {'recall':>11} {'edges':>6} {'obj gap':>8} {'outliers':>9} "
              f"{'reference':>9} {'cleanlab':>9} {'cl s':>6} {'load avg':>8}")
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_denoise_") as tmp:
        for n_cells in args.sizes:
            workdir = Path(tmp) / f"n{n_cells}"
            run_child(["generate", str(n_cells), str(workdir)], args)
            lowered = np.load(workdir / "truth.npz")["lowered"]
            runs = {"auto": run_child(["measure", str(workdir), "auto"], args)}
            approximate = "auto" if runs["auto"]["method"] != "exact" else None
            if approximate is None and args.approximate_too:
                approximate, runs["ivf"] = "ivf", run_child(["measure", str(workdir), "ivf"], args)
            exact_known = runs["auto"]["method"] == "exact" and runs["auto"]["pca_dims"] <= 0
            if approximate and n_cells <= args.exact_up_to and not exact_known:
                runs["exact"] = run_child(["measure", str(workdir), "exact"], args)
            exact_name = "exact" if "exact" in runs else ("auto" if exact_known and approximate else None)
            cleanlab = run_child(["cleanlab", str(workdir)], args) if n_cells <= args.cleanlab_up_to else {}
            for name, result in runs.items():
                with h5py.File(workdir / "denoising" / f"fold0_{name}.h5", "r") as h5:
                    figures = selection_figures(h5["Y_init"][:, :NUM_CLASSES], h5["Y_opt"][:, :NUM_CLASSES], lowered)
                steps = result["timings"]
                search = result["method"] + (f"+pca{result['pca_dims']}" if result["pca_dims"] > 0 else "")
                edges, objective_gap = "-", "-"
                if name == exact_name and approximate and approximate != name:
                    edges = f"{edge_overlap(workdir, name, approximate):.3f}"
                    objective_gap = f"{100 * (runs[approximate]['objective'] / result['objective'] - 1):+.2f}%"
                cleanlab_pair, cleanlab_seconds = "-", "-"
                if name == "auto" and "recall" in cleanlab:
                    cleanlab_pair = percent_pair((cleanlab["recall"], cleanlab["precision"]))
                    cleanlab_seconds = f"{cleanlab['model_seconds'] + cleanlab['seconds']:.0f}"
                elif name == "auto" and "error" in cleanlab:
                    cleanlab_pair = "missing"
                recall = f"{result['recall']:.3f}/{result['full_recall']:.3f}"
                print(f"{n_cells:>8} {search:>11} {steps['load']:>5.1f} {steps['graph']:>6.1f} {steps['eigen']:>6.1f} "
                      f"{steps['solve']:>5.1f} {steps['write']:>5.1f} {result['seconds']:>6.1f} "
                      f"{result['peak_rss_gb']:>6.2f} {recall:>11} {edges:>6} {objective_gap:>8} "
                      f"{percent_pair(figures['outliers']):>9} {percent_pair(figures['reference']):>9} "
                      f"{cleanlab_pair:>9} {cleanlab_seconds:>6} {load_average().split()[0]:>8}", flush=True)
            if "error" in cleanlab:
                print(f"  ({cleanlab['error']}: install it to compare, see the README)")
            shutil.rmtree(workdir)
    if args.reference_size:
        speed = run_child(["reference", str(args.reference_size)], args)
        gap = speed["fast_objective"] / speed["slow_objective"] - 1
        print(f"\nslow reference vs fast path at {args.reference_size} cells (exact kNN, {args.dims} dims): slow "
              f"{speed['slow_seconds']:.1f} s, fast {speed['fast_seconds']:.1f} s; objective gap {100 * gap:+.4f}%")
    if args.selection_sets:
        print(f"\nselection of planted missed labels on {args.selection_sets} more generated sets (settings drawn "
              f"with seed {args.seed + 1000}; exact search, defaults): recall/precision in %")
        for row in run_child(["sets", str(args.selection_sets)], args)["sets"]:
            settings = ", ".join(f"{key} {row[key]}" for key in ("n_cells", "n_dims", "n_clusters", "center_scale",
                                                                  "latent_scale", "lowered_fraction", "seed", "embedding_style"))
            print(f"  {settings}: outliers {percent_pair(row['outliers'])}, reference {percent_pair(row['reference'])}")
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
