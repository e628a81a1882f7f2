"""Damaged checkpoints and unreadable fields through the real CLIs: one `error:` line, exit 2, outputs intact."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from src.train import train_bestfitting
from tests.test_train_helpers import make_tiny_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--arch", "densenet_tiny", "--img_size", "32", "--batch_size", "2", "--scheduler", "Constant",
               "--log-every", "0", "--init-weights", "none", "--gradient-accumulation-steps", "1"]


def _cli(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def _assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "full pickle" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset and the output folder of a finished 1-epoch run named 'good'."""
    root = tmp_path_factory.mktemp("bad_files")
    dataset = make_tiny_dataset(root / "data", num_images=12, size=32, folds=2)
    output = root / "output"
    argv = ["--dataset", str(dataset), "--output", str(output), "--out_dir", "good", "--epochs", "1",
            "--workers", "0", *TRAIN_FLAGS]
    assert train_bestfitting.main(argv) == 0
    return dataset, output


def _damaged_checkpoint(kind: str, good: Path, path: Path) -> Path:
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    else:
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_damaged_initial_weights_stop_training(trained, tmp_path: Path, kind: str) -> None:
    dataset, output = trained
    run_dir = output / "models" / "good" / "fold0"
    before = _digests(run_dir)
    bad = _damaged_checkpoint(kind, run_dir / "final.pth", tmp_path / "weights.pth")
    result = _cli("src.train.train_bestfitting", "--dataset", str(dataset), "--output", str(output),
                  "--out_dir", "good", "--epochs", "1", "--workers", "0", *TRAIN_FLAGS,
                  "--load-state-dict-path", str(bad))
    _assert_one_error_line(result, str(bad), "not a readable PyTorch checkpoint")
    assert _digests(run_dir) == before


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_damaged_model_stops_prediction(trained, tmp_path: Path, kind: str) -> None:
    _, output = trained
    run_dir = output / "models" / "damaged" / "fold0"
    run_dir.mkdir(parents=True, exist_ok=True)
    bad = _damaged_checkpoint(kind, output / "models" / "good" / "fold0" / "best.pth", run_dir / "best.pth")
    previous = tmp_path / "submission.csv"
    previous.write_text("ID,ImageWidth,ImageHeight,PredictionString\nkept,1,1,\n")
    result = _cli("src.predict.predict_submission", "--dataset", str(tmp_path / "no_data"), "--output-dir",
                  str(output), "--run-name", "damaged", "--folds", "0", "--out", str(previous), "--device", "cpu")
    _assert_one_error_line(result, str(bad))
    assert previous.read_text().endswith("kept,1,1,\n")


def test_unreadable_field_with_default_workers(trained, tmp_path: Path) -> None:
    dataset = Path(shutil.copytree(trained[0], tmp_path / "data"))
    output = tmp_path / "output"
    argv = ["--dataset", str(dataset), "--output", str(output), "--out_dir", "run", *TRAIN_FLAGS]
    assert train_bestfitting.main([*argv, "--epochs", "1", "--workers", "0"]) == 0
    run_dir = output / "models" / "run" / "fold0"
    before = _digests(run_dir)
    (dataset / "train" / "img003_green.png").write_bytes(b"\x89PNG broken")
    result = _cli("src.train.train_bestfitting", *argv, "--epochs", "2", "--resume")  # default --workers
    _assert_one_error_line(result, "img003", "--resume")
    assert _digests(run_dir) == before  # last.pth still resumes from the end of epoch 1
