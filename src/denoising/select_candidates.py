"""Pick cells whose label the denoising says is missing, for a person to check and for cell-level training.

    python -m src.denoising.select_candidates --class "Mitotic spindle" [--rule reference]

A cell of a denoised fold is selected for CLASS when Y_init < INIT_BELOW (0.4) and Y_opt reaches the
fold's threshold. Default rule 'outliers': the median of Y_opt over the fold's low-labelled cells plus
4 robust standard deviations (1.4826 x their median absolute deviation), i.e. cells the denoising
lifted clear out of the bulk of the low-labelled cells (nearly all true negatives). Rule 'reference':
Y_opt >= DENOISED_AT_LEAST (0.92) * (max of Y_opt for CLASS over that fold); the maximum can sit on a
"hub" cell of very high degree, and on generated data this rule selected nothing where the ranking
was near perfect. 'outliers' selects nothing in a fold without a confident positive (Y_init >= 1 - INIT_BELOW).
--denoised-above X: Y_opt >= X. Writes the selection CSV
(ID,cell_i; default input/{slug}_cells_selection.csv) and a PNG grid of the selected cells: their
crops when a crop loader is wired in, else a Y_init/Y_opt scatter and a list of the selected cells.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np
import pandas as pd

from src.data.classes import CLASS_NAMES, class_index, class_slug
from src.data.schema import SELECTION_COLUMNS, OutputLayout, selection_csv
from src.utils.io import UserInputError, atomic_path, readable_h5, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)

# (image ID, cell_i) -> an (H, W, C) crop with channels in RGBY order, or None when not available.
CropLoader = Callable[[str, int], Optional[np.ndarray]]


RULES = ("outliers", "reference")
OUTLIER_ROBUST_SDS = 4.0  # the usual robust-z cut for an outlier; not fitted to any data set


def selection_threshold(initial: np.ndarray, denoised: np.ndarray, init_below: float = 0.4, rule: str = "outliers",
                        denoised_at_least: float = 0.92, denoised_above: float | None = None) -> float | None:
    """The Y_opt a low-labelled cell (Y_init < init_below) must reach to be selected; None = select nothing.

    - 'outliers' (default): median + OUTLIER_ROBUST_SDS x 1.4826 x MAD of Y_opt over the low-labelled
      cells (Y_init < init_below). Those are nearly all true negatives, so their median and MAD
      describe the negatives' denoised values whatever their scale; a missed positive is lifted by
      its positive neighbours far above that bulk. When the MAD is 0 (ties), the mean absolute
      deviation (x 1.2533) stands in; when that is 0 too, nothing is selected. Measured on generated
      sets (bench/bench_graph_denoising.py): >= 70% recall at >= 70% precision where the negatives'
      labels are skewed to 0 as network outputs are; it selects almost nothing when the negatives'
      labels spread evenly up to the low cut (their MAD then swamps the lift).
    - 'reference': Y_opt >= denoised_at_least * (max of Y_opt), the reference's rule.
    - denoised_above: an absolute threshold, used instead of either rule when given.
    """
    if rule not in RULES:
        raise UserInputError(f"unknown selection rule {rule!r}; choose one of {RULES}")
    if denoised_above is not None:
        return denoised_above
    if rule == "outliers":
        if not (initial >= 1.0 - init_below).any():
            log.warning("no confident positive (Y_init >= %.2f) in this fold: nothing to select", 1 - init_below)
            return None
        low = initial < init_below
        return _outlier_threshold(denoised[low]) if low.any() else None
    peak = float(np.max(denoised)) if len(denoised) else 0.0
    if not peak > 0:
        log.warning("denoised values of the class are all <= 0: nothing to select")
        return None
    return denoised_at_least * peak


def _outlier_threshold(low_denoised: np.ndarray) -> float | None:
    """median + OUTLIER_ROBUST_SDS robust standard deviations of the low-labelled cells' Y_opt."""
    median = float(np.median(low_denoised))
    spread = 1.4826 * float(np.median(np.abs(low_denoised - median)))
    if spread <= 0:
        spread = 1.2533 * float(np.mean(np.abs(low_denoised - median)))
    if spread <= 0:
        log.warning("denoised values of the low-labelled cells are all equal (%.3f): nothing to select", median)
        return None
    return median + OUTLIER_ROBUST_SDS * spread


def select_cells(initial: np.ndarray, denoised: np.ndarray, init_below: float = 0.4, rule: str = "outliers",
                 denoised_at_least: float = 0.92, denoised_above: float | None = None) -> np.ndarray:
    """Bool mask: initial < init_below and denoised >= selection_threshold(...) (see there)."""
    initial, denoised = np.asarray(initial), np.asarray(denoised)
    threshold = selection_threshold(initial, denoised, init_below, rule, denoised_at_least, denoised_above) \
        if len(denoised) else None
    if threshold is None:
        return np.zeros(len(denoised), dtype=bool)
    return (initial < init_below) & (denoised >= threshold)


