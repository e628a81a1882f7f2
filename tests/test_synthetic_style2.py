import numpy as np
import pandas as pd
import cv2

from src.data.classes import CLASS_INDEX, NEGATIVE
from src.data.images import channel_path, read_field
from src.data.labels import parse_label_string, read_label_table
from src.data.make_synthetic import main as make_synthetic_main
from src.data.make_synthetic import write_synthetic_dataset
from src.data.synthetic import image_labels_from_cells
from src.data.synthetic_style2 import Style2Config, make_field_style2


def test_style2_truth_is_consistent_with_labels_masks_and_sizes(tmp_path):
    layout = write_synthetic_dataset(tmp_path / "s2", 6, 2, Style2Config(sizes=(96, 128), label_noise=0.0), seed=4)
    cells = pd.read_csv(layout.truth_cell_labels_csv, dtype={"ID": str, "labels": str})
    clean = pd.read_csv(layout.truth_image_labels_csv, dtype={"ID": str, "Label": str})
    train = read_label_table(layout.train_csv)
    tests = pd.read_csv(layout.test_csv, dtype={"ID": str})
    sizes = set()
    for image_id, group in cells.groupby("ID", sort=False):
        split = group["split"].iloc[0]
        mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        assert sorted(np.unique(mask[mask > 0])) == sorted(group["cell_id"])
        per_cell = [set(parse_label_string(s)) for s in group["labels"]]
        label = clean.loc[clean["ID"] == image_id, "Label"].item()
        assert parse_label_string(label) == image_labels_from_cells(per_cell, 0.5)
        if split == "train":
            assert train.loc[train["ID"] == image_id, "Label"].item() == label  # label noise off
        else:
            row = tests[tests["ID"] == image_id].iloc[0]
            assert (row["ImageHeight"], row["ImageWidth"]) == mask.shape
        # 16-bit files, read as uint8 by round(v / 257)
        raw = cv2.imread(str(channel_path(layout.image_dir(split), image_id, "blue")), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == mask.shape
        field = read_field(layout.image_dir(split), image_id)
        assert np.array_equal(field[..., 2], np.round(raw / 257).astype(np.uint8))
        sizes.add(mask.shape)
    assert len(sizes) > 1  # field sizes vary
    assert set(clean["ID"]) == set(cells["ID"]) and len(clean) == 8


def test_style2_cells_show_their_patterns():
    rng = np.random.default_rng(11)
    config = Style2Config(sizes=(128,), negative_image_rate=0.2)
    green_by_class: dict[int, list[float]] = {}
    nuclear_ratio = []
    for _ in range(25):
        field, mask, cell_classes = make_field_style2(rng, config)
        green = field[..., 1].astype(float)
        background = np.median(green[mask == 0]) if (mask == 0).any() else 0.0
        for cell_id, classes in enumerate(cell_classes, start=1):
            inside = mask == cell_id
            if inside.sum() < 100:
                continue
            signal = np.percentile(green[inside], 99) - background
            for cls in classes:
                green_by_class.setdefault(cls, []).append(signal)
            if classes == {CLASS_INDEX["Nucleoplasm"]}:
                blue = field[..., 2].astype(float)
                nucleus = inside & (blue > np.percentile(blue[inside], 70))
                nuclear_ratio.append(green[nucleus].mean() / max(green[inside & ~nucleus].mean(), 1.0))
    negative = np.median(green_by_class[NEGATIVE])
    drawn = [cls for cls in green_by_class if cls != NEGATIVE and len(green_by_class[cls]) >= 5]
    assert len(drawn) >= 6
    for cls in drawn:  # every drawn class lights its cells well above the negative cells
        assert np.median(green_by_class[cls]) > negative + 1000 / 257, cls
    assert np.median(nuclear_ratio) > 2


def test_style2_cli_keeps_its_dataset_and_is_deterministic(tmp_path):
    args = ["--style", "2", "--n-train", "2", "--n-test", "1"]
    assert make_synthetic_main(["--out", str(tmp_path / "a"), *args]) == 0
    stamp = (tmp_path / "a" / "train.csv").stat().st_mtime_ns
    assert make_synthetic_main(["--out", str(tmp_path / "a"), *args]) == 0  # same settings: kept
    assert (tmp_path / "a" / "train.csv").stat().st_mtime_ns == stamp
    assert make_synthetic_main(["--out", str(tmp_path / "b"), *args]) == 0
    for name in ("train.csv", "test.csv", "truth/cell_labels.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    style1 = tmp_path / "c"
    assert make_synthetic_main(["--out", str(style1), "--n-train", "2", "--n-test", "1", "--image-size", "96"]) == 0
    # the style's own random streams: no image ID shared with style 1 at the same seed
    assert not set(read_label_table(style1 / "train.csv")["ID"]) & set(read_label_table(tmp_path / "a" / "train.csv")["ID"])
