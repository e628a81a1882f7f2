"""Graph-signal label denoising of the cells of one denoising fold (DESIGN.md, stage 8).

    python -m src.denoising.graph_denoising --fold 0 [--output-dir output] [--pca-dims 128]

Reads the pseudo-labels (output/pseudo_labels.h5) and the denoising folds (output/denoising_folds.csv),
builds the symmetrised kNN graph of the fold's embeddings, the smallest eigenpairs of its normalised
Laplacian, and solves for the denoised labels. Writes output/denoising/fold{K}.h5 (image_id, cell_i,
Y_init, Y_opt, eigenvalues; settings in its attributes), fold{K}_histograms.png and
fold{K}_{class}_before_after.png beside it.

Y_init = the 19 pseudo-labels, with --force-positive cells set to 1, plus a 20th column
"nothing there" = 1 - max of those 19. Cells without any graph neighbour (all-zero embeddings under
the cosine metric) keep Y_opt = Y_init; their number is logged.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd

from src.data.classes import CLASS_NAMES, NUM_CLASSES, class_index, class_slug
from src.data.schema import DENOISING_FOLDS_COLUMNS, SELECTION_COLUMNS, OutputLayout
from src.denoising import graph, graph_files, plots, solver, spectrum
from src.utils.io import UserInputError, atomic_path, readable_h5, run_cli, setup_logging

log = logging.getLogger(__name__)

LABEL_COLUMNS = list(CLASS_NAMES) + ["Nothing there"]


@dataclass
class FoldCells:
    image_ids: np.ndarray      # (N,) S64
    cell_indices: np.ndarray   # (N,) int32
    predictions: np.ndarray    # (N, 19) float32
    embeddings: "FoldRows"     # (N, D) rows read from the open HDF5 on demand


class FoldRows:
    """Row-sliceable view of `rows` (sorted) of an HDF5 dataset: [a:b] reads only the stretch of
    the file those rows span (or the rows themselves when they are sparse), so the fold's embeddings
    are streamed block by block instead of held in memory."""

    def __init__(self, dataset: h5py.Dataset, rows: np.ndarray, path: Path):
        self.dataset, self.rows, self.path = dataset, rows, path
        self.shape = (len(rows),) + dataset.shape[1:]
        self.dtype = dataset.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self.rows))
        wanted = self.rows[start:stop:step]
        if len(wanted) == 0:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)
        with readable_h5(self.path):
            if wanted[-1] - wanted[0] + 1 <= 4 * len(wanted):
                return self.dataset[wanted[0]:wanted[-1] + 1][wanted - wanted[0]]
            return self.dataset[wanted]


def read_fold_table(folds_csv: Path, fold: int) -> pd.DataFrame:
    """The (ID, cell_i) rows of one fold of the denoising folds CSV."""
    if not folds_csv.is_file():
        raise UserInputError(f"denoising folds {folds_csv} not found (run src.preprocessing.create_denoising_folds "
                             "or pass --denoising-folds)")
    table = pd.read_csv(folds_csv, dtype={"ID": str})
    missing = [c for c in DENOISING_FOLDS_COLUMNS if c not in table.columns]
    if missing:
        raise UserInputError(f"{folds_csv} lacks columns {missing}; expected {','.join(DENOISING_FOLDS_COLUMNS)}")
    chosen = table[table["fold"] == fold]
    if chosen.empty:
        raise UserInputError(f"fold {fold} not in {folds_csv}; folds there: {sorted(table['fold'].unique().tolist())}")
    return chosen[["ID", "cell_i"]].astype({"cell_i": np.int64})


@contextlib.contextmanager
def open_fold_cells(pseudo_labels_h5: Path, folds_csv: Path, fold: int) -> Iterator[FoldCells]:
    """Join the fold's (ID, cell_i) with the pseudo-label HDF5 (rows kept in HDF5 order); the file
    stays open while the context lasts so the embeddings can be streamed from it."""
    fold_table = read_fold_table(folds_csv, fold)
    if not pseudo_labels_h5.is_file():
        raise UserInputError(f"pseudo-labels {pseudo_labels_h5} not found (run "
                             "src.predict.predict_cells_from_image_level_densenet or pass --pseudo-labels)")
    with readable_h5(pseudo_labels_h5):
        h5 = h5py.File(pseudo_labels_h5, "r")
    try:
        with readable_h5(pseudo_labels_h5):
            absent = [name for name in ("image_id", "cell_i", "predictions", "embeddings") if name not in h5]
            if absent:
                raise UserInputError(f"{pseudo_labels_h5} lacks datasets {absent}")
            all_image_ids, all_cell_indices = h5["image_id"][:], h5["cell_i"][:]
            keys = pd.DataFrame({"ID": all_image_ids.astype(str), "cell_i": all_cell_indices.astype(np.int64)})
            n_rows = len(keys)
            if h5["predictions"].shape != (n_rows, NUM_CLASSES) or h5["embeddings"].ndim != 2 or \
                    h5["embeddings"].shape[0] != n_rows:
                raise UserInputError(f"{pseudo_labels_h5}: predictions {h5['predictions'].shape} / embeddings "
                                     f"{h5['embeddings'].shape} do not fit {n_rows} cells x {NUM_CLASSES} classes")
            if keys.duplicated().any():
                raise UserInputError(f"{pseudo_labels_h5} holds {int(keys.duplicated().sum())} repeated (ID, cell_i) rows")
            keys["row"] = np.arange(n_rows)
            joined = fold_table.merge(keys, on=["ID", "cell_i"], how="left")
            unmatched = joined["row"].isna()
            if unmatched.all():
                raise UserInputError(f"none of the {len(fold_table)} cells of fold {fold} are in {pseudo_labels_h5}; "
                                     "were both files made from the same bboxes?")
            if unmatched.any():
                log.warning("%d of %d cells of fold %d have no pseudo-labels and are left out (first: %s)",
                            int(unmatched.sum()), len(joined), fold, joined.loc[unmatched, ["ID", "cell_i"]].iloc[0].tolist())
            rows = np.unique(joined.loc[~unmatched, "row"].to_numpy(dtype=np.int64))
            predictions = FoldRows(h5["predictions"], rows, pseudo_labels_h5)[:].astype(np.float32)
            cells = FoldCells(all_image_ids[rows].astype("S64"), all_cell_indices[rows].astype(np.int32), predictions,
                              FoldRows(h5["embeddings"], rows, pseudo_labels_h5))
        bad = ~np.isfinite(predictions).all(axis=1)
        if bad.any():
            raise UserInputError(f"{int(bad.sum())} cells of fold {fold} have NaN/inf predictions "
                                 f"(first: {cells.image_ids[bad][0].decode()} cell {cells.cell_indices[bad][0]})")
        outside = int(((predictions < 0) | (predictions > 1)).any(axis=1).sum())
        if outside:
            log.warning("%d cells have predictions outside [0, 1]; they are clipped (probabilities expected)", outside)
        yield cells
    finally:
        h5.close()


def parse_forced(specs: list[str]) -> list[tuple[int, Path]]:
    """'Class name=path.csv' items -> (class index, path)."""
    parsed = []
    for spec in specs:
        name, sep, path = spec.partition("=")  # class names hold no '=', paths may
        if not sep or not name or not path:
            raise UserInputError(f"--force-positive {spec!r}: expected 'CLASS=path.csv'")
        try:
            parsed.append((class_index(name), Path(path)))
        except ValueError as error:
            raise UserInputError(f"--force-positive {spec!r}: {error}") from None
    return parsed


def initial_labels(predictions: np.ndarray, forced: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Y0 (N, 20) float32: predictions clipped to [0, 1], forced cells set to 1 per class, then the
    'nothing there' column 1 - max over the 19 (computed after forcing, so a forced cell has 0 there)."""
    labels = np.clip(predictions.astype(np.float32), 0.0, 1.0)
    for class_i, rows in (forced or {}).items():
        labels[rows, class_i] = 1.0
    nothing_there = 1.0 - labels.max(axis=1, keepdims=True)
    return np.concatenate([labels, nothing_there], axis=1)


