"""Time of the cell feature model's descriptors against the cell-level CNN, per cell, on real HPA fields.

    .venv/bin/python -m bench.bench_cell_features [--cell-size 256] [--arch densenet121] [--rounds 2]

On the 2048-px fields of ../shared/hpa_samples with their HPA-model cell masks, side by side in one
run: `record_features` for every cell, and the CNN's work for the same cells (masked crop, resize to
--cell-size, one forward pass, identity view, batches of 8; random weights, same cost as trained
ones). Prints ms per cell for both and their ratio, and checks that every descriptor is finite.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from src.data.bbox_records import build_record, masked_crop
from src.data.images import read_field
from src.features.cell_features import N_FEATURES, record_features
from src.predict.cell_inputs import cellwise_input
from src.train.models import ARCHS, build_model

HPA_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "hpa_samples"


def cnn_seconds(model: torch.nn.Module, field: np.ndarray, record, size: int, batch: int = 8) -> float:
    start = time.perf_counter()
    inputs = np.stack([cellwise_input(masked_crop(field, record, i), size).transpose(2, 0, 1)
                       for i in range(record.n_cells)])
    with torch.no_grad():
        for first in range(0, len(inputs), batch):
            model(torch.from_numpy(inputs[first:first + batch]))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell-size", type=int, default=256, help="CNN input side (the reference: 512)")
    parser.add_argument("--arch", default="densenet121", choices=sorted(ARCHS))
    parser.add_argument("--rounds", type=int, default=2, help="best of this many rounds")
    args = parser.parse_args(argv)
    ids = sorted(p.name.split("_")[0] for p in (HPA_SAMPLES / "masks").glob("*_predictedmask.png"))
    if not ids:
        raise SystemExit(f"no HPA sample masks under {HPA_SAMPLES}")
    torch.set_num_threads(2)
    model = build_model(args.arch).eval()
    total_cells, feature_s, cnn_s = 0, 0.0, 0.0
    for image_id in ids:
        field = read_field(HPA_SAMPLES / "images", image_id)
        mask = cv2.imread(str(HPA_SAMPLES / "masks" / f"{image_id}_predictedmask.png"), cv2.IMREAD_UNCHANGED)
        record = build_record(image_id, mask.astype(np.int32))
        best_features, best_cnn = float("inf"), float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            rows = record_features(field, record)
            best_features = min(best_features, time.perf_counter() - start)
            best_cnn = min(best_cnn, cnn_seconds(model, field, record, args.cell_size))
        if rows.shape != (record.n_cells, N_FEATURES) or not np.isfinite(rows).all():
            raise SystemExit(f"{image_id}: descriptors not finite or of the wrong shape {rows.shape}")
        print(f"{image_id}: {record.n_cells} cells, descriptors {1000 * best_features / record.n_cells:.1f} ms/cell, "
              f"CNN {1000 * best_cnn / record.n_cells:.1f} ms/cell")
        total_cells, feature_s, cnn_s = total_cells + record.n_cells, feature_s + best_features, cnn_s + best_cnn
    print(f"all {len(ids)} fields, {total_cells} cells: descriptors {1000 * feature_s / total_cells:.1f} ms/cell, "
          f"{args.arch} at {args.cell_size} px {1000 * cnn_s / total_cells:.1f} ms/cell; "
          f"descriptors / CNN = {feature_s / cnn_s:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
