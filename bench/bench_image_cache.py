"""Load speed of the decoded-image cache vs decoding the PNG channel files, on 2048x2048 fields, and
of one cell-level training input (masked crop at full resolution, resized) from non-square 16-bit
style-2 fields: decoded per sample vs read from the native-size cache (`cache_native/`).

    .venv/bin/python -m bench.bench_image_cache [--fields 4] [--rounds 3]

Both paths are timed side by side in one run, over the same fields, files warm in the page cache.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from src.data.bbox_records import build_record, masked_crop
from src.data.cache import cache_one, load_cached, load_full_resolution
from src.data.images import RGBY, read_field, write_channel
from src.data.schema import NATIVE, DatasetLayout
from src.data.synthetic import SyntheticConfig, make_field
from src.data.synthetic_style2 import Style2Config, make_field_style2
from src.predict.cell_inputs import cellwise_input

HPA_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "hpa_samples" / "images"


def best_seconds(function, ids, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for image_id in ids:
            function(image_id)
        times.append((time.perf_counter() - start) / len(ids))
    return min(times)


def report(title: str, image_dir: Path, ids: list[str], cache_dir: Path, rounds: int) -> None:
    for image_id in ids:
        cache_one(image_dir, image_id, cache_dir / "full" / f"{image_id}.npy", None)
        cache_one(image_dir, image_id, cache_dir / "1024" / f"{image_id}.npy", 1024)
    png_full = best_seconds(lambda i: read_field(image_dir, i), ids, rounds)
    png_1024 = best_seconds(lambda i: read_field(image_dir, i, size=1024), ids, rounds)
    npy_full = best_seconds(lambda i: load_cached(cache_dir / "full" / f"{i}.npy"), ids, rounds)
    npy_1024 = best_seconds(lambda i: load_cached(cache_dir / "1024" / f"{i}.npy"), ids, rounds)
    crop = best_seconds(lambda i: np.array(load_cached(cache_dir / "full" / f"{i}.npy", mmap=True)[512:768, 512:768]),
                        ids, rounds)
    print(f"{title}: {len(ids)} RGBY fields, best of {rounds} rounds, time per field")
    print(f"  PNG decode, full size         {png_full * 1e3:9.2f} ms")
    print(f"  PNG decode + resize to 1024   {png_1024 * 1e3:9.2f} ms")
    print(f"  cache .npy, full size         {npy_full * 1e3:9.2f} ms   ratio vs PNG: {png_full / npy_full:7.1f}x")
    print(f"  cache .npy, 1024              {npy_1024 * 1e3:9.2f} ms   ratio vs PNG+resize: {png_1024 / npy_1024:7.1f}x")
    print(f"  cache mmap 256x256 crop       {crop * 1e3:9.2f} ms   ratio vs PNG: {png_full / crop:7.1f}x")


def report_cell_inputs(root: Path, n_fields: int, rounds: int, cell_size: int = 64) -> None:
    """Per cell input: decode the field's four 16-bit PNGs (what train_cellwise did for a non-square
    field) vs a memory-mapped native-size cache, then the same crop and resize."""
    layout, rng = DatasetLayout(root), np.random.default_rng(1)
    records = {}
    for k in range(n_fields):
        field, cell_mask, _ = make_field_style2(rng, Style2Config())
        for c, name in enumerate(RGBY):
            write_channel(layout.image_dir("train") / f"s2_{k}_{name}.png", field[..., c])
        records[f"s2_{k}"] = build_record(f"s2_{k}", cell_mask)
    cells = [(image_id, cell_i) for image_id, record in records.items() for cell_i in range(record.n_cells)]

    def one_pass() -> float:
        start = time.perf_counter()
        for image_id, cell_i in cells:
            record = records[image_id]
            field = load_full_resolution(layout, "train", image_id, record.image_shape, mmap=True)
            cellwise_input(masked_crop(field, record, cell_i), cell_size)
        return (time.perf_counter() - start) / len(cells)

    decoded = min(one_pass() for _ in range(rounds))
    for image_id in records:
        cache_one(layout.image_dir("train"), image_id, layout.cache_path(NATIVE, image_id), NATIVE)
    cached = min(one_pass() for _ in range(rounds))
    print(f"style 2: {len(cells)} cells of {n_fields} non-square 16-bit fields, best of {rounds} rounds, time per "
          f"cell input ({cell_size} px)")
    print(f"  PNG decode per sample         {decoded * 1e3:9.3f} ms")
    print(f"  native cache, mmap            {cached * 1e3:9.3f} ms   ratio: {decoded / cached:7.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fields", type=int, default=4, help="synthetic fields")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048, help="side of the synthetic fields")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image_dir = Path(tmp) / "train"
        rng = np.random.default_rng(0)
        ids = [f"field{i}" for i in range(args.fields)]
        for image_id in ids:
            field, _, _ = make_field(rng, SyntheticConfig(image_size=args.size))
            for c, name in enumerate(RGBY):
                write_channel(image_dir / f"{image_id}_{name}.png", field[..., c])
        report_cell_inputs(Path(tmp) / "style2", args.fields, args.rounds)
        report(f"synthetic {args.size}px", image_dir, ids, Path(tmp) / "cache_synthetic", args.rounds)
        if HPA_SAMPLES.is_dir():
            real_ids = sorted({p.name.rsplit("_", 1)[0] for p in HPA_SAMPLES.glob("*_blue.png")})
            report("real HPA 2048px (../shared/hpa_samples)", HPA_SAMPLES, real_ids, Path(tmp) / "cache_real",
                   args.rounds)


if __name__ == "__main__":
    main()
