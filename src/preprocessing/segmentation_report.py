"""Pictures of the segmentation and, where reference masks exist, how well it matches them.

    python -m src.preprocessing.segmentation_report --dataset input/synthetic --limit 8
    python -m src.preprocessing.segmentation_report --dataset ../shared/hpa_samples \\
        --image-dir ../shared/hpa_samples/images --reference-masks ../shared/hpa_samples/masks

Per image: `{output}/segmentation_report/{source}/{ID}.png` (HPA-style composite with cell
outlines and cell_i numbers, nuclei outlines, reference outlines in magenta) and, when a reference
mask exists (`--reference-masks DIR` with `{ID}_predictedmask.png` or `{ID}.png`, else the
dataset's synthetic truth `truth/masks/{ID}.png`; one channel of labels, or a colour label image:
identical channels are read as one, else each colour is a cell), a row of `match_stats.csv`:
reference cells, predicted cells, reference cells matched at IoU >= 0.6, their fraction, the mean
best IoU of the reference cells, and predicted cells matching nothing ("spurious"). The last row,
ID "ALL", pools the cells of every image. Masks are segmented afresh unless `--from-records` (then the stored
records are shown, without nuclei).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from skimage.measure import label as label_components

from src.data.bbox_records import RecordError, read_record, record_path
from src.data.images import ImageReadError, read_field
from src.data.schema import DatasetLayout, OutputLayout
from src.data.labels import source_image_ids
from src.segmentation import BACKENDS, checked_segmenter
from src.segmentation.matching import match_masks
from src.segmentation.overlay import overlay
from src.utils.io import UserInputError, atomic_path, run_cli, setup_logging, write_csv_atomic

log = logging.getLogger(__name__)
MIN_MEAN_CELL_AREA = 16  # px: a colour image whose colour regions average less is a picture, not labels
STATS_COLUMNS = ("ID", "n_reference", "n_predicted", "matched", "match_rate", "mean_iou", "spurious", "spurious_rate")


def find_reference_mask(image_id: str, reference_dir: Path | None, layout: DatasetLayout) -> Path | None:
    candidates = [reference_dir / f"{image_id}_predictedmask.png", reference_dir / f"{image_id}.png"] \
        if reference_dir is not None else [layout.truth_mask_path(image_id)]
    return next((path for path in candidates if path.is_file()), None)


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """uint16 label mask of `shape` from a PNG (resized with nearest neighbour when it differs)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ImageReadError(path, "unreadable reference mask")
    mask = decode_labels(mask, path)
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask


def decode_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """A decoded PNG -> uint16 labels. One channel: the labels. Several (alpha ignored): identical
    colour channels are one channel of labels; otherwise each colour other than black is a cell,
    split into its 8-connected parts (palettes that reuse a colour for cells far apart). A colour
    image that does not look like labels (more parts than uint16 holds, or parts averaging under
    MIN_MEAN_CELL_AREA px: an overlay or a photograph) is refused with one line."""
    if mask.ndim == 2:
        return mask.astype(np.uint16)
    colour = mask[..., :3]
    if (colour == colour[..., :1]).all():
        return colour[..., 0].astype(np.uint16)
    wide = colour.astype(np.int64)
    packed = wide[..., 0] | wide[..., 1] << 16 | wide[..., 2] << 32  # 8- or 16-bit channels
    values, colour_ids = np.unique(packed.ravel(), return_inverse=True)
    colour_ids = colour_ids.reshape(packed.shape) + (0 if values[0] == 0 else 1)  # black -> 0
    labels = label_components(colour_ids, background=0, connectivity=2)
    n_cells = int(labels.max())
    if n_cells > np.iinfo(np.uint16).max or np.count_nonzero(labels) < MIN_MEAN_CELL_AREA * n_cells:
        raise UserInputError(f"reference mask {path} is a colour image of {len(values)} colours that does not read "
                             f"as cell labels ({n_cells} regions averaging {np.count_nonzero(labels) / n_cells:.1f} px); "
                             "give a one-channel label PNG")
    return labels.astype(np.uint16)


def stats_row(image_id: str, reference: np.ndarray, cells: np.ndarray, threshold: float) -> dict:
    stats = match_masks(reference, cells, threshold)
    return dict(ID=image_id, n_reference=stats.n_reference, n_predicted=stats.n_predicted, matched=stats.matched,
                match_rate=round(stats.match_rate, 4), mean_iou=round(stats.mean_iou, 4),
                spurious=stats.unmatched_predicted, spurious_rate=round(stats.spurious_rate, 4), _iou_sum=stats.mean_iou * stats.n_reference)


