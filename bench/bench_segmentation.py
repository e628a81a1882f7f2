"""Seconds per 2048x2048 field and peak memory of cell-box generation, and the speed-up with 2 workers.

    python bench/bench_segmentation.py [--synthetic 4] [--copies 4] [--out output/bench/segmentation.json]

Fields: `--synthetic` generated 2048-px synthetic fields plus the three real HPA fields of
../shared/hpa_samples when present. 1) One child process reads, segments (classical backend), builds
and writes the record of each field in turn, timing each step, and reports its peak resident
set (VmHWM). 2) The CLI `generate_cell_bboxes` runs on the same fields repeated `--copies` times (so
there is enough work to share) with --workers 1 and then 2, fresh outputs each; speed-up = wall(1) /
wall(2), process start-up included. Other processes on the machine share the cores, so the numbers
are upper bounds for an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

CHANNELS = ("red", "green", "blue", "yellow")


def build_dataset(root: Path, n_synthetic: int, copies: int) -> tuple[list[str], str]:
    """Write a dataset folder of 2048-px fields (synthetic + HPA samples when present); returns the
    IDs of the distinct fields and a description."""
    import pandas as pd

    from src.data.make_synthetic import write_synthetic_dataset
    from src.data.synthetic import SyntheticConfig

    ids = []
    if n_synthetic:
        synthetic = write_synthetic_dataset(root / "synthetic", n_synthetic, 0, SyntheticConfig(image_size=2048), seed=5)
        ids += [(synthetic.image_dir("train"), image_id) for image_id in pd.read_csv(synthetic.train_csv)["ID"]]
    hpa = REPO_ROOT.parent / "shared" / "hpa_samples"
    n_hpa = 0
    if (hpa / "images").is_dir():
        hpa_ids = pd.read_csv(hpa / "train.csv")["ID"].tolist()
        ids += [(hpa / "images", image_id) for image_id in hpa_ids]
        n_hpa = len(hpa_ids)
    train = root / "bench" / "train"
    train.mkdir(parents=True)
    rows = []
    for copy in range(copies):
        for folder, image_id in ids:
            name = f"{image_id}-c{copy}"
            for channel in CHANNELS:
                os.symlink(Path(folder) / f"{image_id}_{channel}.png", train / f"{name}_{channel}.png")
            rows.append((name, "0"))
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(root / "bench" / "train.csv", index=False)
    return [row[0] for row in rows[:len(ids)]], f"{n_synthetic} synthetic + {n_hpa} HPA fields of 2048 px"


def child(dataset: Path, ids: list[str], out_dir: Path) -> None:
    """Time read / segment / record per field in this process; print JSON."""
    from src.data.bbox_records import build_record, write_record
    from src.data.images import read_field
    from src.segmentation import make_segmenter

    segmenter = make_segmenter("classical")
    times = {"read": [], "segment": [], "record": [], "total": []}
    for image_id in ids:
        start = time.perf_counter()
        field = read_field(dataset / "train", image_id)
        read = time.perf_counter()
        _, cells = segmenter.segment(field)
        segmented = time.perf_counter()
        write_record(out_dir / f"{image_id}.npz", build_record(image_id, cells))
        done = time.perf_counter()
        for key, value in (("read", read - start), ("segment", segmented - read), ("record", done - segmented),
                           ("total", done - start)):
            times[key].append(value)
    peak_mib = peak_rss_mib()
    sizes = [p.stat().st_size for p in out_dir.glob("*.npz")]
    print(json.dumps({"times": times, "peak_rss_mib": peak_mib, "record_kib_mean": statistics.mean(sizes) / 1024}))


def peak_rss_mib() -> float:
    """Peak resident memory of this process. VmHWM, because ru_maxrss survives execve on Linux and
    would report the (larger) parent that generated the fields."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cli(dataset: Path, output: Path, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the CLI and its workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "src.preprocessing.generate_cell_bboxes", "--dataset", str(dataset),
                    "--output-dir", str(output), "--workers", str(workers), "--no-progress"],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic 2048-px fields (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=4, help="repeat the fields for the worker runs")
    parser.add_argument("--out", default="output/bench/segmentation.json")
    parser.add_argument("--child", nargs=2, metavar=("DATASET", "OUT_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--ids", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.ids, Path(args.child[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_seg_") as tmp:
        tmp = Path(tmp)
        ids, description = build_dataset(tmp, args.synthetic, args.copies)
        dataset = tmp / "bench"
        (tmp / "records").mkdir()
        result = subprocess.run([sys.executable, __file__, "--child", str(dataset), str(tmp / "records"), "--ids", *ids],
                                check=True, capture_output=True, text=True)
        single = json.loads(result.stdout.strip().splitlines()[-1])
        n_jobs = len(ids) * args.copies
        wall, cpu = {}, {}
        for workers in (1, 2):
            shutil.rmtree(tmp / f"out{workers}", ignore_errors=True)
            wall[workers], cpu[workers] = run_cli(dataset, tmp / f"out{workers}", workers)
    mean = {key: statistics.mean(values) for key, values in single["times"].items()}
    report = {
        "fields": description, "cpu_count": os.cpu_count(),
        "seconds_per_field": {key: round(value, 3) for key, value in mean.items()},
        "seconds_per_field_max": round(max(single["times"]["total"]), 3),
        "peak_rss_mib_one_process": round(single["peak_rss_mib"], 1),
        "record_kib_mean": round(single["record_kib_mean"], 1),
        "cli_jobs": n_jobs,
        "cli_wall_seconds": {str(k): round(v, 2) for k, v in wall.items()},
        "cli_seconds_per_field": {str(k): round(v / n_jobs, 3) for k, v in wall.items()},
        "speedup_2_workers": round(wall[1] / wall[2], 2),
        # CPU seconds / wall seconds: how many cores the run actually got (2 workers on an idle
        # 2-core machine would get close to 2; less means other processes held the cores)
        "cli_cores_used": {str(k): round(cpu[k] / wall[k], 2) for k in wall},
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    out = REPO_ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
