"""Image-level label tables: `ID,Label` CSVs with `|`-joined class indices, validated row by row.

`read_label_table` returns a DataFrame with columns `ID`, `Label` (normalised string) and
`source` ("train" or "public"); `labels_to_multihot` turns the Label column into an (N, 19) matrix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from src.data.classes import NUM_CLASSES

SOURCES = ("train", "public")


class LabelTableError(ValueError):
    """A label table that cannot be used; the message names the file and row."""


def parse_label_string(text: str) -> list[int]:
    """'8|5|0' -> [8, 5, 0]; a repeated class is kept once. ValueError for empty, non-integer, unknown ids."""
    text = str(text).strip()
    if not text or text.lower() == "nan":
        raise ValueError("empty label")
    labels = []
    for part in text.split("|"):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise ValueError(f"label {part!r} is not an integer")
        value = int(part)
        if not 0 <= value < NUM_CLASSES:
            raise ValueError(f"label id {value} outside 0..{NUM_CLASSES - 1}")
        if value not in labels:  # the 2021 table has a few repeats such as '13|13'
            labels.append(value)
    return labels


def format_labels(labels: Iterable[int]) -> str:
    """[8, 5, 0] -> '8|5|0' (order kept)."""
    return "|".join(str(int(label)) for label in labels)


def labels_to_multihot(label_strings: Sequence[str]) -> np.ndarray:
    """Label strings -> (N, 19) uint8 multi-hot matrix."""
    multihot = np.zeros((len(label_strings), NUM_CLASSES), dtype=np.uint8)
    for row, text in enumerate(label_strings):
        multihot[row, parse_label_string(text)] = 1
    return multihot


def multihot_to_labels(multihot: np.ndarray) -> list[str]:
    """(N, 19) 0/1 matrix -> label strings with ascending class ids. A row with no class is an error."""
    multihot = np.asarray(multihot)
    if multihot.ndim != 2 or multihot.shape[1] != NUM_CLASSES:
        raise ValueError(f"expected an (N, {NUM_CLASSES}) matrix, got shape {multihot.shape}")
    strings = []
    for row, values in enumerate(multihot):
        present = np.flatnonzero(values > 0.5)
        if present.size == 0:
            raise ValueError(f"row {row} has no label")
        strings.append(format_labels(present))
    return strings


def _image_ids_from_urls(values: pd.Series) -> pd.Series:
    # Public HPA tables name images by URL ('https://.../10005/921_B9_1'); the files use the basename.
    return values.astype(str).str.rstrip("/").str.split("/").str[-1]


def read_label_table(path: str | os.PathLike, source: str = "train") -> pd.DataFrame:
    """Read and validate an image-level label table.

    Accepts `ID,Label` (the challenge's train.csv) and, for public data, an `Image` column of URLs
    or names instead of `ID`; other columns are kept. Errors name the file and the 1-based CSV line.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    path = Path(path)
    if not path.is_file():
        raise LabelTableError(f"{path}: label table not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise LabelTableError(f"{path}: file is empty") from None
    if "ID" not in table.columns and "Image" in table.columns:
        table = table.rename(columns={"Image": "ID"})
        table["ID"] = _image_ids_from_urls(table["ID"])
    missing = {"ID", "Label"} - set(table.columns)
    if missing:
        raise LabelTableError(f"{path}: missing column(s) {sorted(missing)}; found {list(table.columns)}")
    if table.empty:
        raise LabelTableError(f"{path}: no rows")
    normalised = []
    for row, (image_id, text) in enumerate(zip(table["ID"], table["Label"])):
        line = row + 2  # header is line 1
        if not str(image_id).strip():
            raise LabelTableError(f"{path}: line {line}: empty ID")
        try:
            normalised.append(format_labels(parse_label_string(text)))
        except ValueError as error:
            raise LabelTableError(f"{path}: line {line} (ID {image_id}): {error}") from None
    table["ID"] = table["ID"].str.strip()
    table["Label"] = normalised
    duplicated = table["ID"].duplicated(keep="first")
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise LabelTableError(f"{path}: line {row + 2}: duplicate ID {table['ID'].iloc[row]}")
    table["source"] = source
    return table


def source_image_ids(layout, source: str) -> list[str]:
    """IDs of one source of a dataset (a schema.DatasetLayout) in table order: train.csv, public.csv or
    test.csv (`ID,ImageWidth,ImageHeight`, no labels)."""
    if source == "test":
        if not layout.test_csv.is_file():
            raise LabelTableError(f"{layout.test_csv}: test table not found")
        return pd.read_csv(layout.test_csv, dtype={"ID": str})["ID"].tolist()
    return read_label_table(layout.train_csv if source == "train" else layout.public_csv, source)["ID"].tolist()


def read_label_tables(train_csv: str | os.PathLike, public_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """The training table, plus the public table when given, with a `source` column; IDs unique across both."""
    tables = [read_label_table(train_csv, "train")]
    if public_csv is not None:
        tables.append(read_label_table(public_csv, "public"))
    combined = pd.concat(tables, ignore_index=True)
    clash = combined["ID"].duplicated()
    if clash.any():
        raise LabelTableError(f"ID {combined['ID'][clash].iloc[0]} appears in both {train_csv} and {public_csv}")
    return combined
