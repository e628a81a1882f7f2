"""The reference's flag names and values parse to the same settings as ours; --resume PATH."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from src.predict import pseudo_label_store as store
from src.train import train_bestfitting, train_cellwise
from src.utils.io import UserInputError
from tests.test_pseudo_labels import pipeline_inputs, run_stage  # noqa: F401 - the fixture is used below
from tests.test_train_helpers import make_tiny_dataset


def _settings(parse, argv: list[str]) -> dict:
    return vars(parse(argv))


def test_reference_image_level_command_parses_as_ours() -> None:
    # the reference README's first pass, word for word, and the same in our names
    reference = ("--fold 0 --gpu-id 0 --img_size 1024 --batch_size 8 --workers 22 --gradient-accumulation-steps 200 "
                 "--scheduler Adam10 --epochs 10 --scheduler-lr-multiplier 4 --out_dir run --eval-at-start "
                 "--arch class_densenet121_large_dropout --in_channels 4 --without-public-data --resume r.pth")
    ours = ("--fold 0 --gpu-id 0 --img-size 1024 --batch-size 8 --workers 22 --gradient-accumulation-steps 200 "
            "--scheduler Adam10 --epochs 10 --scheduler-lr-multiplier 4 --out-dir run --eval-at-start "
            "--arch densenet121_large --in-channels 4 --resume r.pth")
    assert _settings(train_bestfitting.parse_args, reference.split()) == \
        _settings(train_bestfitting.parse_args, ours.split())


def test_alias_values_and_defaults() -> None:
    parse = train_bestfitting.parse_args
    assert parse([]).arch == "densenet121_large" and parse([]).img_size == 1024  # as the reference trains
    assert parse(["--arch", "class_densenet121_dropout"]).arch == "densenet121"
    assert parse(["--public-data", "--without-public-data"]).public_data is False
    assert parse(["--without-public-data", "--public-data"]).public_data is True
    assert parse(["--in_channels", "3"]).in_channels == 3
    assert parse([]).resume is None and parse(["--resume"]).resume is True
    assert parse(["--resume", "--fold", "2"]).resume is True
    assert parse(["--resume", "a/last.pth"]).resume == "a/last.pth"
    with pytest.raises(SystemExit):
        parse(["--arch", "class_densenet121_tiny"])


def test_reference_cell_level_command_and_default_schedule() -> None:
    reference = ("--fold 1 --gpu-id 0 --img_size 512 --batch_size 32 --workers 10 --gradient-accumulation-steps 4 "
                 "--cell-level-labels-path p.h5 --scheduler Adam20WarmUP --epochs 10 --scheduler-lr-multiplier 4 "
                 "--out_dir c --load-state-dict-path f.pth --loss FocalSymmetricLovaszHardLogLoss")
    settings = _settings(train_cellwise.parse_args, reference.split())
    assert settings == _settings(train_cellwise.parse_args, reference.replace(" --scheduler Adam20WarmUP", "").split())
    assert settings["scheduler"] == "Adam20WarmUP" and settings["arch"] == "densenet121_large"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("ds"), num_images=12, size=32, folds=2)


def _run(dataset: Path, output: Path, run: str, *extra: str) -> int:
    return train_bestfitting.main(
        ["--dataset", str(dataset), "--output", str(output), "--out_dir", run, "--arch", "densenet_tiny",
         "--img_size", "32", "--batch_size", "2", "--workers", "0", "--scheduler", "Constant", "--log-every", "0",
         "--init-weights", "none", *extra])


def test_resume_from_a_path_and_from_a_bare_name(dataset: Path, tmp_path: Path) -> None:
    assert _run(dataset, tmp_path, "first", "--epochs", "1") == 0
    first_dir = tmp_path / "models" / "first" / "fold0"
    # another run continues from the first one's training state, writing into its own folder
    assert _run(dataset, tmp_path, "second", "--epochs", "2", "--resume", str(first_dir / "last.pth")) == 0
    second = pd.read_csv(tmp_path / "models" / "second" / "fold0" / "metrics.csv")
    assert second["epoch"].tolist() == [1, 2]  # epoch 1 is the first run's, carried in its state
    # a bare name is looked up in the run's own folder, as in the reference's train_cellwise
    assert _run(dataset, tmp_path, "first", "--epochs", "3", "--resume", "last.pth") == 0
    assert pd.read_csv(first_dir / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    with pytest.raises(UserInputError, match="not a training state"):
        _run(dataset, tmp_path, "first", "--epochs", "4", "--resume", "final.pth")
    with pytest.raises(UserInputError, match="no such file"):
        _run(dataset, tmp_path, "first", "--epochs", "4", "--resume", "nowhere.pth")


def test_fold_one_fifth_number_is_shard_k_of_5(pipeline_inputs, tmp_path: Path) -> None:  # noqa: F811
    layout, outputs = pipeline_inputs
    assert run_stage(layout, outputs, "random", tmp_path / "a.h5", "--fold-one-fifth-number", "1") == 0
    assert run_stage(layout, outputs, "random", tmp_path / "b.h5", "--shard", "1/5") == 0
    with_alias, with_shard = store.committed_images(tmp_path / "a.h5"), store.committed_images(tmp_path / "b.h5")
    assert with_alias == with_shard and 0 < len(with_alias) < 10
    with pytest.raises(UserInputError, match="--shard"):
        run_stage(layout, outputs, "random", tmp_path / "c.h5", "--fold-one-fifth-number", "1", "--shard", "1/5")
