"""Cell-level DenseNet training on soft pseudo-labels (stage 9), on the image-level trainer.

    python -m src.train.train_cellwise --fold 0 --img_size 512 --batch_size 32 --gradient-accumulation-steps 4 \
        --scheduler Adam10 --epochs 5 --scheduler-lr-multiplier 4 --out_dir densenet121_512_cellwise \
        --load-state-dict-path output/models/<image-level run>/fold0/final.pth --loss FocalSymmetricHardLogLoss

Cells of images with folds.csv fold != --fold train, the others validate. Inputs: each cell's crop at
full resolution with other cells zeroed, thin crops tiled along the short side, padded to a square,
resized to --img_size, dihedral augmentation. Targets: the pseudo-label HDF5 probabilities, with the
cells of each --selection CSV (`ID,cell_i`, class from the file name or --selection-class) set to 1.
Validation: focal loss, accuracy in 0.05-wide bins and mAP with targets >= 0.5 as positives.
`--border-down-weight S`: each training cell's gradient is scaled by 1 - S x its border fraction
(the share of its outline on the field border, from the bbox record), for any loss: the exact
weighted loss for per-cell sums (focal, BCE, Lovasz); for the mined hard log losses, the selected
cells' terms are scaled. The logged loss stays unweighted; validation is not weighted.
Default schedule Adam20WarmUP, as the reference's train_cellwise. All other flags as in
src.train.train_bestfitting.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score
from torch.utils.data import Dataset

from src.data.bbox_records import border_weights, masked_crop, read_record, record_path
from src.data.cache import load_full_resolution
from src.data.classes import CLASS_NAMES, NUM_CLASSES, class_index, class_slug
from src.data.labels import labels_to_multihot, read_label_tables
from src.data.schema import DatasetLayout, OutputLayout
from src.predict import pseudo_label_store as store
from src.predict.cell_inputs import cellwise_input
from src.train import train_bestfitting as image_level
from src.train.datasets import SAMPLE_READ_ERRORS, SampleReadError, dihedral, dihedral_index, read_folds
from src.train.losses import get_loss
from src.train.metrics import image_level_metrics
from src.utils.io import UserInputError, run_cli

log = logging.getLogger("hpa.train")
SELECT_BY = {"binned-accuracy": ("val_binned_accuracy", "max"), "loss": ("val_focal_loss", "min"),
             "map": ("val_map", "max")}
SOURCE_NAMES = {code: name for name, code in store.SOURCE_CODES.items()}
AUTO_WEIGHT_FLOOR = 0.5  # --image-label-weight auto never goes below the demo's fixed weight
# Cell inputs are held in memory, computed once instead of every epoch, when all of a dataset's fit in
# this many bytes (the demo's ~1000 training cells at 64 px: 16 MB); larger sets are cut per item.
INPUT_MEMORY_BYTES = 2 << 30


def binned_accuracy(predictions: np.ndarray, targets: np.ndarray, width: float = 0.05) -> float:
    """Fraction of entries whose prediction falls in the target's bin [k*width, (k+1)*width); 1.0 is in the last bin."""
    bins = int(round(1 / width))
    predicted_bin = np.minimum(np.floor(predictions / width), bins - 1)
    target_bin = np.minimum(np.floor(targets / width), bins - 1)
    return float(np.mean(predicted_bin == target_bin))


def cell_level_metrics(logits: np.ndarray, targets: np.ndarray) -> dict:
    """The image-level metrics (focal loss, mAP with targets >= 0.5 as positives) plus binned accuracy."""
    probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return {**image_level_metrics()(logits, targets), "val_binned_accuracy": binned_accuracy(probabilities, targets)}


def soft_targets(predictions: np.ndarray, image_ids: np.ndarray, cell_indices: np.ndarray,
                 selections: list[tuple[int, pd.DataFrame]]) -> np.ndarray:
    """Pseudo-label probabilities (N, 19) with the selected cells set to 1 for their class."""
    targets = np.clip(predictions.astype(np.float32), 0, 1)
    row_of = {(image_id, int(cell_i)): row for row, (image_id, cell_i) in enumerate(zip(image_ids, cell_indices))}
    for cls, selection in selections:
        rows = [row_of[key] for key in zip(selection["ID"], selection["cell_i"].astype(int)) if key in row_of]
        if len(rows) < len(selection):
            log.warning("%d selected cells of class %d are not in the pseudo-labels", len(selection) - len(rows), cls)
        targets[rows, cls] = 1.0
    return targets