def pooled_row(rows: list[dict]) -> dict:
    total = {key: sum(row[key] for row in rows) for key in ("n_reference", "n_predicted", "matched", "spurious", "_iou_sum")}
    return dict(ID="ALL", n_reference=total["n_reference"], n_predicted=total["n_predicted"], matched=total["matched"],
                match_rate=round(total["matched"] / max(total["n_reference"], 1), 4),
                mean_iou=round(total["_iou_sum"] / max(total["n_reference"], 1), 4), spurious=total["spurious"],
                spurious_rate=round(total["spurious"] / max(total["n_predicted"], 1), 4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("--source", choices=("train", "public", "test"), default="train")
    parser.add_argument("--image-dir", help="channel files folder (default: the dataset's folder of --source)")
    parser.add_argument("--reference-masks", help="folder of reference masks {ID}_predictedmask.png or {ID}.png")
    parser.add_argument("--ids", nargs="+", help="image IDs (default: the source's table)")
    parser.add_argument("--limit", type=int, help="only the first N images (default: all)")
    parser.add_argument("--output-dir", default="output", help="output folder (default: %(default)s)")
    parser.add_argument("--from-records", action="store_true", help="show the stored bbox records instead of segmenting")
    parser.add_argument("--backend", choices=BACKENDS, default="classical")
    parser.add_argument("--nuclei-model")
    parser.add_argument("--cell-model")
    parser.add_argument("--work-size", type=int, default=512)
    parser.add_argument("--iou", type=float, default=0.6, help="IoU for a match (default: %(default)s)")
    parser.add_argument("--png-size", type=int, default=1024, help="long side of the pictures in px")
    args = parser.parse_args(argv)
    setup_logging()
    layout = DatasetLayout(args.dataset)
    image_dir = Path(args.image_dir) if args.image_dir else layout.image_dir(args.source)
    reference_dir = Path(args.reference_masks) if args.reference_masks else None
    if not image_dir.is_dir():
        raise UserInputError(f"image folder {image_dir} not found")
    if args.limit is not None and args.limit < 1:
        raise UserInputError("--limit must be >= 1")
    if reference_dir is not None and not reference_dir.is_dir():
        raise UserInputError(f"reference mask folder {reference_dir} not found")
    ids = args.ids or source_image_ids(layout, args.source)
    ids = ids[:args.limit]
    segmenter = None if args.from_records else checked_segmenter(
        args.backend, work_size=args.work_size, nuclei_model=args.nuclei_model, cell_model=args.cell_model)
    out_dir = OutputLayout(args.output_dir).root / "segmentation_report" / args.source
    rows, failures = [], 0
    for image_id in ids:
        try:
            field = read_field(image_dir, image_id)
        except ImageReadError as error:
            log.warning("skipped %s", error)
            failures += 1
            continue
        if segmenter is None:
            path = record_path(OutputLayout(args.output_dir).bboxes_dir, args.source, image_id)
            try:
                nuclei, cells = None, read_record(path).cell_mask
            except RecordError as error:  # a damaged record: one line, as in the other stages
                raise UserInputError(f"{error}; delete it and rerun src.preprocessing.generate_cell_bboxes") from None
        else:
            nuclei, cells = segmenter.segment(field)
        reference_path = find_reference_mask(image_id, reference_dir, layout)
        reference = read_mask(reference_path, field.shape[:2]) if reference_path else None
        with atomic_path(out_dir / f"{image_id}.png") as tmp:
            cv2.imwrite(str(tmp), overlay(field, cells, nuclei, reference, args.png_size)[..., ::-1])
        if reference is not None:
            rows.append(stats_row(image_id, reference, cells, args.iou))
            log.log(logging.INFO if len(ids) <= 10 else logging.DEBUG, "%s: %d/%d reference cells matched at IoU >= %g, mean IoU %.3f, %d predicted, %d spurious",
                     image_id, rows[-1]["matched"], rows[-1]["n_reference"], args.iou, rows[-1]["mean_iou"],
                     rows[-1]["n_predicted"], rows[-1]["spurious"])
    if rows:
        table = pd.DataFrame(rows + [pooled_row(rows)])[list(STATS_COLUMNS)]
        write_csv_atomic(table, out_dir / "match_stats.csv")
        print(table.tail(1).to_string(index=False))
    log.info("pictures in %s", out_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main)
