"""Both segmentation backends side by side on 2048-px fields: seconds per field, match rate against
reference masks, peak memory; the hpacellseg backend's batched vs one-field speed-up; the CLI with
1 vs 2 workers.

    python bench/bench_segmentation.py [--synthetic 4] [--copies 4] [--batch-size 4] [--out output/bench/segmentation.json]

Fields: `--synthetic` generated 2048-px synthetic fields (reference: their truth masks) plus the
three real HPA fields of ../shared/hpa_samples when present (reference: the HPA model's masks).
Each backend runs in its own child process (so peak resident memory, VmHWM, is its own):
- classical: read, segment, build and write the record of each field in turn, timed per step;
  match rate = reference cells matched at IoU >= 0.6, pooled per data source;
- hpacellseg on TorchScript stand-ins of the published U-Nets (`--stand-in-width`; no published
  weights here, so speed only: the network's cost differs from the real DPN U-Nets, the
  pre-processing and label_cell post-processing are the real ones): the fields one at a time
  (batch 1), then `--batch-size` fields per forward pass; speed-up = one-field / batched time.
Then the CLI `generate_cell_bboxes` (classical) runs on the fields repeated `--copies` times with
--workers 1 and then 2, fresh outputs each; speed-up = wall(1) / wall(2), start-up included.
Other processes on the machine share the cores, so the numbers are upper bounds for an idle machine.
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


def build_dataset(root: Path, n_synthetic: int, copies: int) -> tuple[list[dict], str]:
    """Write a dataset folder of 2048-px fields (synthetic + HPA samples when present); returns, per
    distinct field, its ID, data source and reference mask path, and a description."""
    import pandas as pd

    from src.data.make_synthetic import write_synthetic_dataset
    from src.data.synthetic import SyntheticConfig

    fields = []
    if n_synthetic:
        synthetic = write_synthetic_dataset(root / "synthetic", n_synthetic, 0, SyntheticConfig(image_size=2048), seed=5)
        fields += [dict(folder=str(synthetic.image_dir("train")), source="synthetic", image_id=image_id,
                        reference=str(synthetic.truth_mask_path(image_id)))
                   for image_id in pd.read_csv(synthetic.train_csv)["ID"]]
    hpa = REPO_ROOT.parent / "shared" / "hpa_samples"
    n_hpa = 0
    if (hpa / "images").is_dir():
        hpa_ids = pd.read_csv(hpa / "train.csv")["ID"].tolist()
        fields += [dict(folder=str(hpa / "images"), source="hpa", image_id=image_id,
                        reference=str(hpa / "masks" / f"{image_id}_predictedmask.png")) for image_id in hpa_ids]
        n_hpa = len(hpa_ids)
    train = root / "bench" / "train"
    train.mkdir(parents=True)
    rows = []
    for copy in range(copies):
        for field in fields:
            name = f"{field['image_id']}-c{copy}"
            for channel in CHANNELS:
                os.symlink(Path(field["folder"]) / f"{field['image_id']}_{channel}.png", train / f"{name}_{channel}.png")
            rows.append((name, "0"))
            if copy == 0:
                field["name"] = name
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(root / "bench" / "train.csv", index=False)
    return fields, f"{n_synthetic} synthetic + {n_hpa} HPA fields of 2048 px"


def match_by_source(fields: list[dict], masks: list) -> dict:
    """Pooled reference cells matched at IoU >= 0.6, spurious cells, per data source."""
    from src.preprocessing.segmentation_report import read_mask
    from src.segmentation.matching import match_masks

    totals: dict[str, list[int]] = {}
    for field, cells in zip(fields, masks):
        stats = match_masks(read_mask(Path(field["reference"]), cells.shape), cells)
        total = totals.setdefault(field["source"], [0, 0, 0, 0])
        for index, value in enumerate((stats.matched, stats.n_reference, stats.unmatched_predicted, stats.n_predicted)):
            total[index] += value
    return {source: {"match_rate": round(matched / max(n_ref, 1), 4), "matched": f"{matched}/{n_ref}",
                     "spurious_rate": round(spurious / max(n_pred, 1), 4)}
            for source, (matched, n_ref, spurious, n_pred) in totals.items()}


def child_classical(dataset: Path, fields: list[dict], out_dir: Path) -> dict:
    from src.data.bbox_records import build_record, write_record
    from src.data.images import read_field
    from src.segmentation import make_segmenter

    segmenter = make_segmenter("classical")
    times = {"read": [], "segment": [], "record": [], "total": []}
    masks = []
    for field in fields:
        start = time.perf_counter()
        image = read_field(dataset / "train", field["name"])
        read = time.perf_counter()
        _, cells = segmenter.segment(image)
        segmented = time.perf_counter()
        write_record(out_dir / f"{field['name']}.npz", build_record(field["name"], cells))
        done = time.perf_counter()
        for key, value in (("read", read - start), ("segment", segmented - read), ("record", done - segmented),
                           ("total", done - start)):
            times[key].append(value)
        masks.append(cells)
    sizes = [p.stat().st_size for p in out_dir.glob("*.npz")]
    return {"seconds_per_field": {key: round(statistics.mean(v), 3) for key, v in times.items()},
            "seconds_per_field_max": round(max(times["total"]), 3), "peak_rss_mib": round(peak_rss_mib(), 1),
            "record_kib_mean": round(statistics.mean(sizes) / 1024, 1), "match": match_by_source(fields, masks)}


def child_hpacellseg(dataset: Path, fields: list[dict], out_dir: Path, width: int, batch_size: int) -> dict:
    import torch

    from src.data.images import read_field
    from src.segmentation import make_segmenter
    from src.segmentation.hpa_stand_in import StandInUNet, save_torchscript

    paths = {}
    for seed, role in enumerate(("nuclei", "cell")):
        paths[role] = out_dir / f"{role}_stand_in.pt"
        save_torchscript(StandInUNet(width=width, seed=seed), paths[role])
    start = time.perf_counter()
    segmenter = make_segmenter("hpacellseg", nuclei_model=paths["nuclei"], cell_model=paths["cell"],
                               batch_size=batch_size)
    start_up = time.perf_counter() - start
    images = [read_field(dataset / "train", field["name"]) for field in fields]
    segmenter.predict_maps(images[:1])  # warm-up: first-call allocations and TorchScript optimisation

    def timed(batch: int) -> dict:
        segmenter.batch_size = batch
        network = labels = 0.0
        for begin in range(0, len(images), batch):
            start = time.perf_counter()
            maps = segmenter.predict_maps(images[begin:begin + batch])
            predicted = time.perf_counter()
            for pair in maps:
                segmenter.label_maps(*pair)
            labels += time.perf_counter() - predicted
            network += predicted - start
        return {"network": round(network / len(images), 3), "labels": round(labels / len(images), 3),
                "total": round((network + labels) / len(images), 3)}

    one, batched = timed(1), timed(batch_size)
    return {"device": str(segmenter.device), "torch_threads": torch.get_num_threads(), "stand_in_width": width,
            "start_up_seconds": round(start_up, 2), "seconds_per_field_one_at_a_time": one,
            f"seconds_per_field_batch_{batch_size}": batched,
            "speedup_batched_total": round(one["total"] / batched["total"], 2),
            "speedup_batched_network": round(one["network"] / batched["network"], 2),
            "peak_rss_mib": round(peak_rss_mib(), 1), "match": "not measured: stand-in models (speed only)"}


def peak_rss_mib() -> float:
    """Peak resident memory of this process. VmHWM, because ru_maxrss survives execve on Linux and
    would report the (larger) parent that generated the fields."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True,
                            text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


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


