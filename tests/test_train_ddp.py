"""Two torchrun processes (gloo, CPU) give the weights of one process on the same global batch.

BatchNorm is frozen (--freeze-bn) and dropout off for the comparison: with BN in training mode each
process normalises with its own half-batch statistics, which a single process on the whole batch does
not reproduce (DDP keeps BN per process unless converted to SyncBatchNorm); with dropout each process
draws its own masks. The loss is the focal loss, a mean over samples (the hard log loss mines per batch).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from src.train.train_bestfitting import main
from tests.test_train_helpers import make_tiny_dataset

REPO = Path(__file__).resolve().parents[1]


def _argv(dataset: Path, output: Path, run: str, batch_size: int) -> list[str]:
    return ["--dataset", str(dataset), "--output", str(output), "--out_dir", run, "--fold", "0",
            "--arch", "densenet_tiny", "--img_size", "32", "--batch_size", str(batch_size), "--workers", "0",
            "--gradient-accumulation-steps", "2", "--scheduler", "Constant", "--scheduler-lr-multiplier", "100",
            "--epochs", "2", "--loss", "FocalLoss", "--freeze-bn", "--dropout", "0", "--eval-at-start",
            "--device", "cpu", "--log-every", "0"]


def test_two_process_gloo_equals_single_process(tmp_path: Path) -> None:
    dataset = make_tiny_dataset(tmp_path / "ds", num_images=24, size=32, folds=3)  # 16 train, 8 valid
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "src.train.train_bestfitting", *_argv(dataset, tmp_path, "ddp", batch_size=2)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(_argv(dataset, tmp_path, "single", batch_size=4)) == 0

    def final(run: str) -> dict:
        return torch.load(tmp_path / "models" / run / "fold0" / "final.pth", map_location="cpu",
                          weights_only=True)["model"]

    ddp, single = final("ddp"), final("single")
    for key, value in single.items():
        assert torch.allclose(ddp[key].float(), value.float(), rtol=1e-4, atol=1e-5), \
            f"{key}: max diff {(ddp[key].float() - value.float()).abs().max():.3g}"
    a = pd.read_csv(tmp_path / "models" / "ddp" / "fold0" / "metrics.csv")
    b = pd.read_csv(tmp_path / "models" / "single" / "fold0" / "metrics.csv")
    assert list(a["step"]) == list(b["step"]) == [0, 2, 4]
    assert a["val_map"].tolist() == pytest.approx(b["val_map"].tolist(), abs=1e-6)
    assert a["val_focal_loss"].tolist() == pytest.approx(b["val_focal_loss"].tolist(), rel=1e-4)
    # the comparison is meaningful: training moved the weights far more than the tolerance
    assert abs(a["val_focal_loss"].iloc[-1] - a["val_focal_loss"].iloc[0]) > 1e-3
