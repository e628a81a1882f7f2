"""Write the embedded synthetic dataset: HPA-format fields, image labels and cell-level truth.

    python -m src.data.make_synthetic --out input/synthetic --n-train 160 --n-test 200 --image-size 256
    python -m src.data.make_synthetic --style 2 --out input/synthetic_style2    # the second style

Style 1 (`src.data.synthetic`, the demo's tuning style): square 8-bit fields. Style 2
(`src.data.synthetic_style2`, for cross-style checks): non-square 16-bit fields of small dense cells,
patterns drawn another way; --image-size, --cells-min/max and --debris apply to style 1 only.

Layout (see src/data/schema.py): train.csv, train/{ID}_{red,green,blue,yellow}.png, test.csv, test/,
truth/masks/{ID}.png, truth/cell_labels.csv, truth/image_labels_clean.csv, synthetic_config.json.
The dataset is built in a temporary folder and renamed into place, so a crash leaves no half dataset;
the same flags give byte-identical files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from src.data.images import RGBY, write_channel
from src.data.labels import format_labels
from src.data.schema import CELL_LABELS_COLUMNS, TEST_COLUMNS, DatasetLayout
from src.data.synthetic import SyntheticConfig, add_label_noise, image_labels_from_cells, make_field
from src.data.synthetic_style2 import Style2Config, make_field_style2
from src.utils.io import UserInputError, run_cli, setup_logging

log = logging.getLogger(__name__)
SPLIT_CODES = {"train": 0, "test": 1}
DEFAULT_SIZES = {1: (160, 200), 2: (64, 32)}  # (train, test) fields per style; style 2 is the cheap check


def image_rng(seed: int, split: str, index: int, style: int = 1) -> np.random.Generator:
    """Each field has its own stream, so a field does not depend on how many were made before it."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index] + ([style] if style != 1 else []))


def dataset_settings(n_train: int, n_test: int, config: SyntheticConfig | Style2Config, seed: int) -> dict:
    """Everything that decides the dataset's bytes, as stored in synthetic_config.json."""
    return {"seed": seed, "n_train": n_train, "n_test": n_test, **dataclasses.asdict(config)}