def side_by_side(report: dict) -> str:
    classical, hpa = report["classical"], report["hpacellseg_stand_in"]
    batched = hpa[f"seconds_per_field_batch_{report['batch_size']}"]
    match = "; ".join(f"{source} {value['match_rate']:.1%} ({value['matched']}), spurious {value['spurious_rate']:.1%}"
                      for source, value in classical["match"].items())
    return "\n".join([
        f"{'backend':<28}{'s/field':>9}{'peak MiB':>10}  match at IoU >= 0.6",
        f"{'classical':<28}{classical['seconds_per_field']['total']:>9.3f}{classical['peak_rss_mib']:>10.0f}  {match}",
        f"{'hpacellseg, one field':<28}{hpa['seconds_per_field_one_at_a_time']['total']:>9.3f}"
        f"{hpa['peak_rss_mib']:>10.0f}  n/a (stand-in models)",
        f"{'hpacellseg, batch ' + str(report['batch_size']):<28}{batched['total']:>9.3f}{'':>10}  n/a",
        f"hpacellseg batched vs one field: {hpa['speedup_batched_total']}x overall, "
        f"{hpa['speedup_batched_network']}x for the network part ({hpa['device']})",
        f"classical CLI, 2 workers vs 1: {report['speedup_2_workers']}x"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic 2048-px fields (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=4, help="repeat the fields for the worker runs")
    parser.add_argument("--batch-size", type=int, default=4, help="hpacellseg fields per forward pass")
    parser.add_argument("--stand-in-width", type=int, default=32, help="channels of the stand-in U-Nets")
    parser.add_argument("--out", default="output/bench/segmentation.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        dataset, out_dir = Path(spec["dataset"]), Path(spec["out_dir"])
        if spec["backend"] == "classical":
            result = child_classical(dataset, spec["fields"], out_dir)
        else:
            result = child_hpacellseg(dataset, spec["fields"], out_dir, spec["width"], spec["batch_size"])
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_seg_") as tmp:
        tmp = Path(tmp)
        fields, description = build_dataset(tmp, args.synthetic, args.copies)
        dataset = tmp / "bench"
        results = {}
        for backend in ("classical", "hpacellseg"):
            (tmp / backend).mkdir()
            results[backend] = run_child(dict(backend=backend, dataset=str(dataset), fields=fields,
                                              out_dir=str(tmp / backend), width=args.stand_in_width,
                                              batch_size=args.batch_size))
        n_jobs = len(fields) * args.copies
        wall, cpu = {}, {}
        for workers in (1, 2):
            shutil.rmtree(tmp / f"out{workers}", ignore_errors=True)
            wall[workers], cpu[workers] = run_cli(dataset, tmp / f"out{workers}", workers)
    report = {
        "fields": description, "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
        "classical": results["classical"], "hpacellseg_stand_in": results["hpacellseg"],
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
    print(side_by_side(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
