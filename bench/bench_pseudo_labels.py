"""Pseudo-labelling throughput: the full stage vs a bare model forward on the same crops in memory.

    .venv/bin/python -m bench.bench_pseudo_labels [--arch densenet121] [--img-size 128] [--images 48]

Full stage = DataLoader workers reading records and cached fields, crops, 4 TTA views, part files
and the final unify. Bare = the same model and views over the same inputs already in memory.
Also prints the HDF5 size against its raw array payload.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import torch

from src.data.bbox_records import build_record, read_record, record_path, write_record
from src.data.cache import load_field
from src.data.labels import read_label_table
from src.data.make_synthetic import write_synthetic_dataset
from src.data.schema import OutputLayout
from src.data.synthetic import SyntheticConfig
from src.predict import pseudo_label_store as store
from src.predict.cell_inputs import TTA_VIEWS, cell_inputs, predict_views
from src.predict.predict_cells_from_image_level_densenet import main as predict_main
from src.preprocessing.cache_images import cache_dataset
from src.preprocessing.create_imagelevel_folds import assign_folds
from src.train.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=48, help="fields (fixed start-up costs need a few hundred cells to amortise)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        layout = write_synthetic_dataset(Path(tmp) / "data", args.images, 0, SyntheticConfig(image_size=256), seed=0)
        table = read_label_table(layout.train_csv)
        assign_folds(table, 5, seed=0).to_csv(layout.folds_csv, index=False)
        cache_dataset(layout, "train", args.img_size)
        outputs = OutputLayout(Path(tmp) / "output")
        for image_id in table["ID"]:
            mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
            write_record(record_path(outputs.bboxes_dir, "train", image_id), build_record(image_id, mask))
        model = build_model(args.arch).eval()
        for fold in range(5):
            path = outputs.model_dir("bench", fold) / "best.pth"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "model_config": model.config()}, path)
        inputs = torch.cat([torch.from_numpy(cell_inputs(load_field(layout, "train", i, args.img_size),
                                                         read_record(record_path(outputs.bboxes_dir, "train", i)),
                                                         args.img_size)) for i in table["ID"]])
        n_cells = len(inputs)

        def bare() -> float:
            start = time.perf_counter()
            for first in range(0, n_cells, args.batch_size):
                predict_views(model, inputs[first:first + args.batch_size], TTA_VIEWS)
            return time.perf_counter() - start

        def stage(round_index: int) -> float:
            out = Path(tmp) / f"run{round_index}.h5"
            start = time.perf_counter()
            predict_main(["--dataset", str(layout.root), "--output-dir", str(outputs.root), "--run-name", "bench",
                          "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
                          "--workers", str(args.workers), "--out", str(out)])
            return time.perf_counter() - start

        bare_times, stage_times = [], []
        for round_index in range(2):  # interleaved, best of two
            bare_times.append(bare())
            stage_times.append(stage(round_index))
        payload = n_cells * (64 + 4 + 1 + 1 + 19 * 2 + model.embedding_dim * 2)
        size = (Path(tmp) / "run0.h5").stat().st_size
        with store.PseudoLabels(Path(tmp) / "run0.h5") as labels:
            assert len(labels) == n_cells
    bare_rate, stage_rate = n_cells / min(bare_times), n_cells / min(stage_times)
    print(f"{args.arch} at {args.img_size} px, {n_cells} cells of {args.images} fields, {len(TTA_VIEWS)} TTA views, "
          f"batch {args.batch_size}, {args.workers} loader worker(s)")
    print(f"  bare forward on in-memory crops: {bare_rate:8.2f} cells/s")
    print(f"  full stage (load, crop, predict, write, unify): {stage_rate:8.2f} cells/s")
    print(f"  ratio full/bare: {stage_rate / bare_rate:.3f}")
    print(f"  HDF5 {size / 1e6:.3f} MB vs raw payload {payload / 1e6:.3f} MB: {size / payload:.3f}x")


if __name__ == "__main__":
    main()
