"""Check every input table and image file the pipeline will need, before its first stage runs.

    python -m src.preprocessing.check_inputs --dataset input/synthetic [--public-data] [--no-test]

Reads `train.csv` (and `public.csv` with `--public-data`) as label tables and `test.csv` as the test
list (`ID,ImageWidth,ImageHeight`; without the size columns the sizes are taken from the images, with
a warning), and checks that every listed ID has its four channel files, non-empty, in its folder
(no decoding). The first problem is one `error: ...` line and exit code 2, so a bad table stops
`run_pipeline.sh` before any training rather than after it.
"""
from __future__ import annotations

import argparse
import logging

from src.data.images import ImageReadError, check_field_files
from src.data.labels import read_label_tables, read_test_table
from src.data.schema import TEST_COLUMNS, DatasetLayout
from src.utils.io import UserInputError, run_cli, setup_logging

log = logging.getLogger(__name__)


def missing_image_files(layout: DatasetLayout, source: str, image_ids: list[str]) -> dict[str, str]:
    """{ID: reason} for the IDs whose channel files are missing or empty (files are not decoded)."""
    problems = {}
    for image_id in image_ids:
        try:
            check_field_files(layout.image_dir(source), image_id)
        except ImageReadError as error:
            problems[image_id] = str(error)
    return problems


def check_images(layout: DatasetLayout, source: str, image_ids: list[str], table_name: str) -> None:
    """UserInputError naming how many IDs of the table lack a channel file, and the first of them."""
    problems = list(missing_image_files(layout, source, image_ids).values())
    if problems:
        raise UserInputError(f"{len(problems)} of {len(image_ids)} IDs in {table_name} have no usable image "
                             f"files (first: {problems[0]})")


def check_dataset(layout: DatasetLayout, public: bool = False, test: bool = True) -> dict[str, int]:
    """Validate the tables and image files of a dataset folder; returns the number of images per source."""
    if not layout.root.is_dir():
        raise UserInputError(f"dataset folder {layout.root} not found")
    labels = read_label_tables(layout.train_csv, layout.public_csv if public else None)
    counts = {}
    for source, table_path in (("train", layout.train_csv), ("public", layout.public_csv)):
        ids = labels.loc[labels["source"] == source, "ID"].tolist()
        if ids:
            check_images(layout, source, ids, str(table_path))
            counts[source] = len(ids)
    if test:
        tests = read_test_table(layout.test_csv)
        if tests["ImageWidth"].isna().all():
            log.warning("%s has no %s columns: the sizes are taken from the images", layout.test_csv,
                        "/".join(TEST_COLUMNS[1:]))
        check_images(layout, "test", tests["ID"].tolist(), str(layout.test_csv))
        counts["test"] = len(tests)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="input/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("--public-data", action="store_true", help="also check public.csv / public/")
    parser.add_argument("--no-test", action="store_true", help="do not check test.csv / test/")
    args = parser.parse_args(argv)
    setup_logging()
    counts = check_dataset(DatasetLayout(args.dataset), args.public_data, not args.no_test)
    log.info("inputs of %s look usable: %s", args.dataset, ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