def broadcast_image_labels(image_ids: np.ndarray, label_table: pd.DataFrame) -> np.ndarray:
    """(N, 19) float32: the multi-hot label of each cell's image (0 for images not in the table)."""
    image_labels = dict(zip(label_table["ID"], labels_to_multihot(label_table["Label"].tolist()).astype(np.float32)))
    empty = np.zeros(NUM_CLASSES, np.float32)
    return np.stack([image_labels.get(i, empty) for i in image_ids]) if len(image_ids) else np.zeros((0, NUM_CLASSES), np.float32)


def blend_image_labels(targets: np.ndarray, image_ids: np.ndarray, label_table: pd.DataFrame,
                       weight: float) -> np.ndarray:
    """(1 - weight) * targets + weight * the multi-hot label of each cell's image (0 for unknown images)."""
    return ((1 - weight) * targets + weight * broadcast_image_labels(image_ids, label_table)).astype(np.float32)


def auto_image_label_weights(predictions: np.ndarray, image_ids: np.ndarray, label_table: pd.DataFrame,
                             floor: float = AUTO_WEIGHT_FLOOR) -> np.ndarray:
    """(classes,) image-label weights from how well the pseudo-labels find the image labels: per class,
    max(floor, 1 - AP) of the image's highest cell pseudo-label ranked against the (out-of-fold) image
    labels. Weak pseudo-labels (a short first stage) lean on the image labels; a class without
    labelled images keeps the floor. Needs no cell-level truth."""
    labels = dict(zip(label_table["ID"], labels_to_multihot(label_table["Label"].tolist())))
    frame = pd.DataFrame(predictions.astype(np.float64))
    frame["ID"] = image_ids
    per_image = frame.groupby("ID", sort=True).max()
    per_image = per_image[per_image.index.isin(list(labels))]
    truth = np.stack([labels[i] for i in per_image.index]) if len(per_image) else np.zeros((0, predictions.shape[1]))
    weights = np.full(predictions.shape[1], floor)
    for cls in range(predictions.shape[1]):
        if 0 < truth[:, cls].sum() < len(truth):
            weights[cls] = max(floor, 1.0 - average_precision_score(truth[:, cls], per_image[cls].to_numpy()))
    return weights


def upsampled_indices(targets: np.ndarray, factor: int) -> np.ndarray:
    """Row indices with cells positive (>= 0.5) for a minority class repeated `factor` times.

    A class is a minority when it has fewer positive cells than 1/19 of the most frequent class."""
    indices = np.arange(len(targets))
    if factor <= 1:
        return indices
    positives = targets >= 0.5
    counts = positives.sum(axis=0)
    minority = (counts > 0) & (counts < counts.max() / 19)
    rare_rows = np.flatnonzero(positives[:, minority].any(axis=1))
    return np.concatenate([indices] + [rare_rows] * (factor - 1))


