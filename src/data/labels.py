"""Image-level label tables: `ID,Label` CSVs with `|`-joined class indices, validated row by row.

`read_label_table` returns a DataFrame with columns `ID`, `Label` (normalised string) and
`source` ("train" or "public"); `labels_to_multihot` turns the Label column into an (N, 19) matrix.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from src.data.classes import NUM_CLASSES
from src.data.schema import TEST_COLUMNS

SOURCES = ("train", "public")


class LabelTableError(ValueError):
    """An input table (labels, test list) that cannot be used; the message names the file and row."""


def read_csv_table(path: str | os.PathLike, required: Sequence[str] = (), what: str = "table",
                   with_lines: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, list[int]]:
    """Every field as a string, after the checks any input table needs, each failing with one
    LabelTableError line: a folder or missing file, an empty file, bytes that are not UTF-8 (a BOM
    and CRLF line ends are fine), a column named twice, a missing column, a row whose field count
        differs from the header's (the CSV line is named). Blank lines are skipped. With `with_lines`,
    also the 1-based CSV line of each row, for later messages."""
    path = Path(path)
    if path.is_dir():
        raise LabelTableError(f"{path}: is a folder, expected a {what} CSV file")
    if not path.is_file():
        raise LabelTableError(f"{path}: {what} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise LabelTableError(f"{path}: line {line}: byte 0x{data[error.start]:02x} is not UTF-8 text "
                              f"(save the table as UTF-8)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((fields for fields in reader if fields), None)
        if header is None:
            raise LabelTableError(f"{path}: file is empty")
        header = [name.strip() for name in header]
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise LabelTableError(f"{path}: line {reader.line_num}: column(s) {repeated} named more than once")
        missing = [name for name in required if name not in header]
        if missing:
            raise LabelTableError(f"{path}: missing column(s) {missing}; found {header}")
        rows, lines = [], []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise LabelTableError(f"{path}: line {reader.line_num}: {len(fields)} fields, "
                                      f"the header has {len(header)}")
            rows.append(fields)
            lines.append(reader.line_num)
    except csv.Error as error:
        raise LabelTableError(f"{path}: line {reader.line_num}: {error}") from None
    table = pd.DataFrame(rows, columns=header, dtype=str)
    return (table, lines) if with_lines else table


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
    table, lines = read_csv_table(path, what="label table", with_lines=True)
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
        line = lines[row]
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
        raise LabelTableError(f"{path}: line {lines[row]}: duplicate ID {table['ID'].iloc[row]}")
    table["source"] = source
    return table


def source_image_ids(layout, source: str) -> list[str]:
    """IDs of one source of a dataset (a schema.DatasetLayout) in table order: train.csv, public.csv or
    test.csv (`ID,ImageWidth,ImageHeight`, no labels)."""
    if source == "test":
        return read_test_table(layout.test_csv)["ID"].tolist()
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


def read_test_table(path: str | os.PathLike) -> pd.DataFrame:
    """`ID,ImageWidth,ImageHeight` (schema.TEST_COLUMNS), validated; sizes are positive integers.

    Without the two size columns (e.g. an `ID,Label` table) the sizes are NaN: the stages take them
    from the images. One size column without the other, an empty or repeated ID is a LabelTableError.
    """
    path = Path(path)
    table, lines = read_csv_table(path, required=("ID",), what="test table", with_lines=True)
    sizes = [name for name in TEST_COLUMNS[1:] if name in table.columns]
    if len(sizes) == 1:
        other = next(name for name in TEST_COLUMNS[1:] if name not in sizes)
        raise LabelTableError(f"{path}: has {sizes[0]} but not {other}")
    if table.empty:
        raise LabelTableError(f"{path}: no rows")
    table["ID"] = table["ID"].str.strip()
    for row, image_id in enumerate(table["ID"]):
        if not image_id:
            raise LabelTableError(f"{path}: line {lines[row]}: empty ID")
    for name in TEST_COLUMNS[1:]:
        if name not in table.columns:
            table[name] = np.nan
            continue
        values = pd.to_numeric(table[name].str.strip(), errors="coerce")
        bad = ~(values > 0) | (values != values.round())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise LabelTableError(f"{path}: line {lines[row]} (ID {table['ID'].iloc[row]}): {name} "
                                  f"{table[name].iloc[row]!r} is not a positive integer")
        table[name] = values.astype(np.int64)
    duplicated = table["ID"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise LabelTableError(f"{path}: line {lines[row]}: duplicate ID {table['ID'].iloc[row]}")
    return table
