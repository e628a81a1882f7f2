"""Pseudo-label every cell with the out-of-fold image-level model; store predictions and embeddings.

    python -m src.predict.predict_cells_from_image_level_densenet --dataset input/synthetic \
        --run-name densenet121_1024_stage2 --img-size 1024 [--public-data] [--shard 0/3] [--fold-single 2]

For each image, the model of the fold that held the image out (folds.csv) predicts its cells: the
crop of the cell in the field at the model's input scale, other cells zeroed, tiled to the square
input, under the TTA views (identity, flip_v, flip_h, rot90 by default). Cells of many images are
batched together; DataLoader workers prepare them from the decoded-image cache (`cache_{img_size}`)
when present. Completed images are written in part files; a rerun skips them; without sharding the
parts are unified into `{output}/pseudo_labels.h5` at the end (else run
`python -m src.preprocessing.unify_predictions_from_image_level_densenet`).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.data.bbox_records import list_record_ids, read_record, record_path
from src.data.cache import load_field
from src.data.classes import NUM_CLASSES
from src.data.images import ImageReadError
from src.data.schema import DatasetLayout, OutputLayout
from src.predict import pseudo_label_store as store
from src.predict.cell_inputs import TTA_VIEWS, cell_inputs, predict_views
from src.preprocessing.bestfitting_duplicates_search import read_duplicates
from src.preprocessing.unify_predictions_from_image_level_densenet import unify_and_report
from src.train.datasets import read_folds
from src.train.models import load_model_checkpoint
from src.utils.io import UserInputError, run_cli, setup_logging

log = logging.getLogger(__name__)
CRASH_AFTER_PARTS_ENV = "HPA_TEST_CRASH_AFTER_PARTS"  # tests: die (os._exit) after writing this many parts


def out_of_fold_assignment(folds: pd.DataFrame, image_ids: list[str], duplicates: pd.DataFrame | None) -> dict[str, int]:
    """Fold whose model predicts each image: its own held-out fold; an image left out of the folds as
    a duplicate takes its twin's fold (the only model that never saw the twin); others fold 0."""
    fold_of = dict(zip(folds["ID"], folds["fold"].astype(int)))
    if duplicates is not None:
        for a, b in zip(duplicates["ID_a"], duplicates["ID_b"]):
            if a in fold_of and b not in fold_of:
                fold_of[b] = fold_of[a]
            elif b in fold_of and a not in fold_of:
                fold_of[a] = fold_of[b]
    return {image_id: fold_of.get(image_id, 0) for image_id in image_ids}


class ImageCells(Dataset):
    """One item per image: all its cells as model inputs (n, C, S, S) uint8, or an error string."""

    def __init__(self, layout: DatasetLayout, bboxes_dir: Path, items: list[tuple[str, str, int]], img_size: int):
        self.layout, self.bboxes_dir, self.items, self.img_size = layout, bboxes_dir, items, img_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        source, image_id, fold = self.items[index]
        item = {"source": source, "image_id": image_id, "fold": fold, "error": None}
        try:
            record = read_record(record_path(self.bboxes_dir, source, image_id))
            field = load_field(self.layout, source, image_id, self.img_size)
            item["inputs"] = torch.from_numpy(cell_inputs(field, record, self.img_size))
        except (ImageReadError, FileNotFoundError, ValueError) as error:
            item["error"] = str(error)
        return item


