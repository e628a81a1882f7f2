"""The training CLI end to end on a tiny dataset: outputs, and resume after a simulated kill."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from src.train import train_bestfitting, trainer
from src.train.models import read_checkpoint
from src.train.train_bestfitting import INTERRUPTED_EXIT_CODE, main
from tests.test_train_helpers import make_tiny_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("ds"), num_images=16, size=32, folds=2)


def _argv(dataset: Path, output: Path, run: str, *extra: str) -> list[str]:
    return ["--dataset", str(dataset), "--output", str(output), "--out_dir", run, "--fold", "0",
            "--arch", "densenet_tiny", "--img_size", "32", "--batch_size", "2", "--workers", "0",
            "--scheduler", "Constant", "--scheduler-lr-multiplier", "100", "--epochs", "3", "--log-every", "0",
            "--eval-at-start", *extra]


def _model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_outputs_and_metrics(dataset: Path, tmp_path: Path) -> None:
    assert main(_argv(dataset, tmp_path, "run", "--gradient-accumulation-steps", "3", "--select-by", "map")) == 0
    run_dir = tmp_path / "models" / "run" / "fold0"
    for name in ("best.pth", "final.pth", "last.pth", "metrics.csv", "curves.png"):
        assert (run_dir / name).is_file(), name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1, 2, 3]
    for column in ("lr", "train_loss", "val_focal_loss", "val_map", "val_map_prior", "seconds"):
        assert column in metrics.columns
    assert metrics["lr"].iloc[1:].tolist() == pytest.approx([1e-3] * 3)
    assert list(metrics["step"]) == [0, 2, 4, 6]  # 4 batches per epoch, groups of 3 -> steps of 3 and 1 batch
    best = torch.load(run_dir / "best.pth", map_location="cpu", weights_only=True)
    assert best["metrics"]["val_map"] == pytest.approx(metrics["val_map"].max())
    assert best["model_config"]["arch"] == "densenet_tiny"


@pytest.mark.parametrize("accumulation, every, stop", [
    ("2", "1", "3"),   # saved at every step; killed mid epoch 2 right after a save
    ("1", "3", "8"),   # killed after step 8 with the last save at step 6: steps 7-8 are redone
])
def test_resume_after_kill_equals_uninterrupted(dataset: Path, tmp_path: Path, accumulation: str, every: str,
                                                stop: str, monkeypatch) -> None:
    common = ("--gradient-accumulation-steps", accumulation, "--dropout", "0.5")  # dropout: RNG must be restored
    assert main(_argv(dataset, tmp_path, "straight", *common)) == 0
    interrupted = _argv(dataset, tmp_path, "killed", *common, "--checkpoint-every-steps", every)
    assert main(interrupted + ["--stop-after-steps", stop]) == INTERRUPTED_EXIT_CODE
    killed_dir = tmp_path / "models" / "killed" / "fold0"
    saved = torch.load(killed_dir / "last.pth", map_location="cpu", weights_only=True)["trainer_state"]
    assert saved["step"] < 4 * 3 // int(accumulation) and saved["micro_batch"] > 0  # a mid-epoch state
    reads = []

    def counting_read(path, *rest, **options):
        reads.append(Path(path).name)
        return read_checkpoint(path, *rest, **options)
    monkeypatch.setattr(train_bestfitting, "read_checkpoint", counting_read)
    monkeypatch.setattr(trainer, "read_checkpoint", counting_read)
    assert main(interrupted + ["--resume"]) == 0
    assert reads.count("last.pth") == 1  # the settings and the state come from one read
    straight = _model_state(tmp_path / "models" / "straight" / "fold0" / "final.pth")
    resumed = _model_state(killed_dir / "final.pth")
    for key, value in straight.items():
        assert torch.allclose(resumed[key].float(), value.float(), rtol=1e-6, atol=1e-7), key
    a = pd.read_csv(tmp_path / "models" / "straight" / "fold0" / "metrics.csv")
    b = pd.read_csv(killed_dir / "metrics.csv")
    assert list(a["epoch"]) == list(b["epoch"]) == [0, 1, 2, 3]
    assert b["val_focal_loss"].tolist() == pytest.approx(a["val_focal_loss"].tolist(), rel=1e-6)
    assert b["train_loss"].iloc[1:].tolist() == pytest.approx(a["train_loss"].iloc[1:].tolist(), rel=1e-6)


def test_resume_without_checkpoint_starts_fresh(dataset: Path, tmp_path: Path) -> None:
    assert main(_argv(dataset, tmp_path, "fresh", "--resume", "--epochs", "1")) == 0
    assert (tmp_path / "models" / "fresh" / "fold0" / "final.pth").is_file()


def test_load_state_dict_path_from_our_final(dataset: Path, tmp_path: Path) -> None:
    assert main(_argv(dataset, tmp_path, "first", "--epochs", "1")) == 0
    final = tmp_path / "models" / "first" / "fold0" / "final.pth"
    argv = _argv(dataset, tmp_path, "second", "--epochs", "1", "--load-state-dict-path", str(final),
                 "--scheduler-lr-multiplier", "0")
    assert main(argv) == 0
    first, second = _model_state(final), _model_state(tmp_path / "models" / "second" / "fold0" / "final.pth")
    conv = "backbone.features.conv0.weight"
    assert torch.equal(first[conv], second[conv])  # lr 0: the loaded weights are kept