def forced_rows(cells: FoldCells, forced: list[tuple[int, Path]]) -> dict[int, np.ndarray]:
    """For each forced class, the fold rows listed in its selection CSV (cells of other folds ignored)."""
    keys = pd.DataFrame({"ID": cells.image_ids.astype(str), "cell_i": cells.cell_indices.astype(np.int64),
                         "row": np.arange(len(cells.image_ids))})
    result: dict[int, np.ndarray] = {}
    for class_i, path in forced:
        if not path.is_file():
            raise UserInputError(f"forced-label CSV {path} not found")
        table = pd.read_csv(path, dtype={"ID": str})
        if any(c not in table.columns for c in SELECTION_COLUMNS):
            raise UserInputError(f"{path} must have columns {','.join(SELECTION_COLUMNS)}")
        matched = table.astype({"cell_i": np.int64}).merge(keys, on=["ID", "cell_i"])["row"].to_numpy()
        log.info("%s: %d of %d listed cells are in this fold and forced to 1", CLASS_NAMES[class_i],
                 len(matched), len(table))
        result[class_i] = np.union1d(result.get(class_i, np.array([], dtype=np.int64)), matched).astype(np.int64)
    return result


def write_denoised(path: Path, cells: FoldCells, initial: np.ndarray, denoised: np.ndarray,
                   eigenvalues: np.ndarray, attributes: dict) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("image_id", data=cells.image_ids.astype("S64"))
            h5.create_dataset("cell_i", data=cells.cell_indices.astype(np.int32))
            h5.create_dataset("Y_init", data=initial.astype(np.float32), compression="gzip", compression_opts=1)
            h5.create_dataset("Y_opt", data=denoised.astype(np.float32), compression="gzip", compression_opts=1)
            h5.create_dataset("eigenvalues", data=eigenvalues.astype(np.float32))
            h5.attrs["label_columns"] = np.array(LABEL_COLUMNS, dtype="S64")
            for key, value in attributes.items():
                h5.attrs[key] = value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", type=int, required=True, help="denoising fold to process")
    parser.add_argument("--output-dir", default="output", help="pipeline output folder (default: %(default)s)")
    parser.add_argument("--pseudo-labels", default=None, help="pseudo-label HDF5 (default: OUTPUT/pseudo_labels.h5)")
    parser.add_argument("--denoising-folds", default=None, help="folds CSV (default: OUTPUT/denoising_folds.csv)")
    parser.add_argument("-k", "--n-neighbors", "--num-graph-neighbours", type=int, default=200,
                        help="kNN graph neighbours, the cell itself counted as in the reference: k = 200 links "
                             "199 others (default: %(default)s)")
    parser.add_argument("--n-eigenvectors", "--num-eigenvectors", type=int, default=50,
                        help="Laplacian eigenpairs m (default: %(default)s)")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.001, help="spectral sparsity weight")
    parser.add_argument("--gamma", type=float, default=0.12, help="L1 fidelity weight to the initial labels")
    parser.add_argument("--tol-fraction", type=float, default=0.999,
                        help="stop when this fraction of label entries has settled (default: %(default)s)")
    parser.add_argument("--rel-change", type=float, default=0.01, help="relative change that counts as settled")
    parser.add_argument("--max-iter", type=int, default=1000, help="iteration cap of the alternation")
    parser.add_argument("--metric", choices=graph.METRICS, default="l2",
                        help="kNN distance: l2 on the raw embeddings as the reference, or cosine (default: %(default)s)")
    parser.add_argument("--pca-dims", type=int, default=None,
                        help="PCA dims before the kNN search (0 = off; default: off for the exact search; for the "
                             "approximate one the narrowest of 128/256/512 that keeps 95%% of the exact neighbours "
                             "of a sample of cells)")
    parser.add_argument("--knn-method", choices=graph.KNN_METHODS, default="auto",
                        help=f"exact (faiss flat), ivf (faiss inverted lists, approximate, recall logged) or auto: "
                             f"exact up to {graph.EXACT_MAX_CELLS} cells (default: %(default)s)")
    parser.add_argument("--eigen-tol", type=float, default=1e-6, help="Lanczos tolerance (default: %(default)s)")
    parser.add_argument("--num-cores", type=int, default=None,
                        help="CPU threads for the kNN search and linear algebra (default: all)")
    parser.add_argument("--precomputed-graph", "--precomputed-knn-graph-path", default=None,
                        help="npz: load the kNN graph if present, else save it (our format, not the reference's pickle)")
    parser.add_argument("--precomputed-eigenbasis", default=None, help="npz: load eigenpairs if present, else save")
    parser.add_argument("--force-positive", action="append", default=[], metavar="CLASS=CSV",
                        help="set Y_init of the listed cells (ID,cell_i CSV) to 1 for CLASS; repeatable")
    parser.add_argument("--plot-class", default="Mitotic spindle", help="class of the before/after figure")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the eigensolver start vector and samples")
    parser.add_argument("--verbose", action="store_true")
    return parser


