"""Shared fixtures: a small synthetic dataset, and the real HPA samples when ../shared is present."""
from __future__ import annotations

from pathlib import Path

import pytest

from src.data.make_synthetic import write_synthetic_dataset
from src.data.synthetic import SyntheticConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
HPA_SAMPLES = REPO_ROOT.parent / "shared" / "hpa_samples"


@pytest.fixture(scope="session")
def hpa_samples() -> Path:
    if not (HPA_SAMPLES / "images").is_dir():
        pytest.skip("../shared/hpa_samples is not present")
    return HPA_SAMPLES


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """40 train + 8 test fields of 128 px, label noise off (so image labels follow the majority rule exactly)."""
    config = SyntheticConfig(image_size=128, label_noise=0.0)
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", 40, 8, config, seed=1)
