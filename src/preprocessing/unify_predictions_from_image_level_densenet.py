"""Merge the pseudo-label part files of all shards into the one HDF5, and draw its report.

    python -m src.preprocessing.unify_predictions_from_image_level_densenet [--output-dir output]

Writes `{output}/pseudo_labels.h5` (through a temporary name; the parts are removed after) and
`{output}/pseudo_labels_hist.png`: per class, the histogram of the cells' pseudo-label probabilities.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.data.classes import CLASS_NAMES  # noqa: E402
from src.data.schema import OutputLayout  # noqa: E402
from src.predict import pseudo_label_store as store  # noqa: E402
from src.utils.io import UserInputError, atomic_path, run_cli, setup_logging  # noqa: E402

log = logging.getLogger(__name__)


def plot_histograms(predictions: np.ndarray, path: Path) -> None:
    """One panel per class: histogram of the cells' probabilities (log count axis)."""
    figure, axes = plt.subplots(4, 5, figsize=(20, 13))
    bins = np.linspace(0, 1, 41)
    for cls, axis in enumerate(axes.flat):
        if cls >= predictions.shape[1]:
            axis.axis("off")
            continue
        axis.hist(predictions[:, cls].astype(np.float32), bins=bins, color="tab:green")
        axis.set_yscale("log")
        axis.set_title(f"{cls} {CLASS_NAMES[cls]}"[:34], fontsize=9)
    figure.suptitle(f"Pseudo-label probabilities of {len(predictions)} cells")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=80)
    plt.close(figure)


def unify_and_report(final_path: Path) -> int:
    n_cells = store.unify(final_path)
    with store.PseudoLabels(final_path) as labels:
        plot_histograms(labels.column("predictions"), final_path.with_name(final_path.stem + "_hist.png"))
        no_cells = sum(count == 0 for _, count in labels.image_index.values())
        log.info("%s: %d cells of %d images (%d of them with no cell)", final_path, n_cells,
                 len(labels.image_index), no_cells)
    return n_cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--out", default=None, help="final HDF5 (default: {output}/pseudo_labels.h5)")
    args = parser.parse_args(argv)
    setup_logging()
    final_path = Path(args.out) if args.out else OutputLayout(args.output_dir).pseudo_labels_h5
    if not final_path.is_file() and not store.parts_dir(final_path).is_dir():
        raise UserInputError(f"no pseudo-label parts at {store.parts_dir(final_path)}")
    n_cells = unify_and_report(final_path)
    print(f"{n_cells} cells in {final_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