def check_settings(args: argparse.Namespace) -> None:
    if args.n_neighbors < 1 or args.n_eigenvectors < 1 or args.max_iter < 1:
        raise UserInputError("--n-neighbors, --n-eigenvectors and --max-iter must be >= 1")
    if args.lam < 0 or args.gamma < 0 or not 0 < args.tol_fraction <= 1 or args.rel_change <= 0:
        raise UserInputError("need --lambda >= 0, --gamma >= 0, 0 < --tol-fraction <= 1, --rel-change > 0")


def denoise_fold(args: argparse.Namespace) -> dict:
    """Run the whole stage for args.fold; returns the seconds per step and the solver summary."""
    check_settings(args)
    try:
        plot_class = None if args.no_plots else class_index(args.plot_class)
    except ValueError as error:
        raise UserInputError(f"--plot-class: {error}") from None
    forced = parse_forced(args.force_positive)
    layout = OutputLayout(args.output_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    with open_fold_cells(Path(args.pseudo_labels or layout.pseudo_labels_h5),
                         Path(args.denoising_folds or layout.denoising_folds_csv), args.fold) as cells:
        initial = initial_labels(cells.predictions, forced_rows(cells, forced))
        log.info("fold %d: %d cells, %d-d embeddings", args.fold, len(initial), cells.embeddings.shape[1])
        timings["load"], clock = time.perf_counter() - clock, time.perf_counter()

        search: dict = {}
        settings = (f"k={args.n_neighbors};metric={args.metric};pca={args.pca_dims};knn={args.knn_method};"
                    f"seed={args.seed};self-counted")
        fingerprint = graph_files.cells_fingerprint(cells.image_ids, cells.cell_indices, settings)
        if args.precomputed_graph and Path(args.precomputed_graph).is_file():
            adjacency = graph_files.load_graph(args.precomputed_graph, fingerprint)
            log.info("loaded the kNN graph from %s", args.precomputed_graph)
        else:
            adjacency = graph.knn_graph(cells.embeddings, args.n_neighbors, args.metric, args.pca_dims,
                                        args.knn_method, args.seed, info=search)
            if args.precomputed_graph:
                graph_files.save_graph(args.precomputed_graph, adjacency, fingerprint)
        cells.embeddings = None
    timings["graph"], clock = time.perf_counter() - clock, time.perf_counter()

    isolated = np.diff(adjacency.indptr) == 0
    if isolated.any():
        log.warning("%d cells have no graph neighbour: their Y_opt is their Y_init", int(isolated.sum()))
    if args.precomputed_eigenbasis and Path(args.precomputed_eigenbasis).is_file():
        eigenvalues, vectors = graph_files.load_eigenbasis(args.precomputed_eigenbasis, fingerprint, args.n_eigenvectors)
        log.info("loaded %d eigenpairs from %s", args.n_eigenvectors, args.precomputed_eigenbasis)
    else:
        eigenvalues, vectors = spectrum.smallest_laplacian_eigenpairs(adjacency, args.n_eigenvectors,
                                                                      args.eigen_tol, args.seed,
                                                                      overwrite_adjacency=True)
        if args.precomputed_eigenbasis:
            graph_files.save_eigenbasis(args.precomputed_eigenbasis, eigenvalues, vectors, fingerprint)
    del adjacency
    timings["eigen"], clock = time.perf_counter() - clock, time.perf_counter()

    result = solver.denoise(vectors, eigenvalues, initial, args.lam, args.gamma, args.tol_fraction,
                            args.rel_change, args.max_iter, frozen_rows=isolated if isolated.any() else None)
    value = solver.objective(vectors, eigenvalues, result.coefficients, result.labels, initial, args.lam, args.gamma)
    timings["solve"], clock = time.perf_counter() - clock, time.perf_counter()

    out_path = layout.denoised_h5(args.fold)
    attributes = {"fold": args.fold, "k": args.n_neighbors, "m": args.n_eigenvectors, "lambda": args.lam,
                  "gamma": args.gamma, "metric": args.metric, "pca_dims": search.get("pca_dims", -1),
                  "knn_method": search.get("method", "loaded"), "knn_recall": search.get("full_recall", -1.0),
                  "knn_recall_searched_space": search.get("recall", -1.0),
                  "iterations": result.n_iter, "converged": result.converged, "objective": value,
                  "isolated_cells": int(isolated.sum()), "seed": args.seed}
    write_denoised(out_path, cells, initial, result.labels, eigenvalues, attributes)
    if plot_class is not None:
        plots.plot_histograms(initial, result.labels, LABEL_COLUMNS, out_path.with_name(f"fold{args.fold}_histograms.png"))
        plots.plot_before_after(initial[:, plot_class], result.labels[:, plot_class], vectors, CLASS_NAMES[plot_class],
                                out_path.with_name(f"fold{args.fold}_{class_slug(CLASS_NAMES[plot_class])}_before_after.png"),
                                args.seed)
    timings["write"] = time.perf_counter() - clock
    log.info("wrote %s (objective %.6g, %d iterations); seconds: %s", out_path, value, result.n_iter,
             ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items()))
    return {"timings": timings, "objective": value, "iterations": result.n_iter, "converged": result.converged,
            "output": str(out_path)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.num_cores is not None:
        if args.num_cores < 1:
            raise UserInputError("--num-cores must be >= 1")
        graph.faiss.omp_set_num_threads(args.num_cores)
        with spectrum.threadpool_limits(limits=args.num_cores):
            denoise_fold(args)
    else:
        denoise_fold(args)
    return 0


if __name__ == "__main__":
    run_cli(main)