def predict_images(model: torch.nn.Module, loader, final_path: Path, shard_name: str, batch_size: int,
                   views: tuple[str, ...], device: torch.device, amp_dtype: torch.dtype | None,
                   cells_per_part: int, progress: tqdm | None = None) -> list[tuple[str, str]]:
    """Run the model over the loader's images, writing complete images to part files; returns failures."""
    failures, pending, pending_cells = [], [], 0
    crash_after = int(os.environ.get(CRASH_AFTER_PARTS_ENV, "0"))

    def flush() -> None:
        nonlocal pending, pending_cells
        if not pending:
            return
        with_cells = [item for item in pending if len(item["inputs"])]
        empty = [item["image_id"] for item in pending if not len(item["inputs"])]
        probabilities, embeddings = [torch.zeros(0, NUM_CLASSES)], [torch.zeros(0, 0)]
        if with_cells:
            inputs = torch.cat([item["inputs"] for item in with_cells])
            probabilities, embeddings = [], []
            for start in range(0, len(inputs), batch_size):
                batch = inputs[start:start + batch_size].to(device, non_blocking=True)
                p, e = predict_views(model, batch, views, amp_dtype)
                probabilities.append(p.cpu())
                embeddings.append(e.cpu())
        counts = [len(item["inputs"]) for item in with_cells]
        rows = store.CellRows(
            image_id=store.encode_ids(np.repeat([item["image_id"] for item in with_cells], counts)),
            cell_i=np.concatenate([np.arange(n, dtype=np.int32) for n in counts] or [np.zeros(0, np.int32)]),
            source=np.repeat([store.SOURCE_CODES[item["source"]] for item in with_cells], counts).astype(np.uint8),
            fold=np.repeat([item["fold"] for item in with_cells], counts).astype(np.int8),
            predictions=torch.cat(probabilities).numpy().astype(np.float16),
            embeddings=torch.cat(embeddings).numpy().astype(np.float16))
        store.write_part(final_path, shard_name, rows, empty)
        pending, pending_cells = [], 0
        if crash_after and len(list(store.parts_dir(final_path).glob(f"{shard_name}-*.h5"))) >= crash_after:
            os._exit(17)

    for item in loader:
        if progress is not None:
            progress.update(1)
        if item["error"]:
            log.warning("skipped %s: %s", item["image_id"], item["error"])
            failures.append((item["image_id"], item["error"]))
            continue
        pending.append(item)
        pending_cells += len(item["inputs"])
        if pending_cells >= cells_per_part:
            flush()
    flush()
    return failures


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        return rank, world
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserInputError(f"--shard must look like i/N, got {text!r}") from None
    if not 0 <= index < count:
        raise UserInputError(f"--shard {text}: need 0 <= i < N")
    return index, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--run-name", required=True, help="image-level run: models under {output}/models/{run-name}/fold{K}")
    parser.add_argument("--checkpoint", default="best.pth", help="checkpoint file name in each fold folder")
    parser.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=1024,
                        help="the image-level model's input side (px)")
    parser.add_argument("--public-data", action="store_true", help="also pseudo-label public images")
    parser.add_argument("--tta", default=",".join(TTA_VIEWS), help=f"comma-separated views of {TTA_VIEWS}")
    parser.add_argument("--batch-size", type=int, default=32, help="cells per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers preparing crops")
    parser.add_argument("--cells-per-part", type=int, default=2048, help="cells per part file (resume granularity)")
    parser.add_argument("--fold-single", type=int, default=None, help="only images of this fold (its model only)")
    parser.add_argument("--shard", default=None, help="i/N: this process handles every N-th image (default: torchrun rank)")
    parser.add_argument("--fold-one-fifth-number", type=int, choices=range(5), default=None,
                        help="the reference's name for --shard K/5 (one fifth of the images; strided, not contiguous)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--out", default=None, help="final HDF5 (default: {output}/pseudo_labels.h5)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.fold_one_fifth_number is not None:
        if args.shard is not None:
            raise UserInputError("give --shard or --fold-one-fifth-number, not both")
        args.shard = f"{args.fold_one_fifth_number}/5"
    layout, outputs = DatasetLayout(args.dataset), OutputLayout(args.output_dir)
    views = tuple(v.strip() for v in args.tta.split(",") if v.strip())
    if not views or set(views) - set(TTA_VIEWS):
        raise UserInputError(f"--tta must name views among {TTA_VIEWS}")
    folds = read_folds(layout)
    duplicates = read_duplicates(layout.duplicates_csv) if layout.duplicates_csv.is_file() else None
    final_path = Path(args.out) if args.out else outputs.pseudo_labels_h5
    items = []
    for source in ("train", "public") if args.public_data else ("train",):
        ids = list_record_ids(outputs.bboxes_dir / source)
        if not ids:
            raise UserInputError(f"no bbox records in {outputs.bboxes_dir / source}: run src.preprocessing.generate_cell_bboxes")
        fold_of = out_of_fold_assignment(folds, ids, duplicates)
        items += [(source, image_id, fold_of[image_id]) for image_id in ids]
    if args.fold_single is not None:
        items = [item for item in items if item[2] == args.fold_single]
    shard_index, shard_count = parse_shard(args.shard)
    items = sorted(items, key=lambda item: (item[2], item[0], item[1]))[shard_index::shard_count][:args.limit]
    done = store.committed_images(final_path)
    todo = [item for item in items if item[1] not in done]
    log.info("%d images for this shard, %d already done, %d to predict", len(items), len(items) - len(todo), len(todo))
    device = torch.device(args.device)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    failures, started = [], time.perf_counter()
    progress = tqdm(total=len(todo), desc="images")
    for fold in sorted({item[2] for item in todo}):
        checkpoint = outputs.model_dir(args.run_name, fold) / args.checkpoint
        if not checkpoint.is_file():
            raise UserInputError(f"{checkpoint} not found (fold {fold} model of run {args.run_name})")
        model = load_model_checkpoint(checkpoint, device)
        fold_items = [item for item in todo if item[2] == fold]
        loader = DataLoader(ImageCells(layout, outputs.bboxes_dir, fold_items, args.img_size), batch_size=None,
                            num_workers=args.workers, pin_memory=device.type == "cuda")
        failures += predict_images(model, loader, final_path, f"s{shard_index}of{shard_count}", args.batch_size,
                                   views, device, amp_dtype, args.cells_per_part, progress)
    progress.close()
    seconds = time.perf_counter() - started
    if failures:
        failed_csv = final_path.with_name(final_path.stem + f"_failed_s{shard_index}of{shard_count}.csv")
        pd.DataFrame(failures, columns=["ID", "error"]).to_csv(failed_csv, index=False)
        log.error("%d images failed; listed in %s", len(failures), failed_csv)
    if shard_count == 1 and args.fold_single is None:
        n_cells = unify_and_report(final_path)
        log.info("%d cells in %s (%.1f s)", n_cells, final_path, seconds)
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main)
