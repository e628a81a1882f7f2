"""generate_cell_bboxes end to end: records and index, resume after a killed run or a killed
worker (identical output), unreadable images reported but not fatal, images without cells."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.data.bbox_records import build_cell_table, list_record_ids, read_record
from src.data.images import write_channel
from src.preprocessing import generate_cell_bboxes as cli
from src.utils.io import UserInputError, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 10


def _run(dataset: Path, output: Path, *extra: str, crash_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(cli.CRASH_ENV, None)
    if crash_after:
        env[cli.CRASH_ENV] = str(crash_after)
    command = [sys.executable, "-m", "src.preprocessing.generate_cell_bboxes", "--dataset", str(dataset),
               "--output-dir", str(output), "--limit", str(N_IMAGES), "--no-progress", *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _records(output: Path) -> dict[str, bytes]:
    folder = output / "bboxes" / "train"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npz"))}


@pytest.fixture(scope="module")
def reference_run(small_synthetic, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main(["--dataset", str(small_synthetic.root), "--output-dir", str(output), "--limit", str(N_IMAGES),
                     "--no-progress"]) == 0
    return output


def test_records_and_cell_index(small_synthetic, reference_run):
    folder = reference_run / "bboxes" / "train"
    ids = pd.read_csv(small_synthetic.train_csv)["ID"][:N_IMAGES].tolist()
    assert list_record_ids(folder) == sorted(ids)
    table = pd.read_csv(folder / "cells.csv", dtype={"ID": str})
    assert len(table) == sum(read_record(folder / f"{i}.npz", load_mask=False).n_cells for i in ids)
    pd.testing.assert_frame_equal(table, build_cell_table(folder))
    assert not (folder / "failed.csv").exists()
    record = read_record(folder / f"{ids[0]}.npz")
    assert record.image_shape == (128, 128) and record.n_cells > 0 and record.backend == "classical"


def test_rerun_does_nothing_new(small_synthetic, reference_run, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(reference_run, output)
    before = {p: p.stat().st_mtime_ns for p in (output / "bboxes" / "train").glob("*.npz")}
    assert cli.main(["--dataset", str(small_synthetic.root), "--output-dir", str(output), "--limit",
                     str(N_IMAGES), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (output / "bboxes" / "train").glob("*.npz")} == before


def test_resume_after_killed_run_gives_identical_output(small_synthetic, reference_run, tmp_path):
    output = tmp_path / "out"
    crashed = _run(small_synthetic.root, output, crash_after=4)
    assert crashed.returncode == 137, crashed.stderr
    folder = output / "bboxes" / "train"
    assert len(list_record_ids(folder)) == 3
    assert list(folder.glob(".*.tmp.npz"))  # the killed write left only a temporary file...
    assert all(p.stat().st_size > 0 for p in folder.glob("*.npz"))  # ...and no partial record
    resumed = _run(small_synthetic.root, output)
    assert resumed.returncode == 0, resumed.stderr
    assert "7 of 10 images to segment" in resumed.stderr
    assert not list(folder.glob(".*.tmp.*"))
    assert _records(output) == _records(reference_run)
    assert (folder / "cells.csv").read_bytes() == (reference_run / "bboxes" / "train" / "cells.csv").read_bytes()


def test_resume_after_a_killed_worker_gives_identical_output(small_synthetic, reference_run, tmp_path):
    output = tmp_path / "out"
    crashed = _run(small_synthetic.root, output, "--workers", "2", crash_after=2)
    assert crashed.returncode == cli.EXIT_WORKER_DIED, crashed.stderr
    assert "worker process died" in crashed.stderr
    assert len(_records(output)) < N_IMAGES
    resumed = _run(small_synthetic.root, output, "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert _records(output) == _records(reference_run)


@pytest.fixture()
def damaged_dataset(small_synthetic, tmp_path):
    """A copy of the first images with: a truncated channel, a missing channel, a zero-byte channel,
    and an image whose channels are all dark noise (no cells)."""
    root = tmp_path / "damaged"
    (root / "train").mkdir(parents=True)
    ids = pd.read_csv(small_synthetic.train_csv)["ID"][:6].tolist()
    for image_id in ids:
        for path in small_synthetic.image_dir("train").glob(f"{image_id}_*.png"):
            shutil.copy(path, root / "train" / path.name)
    green = root / "train" / f"{ids[0]}_green.png"
    green.write_bytes(green.read_bytes()[:200])
    (root / "train" / f"{ids[1]}_blue.png").unlink()
    (root / "train" / f"{ids[2]}_yellow.png").write_bytes(b"")
    rng = np.random.default_rng(0)
    for name in ("red", "green", "blue", "yellow"):
        write_channel(root / "train" / f"blank_{name}.png", rng.integers(0, 6, (96, 96)).astype(np.uint8))
    pd.DataFrame({"ID": ids + ["blank"], "Label": ["0"] * 7}).to_csv(root / "train.csv", index=False)
    return root, ids


def test_unreadable_images_are_reported_not_fatal(damaged_dataset, tmp_path):
    root, ids = damaged_dataset
    output = tmp_path / "out"
    code = cli.main(["--dataset", str(root), "--output-dir", str(output), "--no-progress"])
    assert code == cli.EXIT_FAILED_IMAGES
    folder = output / "bboxes" / "train"
    failed = pd.read_csv(folder / "failed.csv")
    assert sorted(failed["ID"]) == sorted(ids[:3])
    assert failed["error"].str.contains("truncated|missing|zero-byte").all()
    assert list_record_ids(folder) == sorted(ids[3:] + ["blank"])
    blank = read_record(folder / "blank.npz")
    assert blank.n_cells == 0 and blank.image_shape == (96, 96) and blank.cell_mask.max() == 0
    # fixing nothing and rerunning retries only the failed images, with the same verdict
    assert cli.main(["--dataset", str(root), "--output-dir", str(output), "--no-progress"]) == cli.EXIT_FAILED_IMAGES
    assert len(pd.read_csv(folder / "failed.csv")) == 3


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli.main, ["--dataset", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli.main, ["--dataset", str(tmp_path), "--backend", "hpacellseg", "--nuclei-model", "x.pth",
                           "--cell-model", "y.pth"])
    assert exit_info.value.code == 2


def test_one_run_per_output_folder(tmp_path):
    with cli._OutputLock(tmp_path):
        with pytest.raises(UserInputError, match="another"):
            with cli._OutputLock(tmp_path):
                pass
    with cli._OutputLock(tmp_path):  # released again
        pass
