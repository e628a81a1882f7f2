import numpy as np
import pandas as pd
import pytest

from src.data.classes import CLASS_NAMES, NEGATIVE, NUM_CLASSES, class_index
from src.data.labels import (LabelTableError, format_labels, labels_to_multihot, multihot_to_labels,
                             parse_label_string, read_label_table, read_label_tables)


def test_class_table():
    assert NUM_CLASSES == 19 and NEGATIVE == 18 and CLASS_NAMES[11] == "Mitotic spindle"
    assert class_index("mitotic SPINDLE") == 11 and class_index("7") == 7 and class_index(0) == 0
    with pytest.raises(ValueError):
        class_index("Peroxisomes")
    with pytest.raises(ValueError):
        class_index(19)


def test_parse_and_format():
    assert parse_label_string("8|5|0") == [8, 5, 0]
    assert parse_label_string(" 18 ") == [18]
    assert parse_label_string("13|13") == [13]
    assert format_labels([8, 5, 0]) == "8|5|0"
    for bad in ["", "nan", "1||2", "19", "-1", "a"]:
        with pytest.raises(ValueError):
            parse_label_string(bad)


def test_multihot_round_trip():
    strings = ["0|5|8", "18", "11|2"]
    multihot = labels_to_multihot(strings)
    assert multihot.shape == (3, 19) and multihot.dtype == np.uint8
    assert multihot[0].nonzero()[0].tolist() == [0, 5, 8]
    assert multihot.sum() == 6
    assert multihot_to_labels(multihot) == ["0|5|8", "18", "2|11"]
    with pytest.raises(ValueError):
        multihot_to_labels(np.zeros((1, 19)))
    with pytest.raises(ValueError):
        multihot_to_labels(np.zeros((1, 18)))


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_label_table_normalises_and_flags_source(tmp_path):
    table = read_label_table(write(tmp_path, "ID,Label\na,8|5|0\nb, 18\n"), "train")
    assert table["Label"].tolist() == ["8|5|0", "18"]
    assert table["source"].tolist() == ["train", "train"]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("ID,Label\n", "no rows"),
    ("ID,Labels\na,1\n", "missing column"),
    ("ID,Label\na,1\nb,\n", "line 3"),
    ("ID,Label\na,1\nb,19\n", "line 3 (ID b): label id 19"),
    ("ID,Label\na,1\nb,2\na,3\n", "line 4: duplicate ID a"),
    ("ID,Label\na,1\n,2\n", "line 3: empty ID"),
])
def test_read_label_table_errors_name_the_row(tmp_path, text, message):
    with pytest.raises(LabelTableError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_label_table(write(tmp_path, text))


def test_missing_table_is_clear(tmp_path):
    with pytest.raises(LabelTableError, match="not found"):
        read_label_table(tmp_path / "nope.csv")


def test_public_table_with_urls_and_extra_columns(tmp_path):
    train = write(tmp_path, "ID,Label\na,1\n", "train.csv")
    public = write(tmp_path, "Image,Label,Cellline\nhttps://x.org/10005/921_B9_1,0|16,U-2 OS\n", "public.csv")
    table = read_label_tables(train, public)
    assert table["ID"].tolist() == ["a", "921_B9_1"]
    assert table["source"].tolist() == ["train", "public"]
    assert table["Cellline"].iloc[1] == "U-2 OS"
    clash = write(tmp_path, "ID,Label\na,2\n", "clash.csv")
    with pytest.raises(LabelTableError, match="both"):
        read_label_tables(train, clash)


def test_full_hpa_label_table(hpa_samples):
    table = read_label_table(hpa_samples / "hpa2021_train_labels.csv")
    assert len(table) == 21806
    multihot = labels_to_multihot(table["Label"].tolist())
    assert (multihot.sum(axis=1) >= 1).all()
    # Round trip up to ordering of classes within a row.
    raw = pd.read_csv(hpa_samples / "hpa2021_train_labels.csv", dtype=str)
    expected = [sorted(set(int(v) for v in text.split("|"))) for text in raw["Label"]]
    assert [list(map(int, s.split("|"))) for s in multihot_to_labels(multihot)] == expected