def denoised_fold_paths(output_dir: str | os.PathLike, folds: list[int] | None) -> dict[int, Path]:
    """fold -> denoised HDF5, for the given folds or all fold{K}.h5 files present."""
    layout = OutputLayout(output_dir)
    if folds:
        paths = {fold: layout.denoised_h5(fold) for fold in folds}
        missing = [str(path) for path in paths.values() if not path.is_file()]
        if missing:
            raise UserInputError(f"denoised fold files not found: {', '.join(missing)} (run src.denoising.graph_denoising)")
        return paths
    folder = layout.denoised_h5(0).parent
    found = {}
    for path in sorted(folder.glob("fold*.h5")) if folder.is_dir() else []:
        match = re.fullmatch(r"fold(\d+)\.h5", path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise UserInputError(f"no denoised fold files in {folder} (run src.denoising.graph_denoising first)")
    return dict(sorted(found.items()))


def select_from_files(paths: dict[int, Path], class_i: int, init_below: float = 0.4, rule: str = "outliers",
                      denoised_at_least: float = 0.92,
                      denoised_above: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(selected, all cells) tables with columns ID, cell_i, fold, Y_init, Y_opt, Y_opt_fraction,
    threshold (each fold's own, see selection_threshold)."""
    tables = []
    for fold, path in paths.items():
        with readable_h5(path), h5py.File(path, "r") as h5:
            initial = h5["Y_init"][:, class_i]
            denoised = h5["Y_opt"][:, class_i]
            table = pd.DataFrame({"ID": h5["image_id"][:].astype(str), "cell_i": h5["cell_i"][:].astype(np.int64),
                                  "fold": fold, "Y_init": initial, "Y_opt": denoised})
        peak = float(denoised.max()) if len(denoised) else 0.0
        table["Y_opt_fraction"] = denoised / peak if peak > 0 else 0.0
        threshold = selection_threshold(initial, denoised, init_below, rule, denoised_at_least, denoised_above) \
            if len(denoised) else None
        table["threshold"] = np.nan if threshold is None else threshold
        table["selected"] = (initial < init_below) & (denoised >= threshold) if threshold is not None else False
        log.info("fold %d: %d of %d cells selected (Y_opt threshold %s, max Y_opt %.3f)", fold,
                 int(table["selected"].sum()), len(table), "none" if threshold is None else f"{threshold:.3f}", peak)
        tables.append(table)
    everything = pd.concat(tables, ignore_index=True)
    selected = everything[everything["selected"]].sort_values(["ID", "cell_i"]).reset_index(drop=True)
    return selected, everything


def _draw_rule_scatter(axis, selected: pd.DataFrame, everything: pd.DataFrame, init_below: float) -> None:
    """Y_init against Y_opt of all cells, selected ones in red, the thresholds (one per fold) in blue."""
    others = everything[~everything["selected"]]
    if len(others) > 20_000:
        others = others.sample(20_000, random_state=0)
    axis.scatter(others["Y_init"], others["Y_opt"], s=2, color="0.6", label="other cells")
    axis.scatter(selected["Y_init"], selected["Y_opt"], s=4, color="tab:red", label="selected")
    axis.axvline(init_below, color="tab:blue", linewidth=0.8)
    for threshold in everything["threshold"].dropna().unique():
        axis.axhline(threshold, color="tab:blue", linewidth=0.8)
    axis.set_xlabel("Y_init", fontsize=8)
    axis.set_ylabel("Y_opt", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=7, loc="lower right")


def plot_selection_grid(selected: pd.DataFrame, everything: pd.DataFrame, class_name: str,
                        path: str | os.PathLike, load_crop: CropLoader | None = None, max_tiles: int = 48,
                        init_below: float = 0.4) -> None:
    """Picture of the selection for a person to check, highest Y_opt fraction first.

    With a crop loader: a grid of up to max_tiles crops (R, G, B of the RGBY channels; a blank tile
    where the loader returns None), each titled ID/cell_i, Y_init and Y_opt, plus the rule's scatter.
    Without one: the rule's scatter and a list of the first max_tiles selected cells.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = selected.sort_values("Y_opt_fraction", ascending=False).head(max_tiles)
    title = f"{class_name}: {len(selected)} selected cells"
    if load_crop is None:
        figure, (scatter_axis, text_axis) = plt.subplots(1, 2, figsize=(13, max(5.0, 0.2 * len(shown) + 1.5)),
                                                         gridspec_kw={"width_ratios": [1, 1.1]})
        _draw_rule_scatter(scatter_axis, selected, everything, init_below)
        lines = [f"{'ID':<36} {'cell_i':>6} {'fold':>4} {'Y_init':>6} {'Y_opt':>6} {'/max':>5}"]
        lines += [f"{row.ID[:36]:<36} {row.cell_i:>6} {row.fold:>4} {row.Y_init:>6.2f} {row.Y_opt:>6.2f} "
                  f"{row.Y_opt_fraction:>5.2f}" for row in shown.itertuples(index=False)]
        text_axis.axis("off")
        text_axis.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=7, va="top", transform=text_axis.transAxes)
        figure.suptitle(f"{title} (no crops available; first {len(shown)} listed)", fontsize=10)
    else:
        n_panels = len(shown) + 1
        n_cols = min(8, n_panels)
        n_rows = int(np.ceil(n_panels / n_cols))
        figure, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.4 * n_rows + 0.4), squeeze=False)
        for axis in axes.ravel():
            axis.axis("off")
        for axis, row in zip(axes.ravel(), shown.itertuples(index=False)):
            crop = load_crop(row.ID, int(row.cell_i))
            if crop is not None:
                axis.imshow(np.asarray(crop)[..., :3] if np.ndim(crop) == 3 else np.asarray(crop))
            axis.set_title(f"{row.ID[:12]}/{row.cell_i}\ninit {row.Y_init:.2f} opt {row.Y_opt:.2f}", fontsize=7)
        scatter_axis = axes.ravel()[len(shown)]
        scatter_axis.axis("on")
        _draw_rule_scatter(scatter_axis, selected, everything, init_below)
        figure.suptitle(f"{title} ({len(shown)} shown)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--class", dest="class_name", required=True, help="class name or index, e.g. 'Mitotic spindle'")
    parser.add_argument("--init-below", type=float, default=0.4, help="Y_init must be below this (default: %(default)s)")
    parser.add_argument("--rule", choices=RULES, default="outliers",
                        help="outliers: Y_opt above the median + 4 robust SDs of the fold's low-labelled cells; "
                             "reference: Y_opt >= --denoised-at-least x the fold's class maximum (default: %(default)s)")
    parser.add_argument("--denoised-at-least", type=float, default=0.92,
                        help="with --rule reference: fraction of the fold's class maximum (default: %(default)s)")
    parser.add_argument("--denoised-above", type=float, default=None,
                        help="absolute Y_opt threshold used instead of --denoised-at-least")
    parser.add_argument("--folds", type=int, nargs="*", default=None, help="folds to read (default: all present)")
    parser.add_argument("--output-dir", default="output", help="pipeline output folder (default: %(default)s)")
    parser.add_argument("--input-dir", default="input", help="folder of the selection CSV (default: %(default)s)")
    parser.add_argument("--out", default=None, help="selection CSV (default: INPUT/{slug}_cells_selection.csv)")
    parser.add_argument("--grid-png", default=None,
                        help="image grid (default: OUTPUT/denoising/{slug}_selection_grid.png)")
    parser.add_argument("--max-tiles", type=int, default=48, help="cells shown in the grid")
    parser.add_argument("--dataset", default="input/synthetic",
                        help="dataset whose images give the grid's cell crops (with {output}/bboxes records)")
    parser.add_argument("--verbose", action="store_true")
    return parser


def run(args: argparse.Namespace, load_crop: CropLoader | None = None) -> pd.DataFrame:
    """Select, write the CSV and the grid; returns the selected table."""
    try:
        class_i = class_index(args.class_name)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    if not 0 < args.denoised_at_least <= 1:
        raise UserInputError("--denoised-at-least is a fraction of the class maximum: 0 < value <= 1")
    class_name = CLASS_NAMES[class_i]
    slug = class_slug(class_name)
    paths = denoised_fold_paths(args.output_dir, args.folds)
    selected, everything = select_from_files(paths, class_i, args.init_below, args.rule, args.denoised_at_least,
                                             args.denoised_above)
    out_csv = Path(args.out) if args.out else selection_csv(class_name, args.input_dir)
    write_csv_atomic(selected[list(SELECTION_COLUMNS)], out_csv)
    grid_png = Path(args.grid_png) if args.grid_png else OutputLayout(args.output_dir).denoised_h5(0).parent / \
        f"{slug}_selection_grid.png"
    if load_crop is None:
        log.info("no crop loader wired in: the grid shows titled tiles instead of cell crops")
    plot_selection_grid(selected, everything, class_name, grid_png, load_crop, args.max_tiles,
                        args.init_below)
    log.info("%s: %d cells selected from %d folds -> %s (grid %s)", class_name, len(selected), len(paths),
             out_csv, grid_png)
    return selected


def record_crop_loader(dataset: str | os.PathLike, output_dir: str | os.PathLike) -> CropLoader:
    """(ID, cell_i) -> RGB crop of the cell (others zeroed) from the train or public images, or None."""
    from src.data.bbox_records import masked_crop, read_record, record_path
    from src.data.cache import load_full_resolution
    from src.data.images import ImageReadError
    from src.data.schema import DatasetLayout

    layout, bboxes_dir = DatasetLayout(dataset), OutputLayout(output_dir).bboxes_dir

    def load(image_id: str, cell_i: int):
        for source in ("train", "public"):
            path = record_path(bboxes_dir, source, image_id)
            if path.is_file():
                try:
                    record = read_record(path, load_mask=False)  # a crop at the record's size needs no mask
                    field = load_full_resolution(layout, source, image_id, record.image_shape, mmap=True)
                    return masked_crop(field, record, cell_i)[..., :3]
                except (ImageReadError, ValueError, IndexError):
                    return None
        return None

    return load


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    has_records = OutputLayout(args.output_dir).bboxes_dir.is_dir() and Path(args.dataset).is_dir()
    run(args, record_crop_loader(args.dataset, args.output_dir) if has_records else None)
    return 0


if __name__ == "__main__":
    run_cli(main)
