"""Benchmark of the graph denoising stage on generated clustered embeddings (not part of the tests).

    .venv/bin/python bench/bench_graph_denoising.py [--sizes 10000 30000 100000] [--pca-dims 128]

For each size: writes a pseudo-label HDF5 + denoising folds CSV (one fold) of generated cells, runs
the stage end to end (`denoise_fold`: read, kNN graph, eigenpairs, solve, write HDF5 and PNGs) in a
fresh process, and prints its seconds per step and peak resident memory. Then the quality of the
selection rule (Y_init < 0.4 and Y_opt >= fraction * class max) on the cells whose positive label
was lowered below 0.4, and the speed of the slow reference against the fast path at --reference-size.
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

from src.data.classes import CLASS_NAMES, NUM_CLASSES  # noqa: E402
from src.data.schema import OutputLayout  # noqa: E402
from src.predict import pseudo_label_store as store  # noqa: E402

# (rule, threshold): "fraction" = Y_opt >= threshold * class max (the reference's rule, default 0.92),
# "absolute" = Y_opt >= threshold (select_candidates --denoised-above)
RULES = tuple(("fraction", f) for f in (0.92, 0.8, 0.7, 0.6, 0.5, 0.4)) + tuple(("absolute", a) for a in (0.25, 0.3, 0.4))


def generate(n_cells: int, n_dims: int, seed: int, workdir: Path) -> None:
    """Pseudo-label HDF5, one-fold folds CSV and the truth (lowered, positive masks) under workdir."""
    from src.denoising.synthetic import make_clustered_cells

    cells = make_clustered_cells(n_cells, n_dims=n_dims, seed=seed)
    layout = OutputLayout(workdir)
    layout.root.mkdir(parents=True, exist_ok=True)
    image_ids = store.encode_ids([f"img{i // 20:06d}" for i in range(n_cells)])
    cell_indices = (np.arange(n_cells) % 20).astype(np.int32)
    no_code = np.zeros(n_cells, np.int8)
    store.write_part(layout.pseudo_labels_h5, "bench", store.CellRows(
        image_ids, cell_indices, no_code.astype(np.uint8), no_code, cells.predictions.astype(np.float16),
        cells.embeddings.astype(np.float16)))
    store.unify(layout.pseudo_labels_h5, compression=None)
    pd.DataFrame({"ID": image_ids.astype(str), "cell_i": cell_indices, "fold": 0}).to_csv(
        layout.denoising_folds_csv, index=False)
    # predictions go through float16 in the HDF5: keep the truth on the stored values
    np.savez(workdir / "truth.npz", lowered=cells.lowered, positive=cells.positive)


def measure(workdir: Path, k: int, m: int, pca_dims: int, knn_method: str, seed: int) -> dict:
    """Run the stage end to end in this process; seconds per step and peak RSS."""
    from src.denoising import graph_denoising
    from src.utils.io import setup_logging

    setup_logging()
    args = graph_denoising.build_parser().parse_args(
        ["--fold", "0", "--output-dir", str(workdir), "-k", str(k), "--n-eigenvectors", str(m),
         "--pca-dims", str(pca_dims), "--knn-method", knn_method, "--seed", str(seed)])
    started = time.perf_counter()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    summary = graph_denoising.denoise_fold(args)
    summary["seconds"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of all threads: a measure of the work that other jobs on the machine do not inflate much
    summary["cpu_seconds"] = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return summary


def reference_speed(n_cells: int, n_dims: int, k: int, m: int, seed: int) -> dict:
    """Fast path (exact kNN, no PCA) against the slow reference on the same cells: seconds and objectives."""
    from src.denoising import graph, reference, solver
    from src.denoising.graph_denoising import initial_labels
    from src.denoising.synthetic import make_clustered_cells

    cells = make_clustered_cells(n_cells, n_dims=n_dims, seed=seed, dtype=np.float32)
    initial = initial_labels(cells.predictions)
    started = time.perf_counter()
    eigenvalues, vectors = graph.smallest_laplacian_eigenpairs(graph.knn_graph(cells.embeddings, k), m, seed=seed)
    fast = solver.denoise(vectors, eigenvalues, initial)
    fast_seconds = time.perf_counter() - started
    fast_value = solver.objective(vectors, eigenvalues, fast.coefficients, fast.labels, initial, 0.001, 0.12)
    started = time.perf_counter()
    slow = reference.reference_pipeline(cells.embeddings, initial, k, m, 0.001, 0.12)
    slow_seconds = time.perf_counter() - started
    return {"fast_seconds": fast_seconds, "slow_seconds": slow_seconds, "fast_objective": fast_value,
            "slow_objective": slow["objective"]}


def selection_quality(workdir: Path) -> list[dict]:
    """Recall / precision of each selection rule for the lowered positives, pooled over the 19 classes
    and for Mitotic spindle alone."""
    from src.denoising.select_candidates import select_cells

    truth = np.load(workdir / "truth.npz")
    with h5py.File(OutputLayout(workdir).denoised_h5(0), "r") as h5:
        initial, denoised = h5["Y_init"][:, :NUM_CLASSES], h5["Y_opt"][:, :NUM_CLASSES]
    lowered = truth["lowered"]
    mitotic = CLASS_NAMES.index("Mitotic spindle")
    rows = []
    for rule, threshold in RULES:
        selected = np.stack([select_cells(initial[:, c], denoised[:, c], 0.4, threshold) if rule == "fraction" else
                             select_cells(initial[:, c], denoised[:, c], 0.4, denoised_above=threshold)
                             for c in range(NUM_CLASSES)], axis=1)
        for name, chosen, truly in (("all classes", selected, lowered),
                                    ("Mitotic spindle", selected[:, mitotic], lowered[:, mitotic])):
            hits = int((chosen & truly).sum())
            rows.append({"rule": f"{rule} {threshold:.2f}", "classes": name, "lowered": int(truly.sum()),
                         "selected": int(chosen.sum()), "recall": hits / max(int(truly.sum()), 1),
                         "precision": hits / max(int(chosen.sum()), 1)})
    return rows


def print_quality(rows: list[dict], n_cells: int) -> None:
    print(f"selection quality on {n_cells} cells (Y_init < 0.4 and the rule; truth = positives lowered below 0.4):")
    for row in rows:
        print(f"  {row['rule']:<14} {row['classes']:<16} lowered {row['lowered']:>6} selected {row['selected']:>6} "
              f"recall {row['recall']:.3f} precision {row['precision']:.3f}")


def run_child(mode: list[str], args: argparse.Namespace) -> dict:
    """Run one step in a fresh process (own peak memory), with this run's settings."""
    settings = ["--dims", str(args.dims), "-k", str(args.k), "-m", str(args.m), "--pca-dims", str(args.pca_dims),
                "--knn-method", args.knn_method, "--seed", str(args.seed)]
    completed = subprocess.run([sys.executable, __file__, *settings, "--child", *mode], capture_output=True,
                               text=True, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("-k", type=int, default=200)
    parser.add_argument("-m", type=int, default=50)
    parser.add_argument("--pca-dims", type=int, default=128, help="PCA before the kNN search (0 = exact in full dims)")
    parser.add_argument("--knn-method", default="exact", choices=["exact", "ivf"])
    parser.add_argument("--reference-size", type=int, default=5000, help="0 = skip the slow reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "generate":
            generate(int(rest[0]), args.dims, args.seed, Path(rest[1]))
            print(json.dumps({}))
        elif mode == "measure":
            print(json.dumps(measure(Path(rest[0]), args.k, args.m, args.pca_dims, args.knn_method, args.seed)))
        elif mode == "reference":
            print(json.dumps(reference_speed(int(rest[0]), args.dims, args.k, args.m, args.seed)))
        return

    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "?"
    print(f"graph denoising bench: dims {args.dims}, k {args.k}, m {args.m}, PCA {args.pca_dims or 'off'}, "
          f"kNN {args.knn_method}, seed {args.seed}; load average at start {' '.join(load)}")
    print(f"{'cells':>8} {'total s':>8} {'cpu s':>6} {'load':>6} {'graph':>6} {'eigen':>6} {'solve':>6} {'write':>6} "
          f"{'iters':>5} {'peak GB':>8}")
    qualities = {}
    with tempfile.TemporaryDirectory(prefix="bench_denoise_") as tmp:
        for n_cells in args.sizes:
            workdir = Path(tmp) / f"n{n_cells}"
            run_child(["generate", str(n_cells), str(workdir)], args)
            result = run_child(["measure", str(workdir)], args)
            steps = result["timings"]
            print(f"{n_cells:>8} {result['seconds']:>8.1f} {result['cpu_seconds']:>6.1f} {steps['load']:>6.1f} "
                  f"{steps['graph']:>6.1f} {steps['eigen']:>6.1f} {steps['solve']:>6.1f} {steps['write']:>6.1f} {result['iterations']:>5} "
                  f"{result['peak_rss_gb']:>8.2f}", flush=True)
            qualities[n_cells] = selection_quality(workdir)
            shutil.rmtree(workdir)
    for n_cells, rows in qualities.items():
        print()
        print_quality(rows if n_cells == args.sizes[-1] else [r for r in rows if r["classes"] == "all classes"],
                      n_cells)
    if args.reference_size:
        speed = run_child(["reference", str(args.reference_size)], args)
        gap = abs(speed["fast_objective"] - speed["slow_objective"]) / speed["slow_objective"]
        print(f"\nslow reference vs fast path at {args.reference_size} cells (exact kNN in {args.dims} dims): "
              f"slow {speed['slow_seconds']:.1f} s, fast {speed['fast_seconds']:.1f} s, "
              f"ratio {speed['slow_seconds'] / speed['fast_seconds']:.0f}x; objective gap {100 * gap:.4f}%")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "?"
    print(f"load average at end {' '.join(load)} (2 cores shared with other work)")


if __name__ == "__main__":
    main()