def write_synthetic_dataset(out_dir: str | Path, n_train: int, n_test: int, config: SyntheticConfig | Style2Config,
                            seed: int = 0) -> DatasetLayout:
    """Generate the dataset and rename it onto `out_dir` (replacing one that exists); returns its layout.
    The config's type picks the style."""
    out_dir = Path(out_dir)
    style = 2 if isinstance(config, Style2Config) else 1
    draw = make_field_style2 if style == 2 else make_field
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        layout = DatasetLayout(staging)
        cell_rows, clean_rows, label_rows, test_rows = [], [], [], []
        jobs = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
        for split, index in tqdm(jobs, desc="synthetic fields"):
            rng = image_rng(seed, split, index, style)
            image_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            field, cell_mask, cell_classes = draw(rng, config)
            for channel, name in enumerate(RGBY):
                write_channel(layout.image_dir(split) / f"{image_id}_{name}.png", field[..., channel])
            write_channel(layout.truth_mask_path(image_id), cell_mask)
            clean = image_labels_from_cells(cell_classes, config.majority)
            clean_rows.append((image_id, split, format_labels(clean)))
            cell_rows += [(image_id, split, cell_id, format_labels(sorted(classes)))
                          for cell_id, classes in enumerate(cell_classes, start=1)]
            if split == "train":
                label_rows.append((image_id, format_labels(add_label_noise(clean, rng, config.label_noise))))
            else:
                test_rows.append((image_id, field.shape[1], field.shape[0]))
        pd.DataFrame(label_rows, columns=["ID", "Label"]).to_csv(layout.train_csv, index=False)
        pd.DataFrame(test_rows, columns=list(TEST_COLUMNS)).to_csv(layout.test_csv, index=False)
        pd.DataFrame(cell_rows, columns=list(CELL_LABELS_COLUMNS)).to_csv(
            layout.truth_cell_labels_csv, index=False)
        pd.DataFrame(clean_rows, columns=["ID", "split", "Label"]).to_csv(layout.truth_image_labels_csv, index=False)
        layout.synthetic_config_json.write_text(json.dumps(dataset_settings(n_train, n_test, config, seed), indent=2))
        if out_dir.exists():  # --force: swap the new dataset in, then drop the old one
            retired = out_dir.with_name(f".{out_dir.name}.retired")
            shutil.rmtree(retired, ignore_errors=True)
            out_dir.rename(retired)
            staging.rename(out_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DatasetLayout(out_dir)


def main(argv=None) -> int:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="input/synthetic", help="dataset folder to create (default: %(default)s)")
    parser.add_argument("--style", type=int, choices=(1, 2), default=1, help="generator style (see above)")
    parser.add_argument("--n-train", type=int, default=None, help="training fields (default: 160, style 2: 64)")
    # Held-out fields cost no training time; 200 give every drawn class some 70-220 true cells, so a
    # class's AP does not hinge on the one or two test images that happen to show it. Style 2's
    # fields hold ~2.5x more cells, so 32 give it some 700 test cells.
    parser.add_argument("--n-test", type=int, default=None, help="held-out fields with truth (default: 200, style 2: 32)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="field side in px")
    parser.add_argument("--cells-min", type=int, default=defaults.cells_min)
    parser.add_argument("--cells-max", type=int, default=defaults.cells_max)
    parser.add_argument("--debris", type=int, default=defaults.debris_per_field, help="debris objects per field")
    parser.add_argument("--majority", type=float, default=defaults.majority,
                        help="a class is an image label when more than this fraction of cells has it")
    parser.add_argument("--label-noise", type=float, default=defaults.label_noise,
                        help="probability of one extra label error per training image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    args = parser.parse_args(argv)
    setup_logging()
    if not 0 <= args.majority < 1 or not 0 <= args.label_noise <= 1:
        raise UserInputError("--majority must be in [0, 1) and --label-noise in [0, 1]")
    if args.image_size < 64 or not 1 <= args.cells_min <= args.cells_max:
        raise UserInputError("--image-size must be >= 64 and 1 <= --cells-min <= --cells-max")
    out_dir = Path(args.out)
    default_train, default_test = DEFAULT_SIZES[args.style]
    args.n_train = default_train if args.n_train is None else args.n_train
    args.n_test = default_test if args.n_test is None else args.n_test
    if args.n_train < 1 or args.n_test < 0:
        raise UserInputError("--n-train must be >= 1 and --n-test >= 0")
    if args.style == 2:
        config = Style2Config(majority=args.majority, label_noise=args.label_noise)
    else:
        config = SyntheticConfig(image_size=args.image_size, cells_min=args.cells_min, cells_max=args.cells_max,
                                 debris_per_field=args.debris, majority=args.majority, label_noise=args.label_noise)
    if out_dir.exists() and not args.force:
        config_path = DatasetLayout(out_dir).synthetic_config_json
        found = json.loads(config_path.read_text()) if config_path.is_file() else None
        if found != json.loads(json.dumps(dataset_settings(args.n_train, args.n_test, config, args.seed))):
            raise UserInputError(f"{out_dir} exists but was not made with these settings "
                                 f"({config_path.name}: {found}); pass --force to rebuild it, or remove it and the "
                                 f"outputs made from it")
        log.info("%s exists with these settings; keeping it (use --force to rebuild)", out_dir)
        return 0
    write_synthetic_dataset(out_dir, args.n_train, args.n_test, config, args.seed)
    log.info("wrote %d train and %d test fields to %s", args.n_train, args.n_test, out_dir)
    return 0


if __name__ == "__main__":
    run_cli(main)