class BorderWeightedLoss(torch.nn.Module):
    """`loss` on targets whose last column is a per-cell weight: each cell's logits pass on their
    gradient scaled by its weight (forward values unchanged), so any loss, mined or not, learns
    less from the cells it is told to trust less."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = targets[:, -1:]
        scaled = logits * weights + (logits * (1 - weights)).detach()
        return self.loss(scaled, targets[:, :-1])


class CellDataset(Dataset):
    """Cell crops as cell-level inputs; (image, target, index) for keys (index, epoch). With
    `border_down_weight` > 0 the target gains a last column, the cell's weight for BorderWeightedLoss.
    When all inputs fit in `memory_budget` bytes they are computed once, on construction."""

    def __init__(self, layout: DatasetLayout, bboxes_dir: Path, cells: pd.DataFrame, targets: np.ndarray,
                 img_size: int, augment: bool = False, seed: int = 0, in_channels: int = 4,
                 border_down_weight: float = 0.0, memory_budget: int = INPUT_MEMORY_BYTES):
        self.layout, self.bboxes_dir, self.img_size = layout, bboxes_dir, img_size
        self.augment, self.seed, self.in_channels = augment, seed, in_channels
        self.border_down_weight = border_down_weight
        self.ids, self.cell_i, self.sources = cells["ID"].tolist(), cells["cell_i"].tolist(), cells["source"].tolist()
        self.targets = targets.astype(np.float32)
        self._records: OrderedDict = OrderedDict()
        self._inputs: np.ndarray | None = None
        if 0 < len(self) * img_size * img_size * in_channels <= memory_budget:
            # built before the DataLoader forks its workers, which then share it
            started = time.time()
            self._inputs = np.stack([self._input(index) for index in range(len(self))])
            self._records.clear()
            log.info("%d cell inputs held in memory (%.0f MB, %.1f s)", len(self), self._inputs.nbytes / 1e6,
                     time.time() - started)

    def __len__(self) -> int:
        return len(self.ids)

    def _record(self, source: str, image_id: str):
        key = (source, image_id)
        if key not in self._records:
            # masked_crop at the record's own size needs only the alien indices, not the mask
            self._records[key] = read_record(record_path(self.bboxes_dir, source, image_id), load_mask=False)
            if len(self._records) > 64:
                self._records.popitem(last=False)
        return self._records[key]

    def _input(self, index: int) -> np.ndarray:
        """The un-augmented (S, S, C) input of cell `index`."""
        try:
            record = self._record(self.sources[index], self.ids[index])
            field = load_full_resolution(self.layout, self.sources[index], self.ids[index], record.image_shape,
                                         mmap=True)
        except SAMPLE_READ_ERRORS as error:
            raise SampleReadError(f"{self.sources[index]} image {self.ids[index]} (cell {self.cell_i[index]}): "
                                  f"{error}") from None
        return cellwise_input(masked_crop(field, record, self.cell_i[index]), self.img_size)[..., :self.in_channels]

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self._input(index) if self._inputs is None else self._inputs[index]
        if self.augment:
            image = dihedral(image, dihedral_index(self.seed, epoch, index))
        target = self.targets[index]
        if self.border_down_weight:
            fraction = self._record(self.sources[index], self.ids[index]).border_fractions[self.cell_i[index]]
            target = np.append(target, border_weights(fraction, self.border_down_weight)).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(target), index


def read_selections(paths: list[str], classes: list[str] | None) -> list[tuple[int, pd.DataFrame]]:
    """Each selection CSV with its class: from --selection-class (same order) or the file name
    ('mitotic_cells_selection.csv' -> Mitotic spindle)."""
    selections = []
    for k, path in enumerate(paths):
        if not Path(path).is_file():
            raise UserInputError(f"selection file {path} not found")
        if classes:
            cls = class_index(classes[k])
        else:
            stem = Path(path).name.split("_")[0]
            matches = [i for i, name in enumerate(CLASS_NAMES) if class_slug(name) == stem]
            if len(matches) != 1:
                raise UserInputError(f"cannot tell the class of {path}; pass --selection-class")
            cls = matches[0]
        selections.append((cls, pd.read_csv(path, dtype={"ID": str})))
    return selections


def cell_targets(layout: DatasetLayout, outputs: OutputLayout, labels_path: str | None, selection: list[str],
                 selection_class: list[str] | None, image_label_weight: str,
                 public_data: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """Cells (ID, cell_i, source) of the pseudo-label store and their (N, 19) training targets: the
    pseudo-labels, selected cells set to 1, blended with the image labels by `image_label_weight` (a
    number in [0, 1] or 'auto'). Shared by the cell-level CNN and the cell feature model."""
    labels_path = Path(labels_path or outputs.pseudo_labels_h5)
    if not labels_path.is_file():
        raise UserInputError(f"{labels_path} not found: run src.predict.predict_cells_from_image_level_densenet")
    if image_label_weight != "auto":
        try:
            weight = float(image_label_weight)
        except ValueError:
            raise UserInputError("--image-label-weight must be a number in [0, 1] or 'auto'") from None
        if not 0 <= weight <= 1:
            raise UserInputError("--image-label-weight must be in [0, 1]")
    with store.PseudoLabels(labels_path) as pseudo:
        image_ids = np.array([i.decode() for i in pseudo.column("image_id")])
        cell_indices = pseudo.column("cell_i")
        sources = [SOURCE_NAMES[int(code)] for code in pseudo.column("source")]
        targets = soft_targets(pseudo.column("predictions"), image_ids, cell_indices,
                               read_selections(selection, selection_class))
    if image_label_weight == "auto" or weight:
        table = read_label_tables(layout.train_csv, layout.public_csv if public_data else None)
        if image_label_weight == "auto":
            weight = auto_image_label_weights(targets, image_ids, table)
            log.info("image-label weights: %s", " ".join(f"{w:.2f}" for w in weight))
        targets = blend_image_labels(targets, image_ids, table, weight)
    return pd.DataFrame({"ID": image_ids, "cell_i": cell_indices, "source": sources}), targets


def parse_args(argv=None):
    parser = image_level.build_parser(__doc__, SELECT_BY, "binned-accuracy")
    parser.set_defaults(img_size=512, batch_size=32, gradient_accumulation_steps=4, epochs=5,
                        loss="FocalSymmetricHardLogLoss", scheduler="Adam20WarmUP")
    parser.add_argument("--cell-level-labels-path", default=None,
                        help="pseudo-label HDF5 (default: {output}/pseudo_labels.h5)")
    parser.add_argument("--selection", action="append", default=[], help="selection CSV (ID,cell_i); repeatable")
    parser.add_argument("--selection-class", action="append", default=None, help="class of each --selection")
    parser.add_argument("--image-label-weight", default="0",
                        help="blend: target = (1 - w) * pseudo-label + w * the image's label (0: the reference); "
                             "'auto': per class max(0.5, 1 - image-level AP of the pseudo-labels)")
    parser.add_argument("--upsample-minorities", type=int, default=0,
                        help="repeat cells of minority classes this many times (0: off)")
    parser.add_argument("--border-down-weight", type=float, default=0.0,
                        help="scale each training cell's gradient by 1 - this x its border fraction (0: off)")
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = f"cellwise_{args.arch}_{args.img_size}__gradaccum_{args.gradient_accumulation_steps}"
    if not 0 <= args.border_down_weight <= 1:
        raise UserInputError("--border-down-weight must be in [0, 1]")
    return image_level.finish_args(args)


def main(argv=None) -> int:
    return image_level.run_main(parse_args(argv), train)


def train(args, device: torch.device, dist_info) -> int:
    image_level.prepare_run(args, device)
    layout, outputs = DatasetLayout(args.dataset), OutputLayout(args.output)
    folds = read_folds(layout)
    cells, targets = cell_targets(layout, outputs, args.cell_level_labels_path, args.selection, args.selection_class,
                                  args.image_label_weight, args.public_data)
    fold_of = dict(zip(folds["ID"], folds["fold"]))
    cell_fold = cells["ID"].map(fold_of).fillna(-1).astype(int).to_numpy()
    train_rows = upsampled_indices(targets[cell_fold != args.fold], args.upsample_minorities)
    train_rows = np.flatnonzero(cell_fold != args.fold)[train_rows]
    valid_rows = np.flatnonzero(cell_fold == args.fold)
    if len(valid_rows) == 0 or len(train_rows) == 0:
        raise UserInputError(f"fold {args.fold}: {len(train_rows)} training and {len(valid_rows)} validation cells")
    log.info("fold %d: %d training cells (after upsampling), %d validation cells at %d px", args.fold,
             len(train_rows), len(valid_rows), args.img_size)
    make = lambda rows, training: CellDataset(  # noqa: E731
        layout, outputs.bboxes_dir, cells.iloc[rows].reset_index(drop=True), targets[rows], args.img_size, training,
        args.seed, args.in_channels, args.border_down_weight if training else 0.0)
    loss = BorderWeightedLoss(get_loss(args.loss)) if args.border_down_weight else None
    return image_level.run_training(args, device, dist_info, make(train_rows, True), make(valid_rows, False),
                                    cell_level_metrics, *SELECT_BY[args.select_by], loss_fn=loss)


if __name__ == "__main__":
    run_cli(main)
