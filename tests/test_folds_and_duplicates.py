import numpy as np
import pandas as pd
import pytest

from src.data.images import RGBY, read_field, write_channel
from src.data.labels import read_label_table
from src.data.schema import DatasetLayout
from src.preprocessing import bestfitting_duplicates_search as dup
from src.preprocessing import create_imagelevel_folds as folds_cli
from src.preprocessing.create_imagelevel_folds import assign_folds, stratification_target
from src.utils.io import UserInputError


def per_fold_counts(table, folds):
    table = table.set_index("ID").loc[folds["ID"]].reset_index()
    target = stratification_target(table)
    return np.stack([target[folds["fold"].to_numpy() == k].sum(axis=0) for k in range(5)]), target.sum(axis=0) / 5


def check_folds(table, folds):
    assert sorted(folds["ID"]) == sorted(table["ID"])           # covers every image exactly once
    assert folds["ID"].is_unique and set(folds["fold"]) == set(range(5))
    counts, ideal = per_fold_counts(table, folds)
    assert np.abs(counts - ideal).max() <= 1.0                   # stratified: within 1 of the ideal count
    assert np.abs(np.bincount(folds["fold"]) - len(table) / 5).max() <= 0.05 * len(table) + 2


def test_folds_on_synthetic_are_disjoint_stratified_and_stable(small_synthetic, tmp_path):
    table = read_label_table(small_synthetic.train_csv)
    folds = assign_folds(table, 5, seed=0)
    check_folds(table, folds)
    shuffled = table.sample(frac=1.0, random_state=3)
    pd.testing.assert_frame_equal(assign_folds(shuffled, 5, seed=0), folds)  # row order does not matter
    out_a, out_b = tmp_path / "a.csv", tmp_path / "b.csv"
    for out in (out_a, out_b):
        assert folds_cli.main(["--dataset", str(small_synthetic.root), "--out", str(out)]) == 0
    assert out_a.read_bytes() == out_b.read_bytes()
    assert list(pd.read_csv(out_a).columns) == ["ID", "source", "fold"]


def test_folds_on_full_hpa_table_with_public_flag(hpa_samples):
    table = read_label_table(hpa_samples / "hpa2021_train_labels.csv")
    table.loc[table.index % 7 == 0, "source"] = "public"   # pretend every 7th image is public data
    folds = assign_folds(table, 5, seed=0)
    check_folds(table, folds)
    public_per_fold = folds.groupby("fold")["source"].apply(lambda s: (s == "public").sum())
    assert public_per_fold.max() - public_per_fold.min() <= 2


def test_too_few_images_is_a_clear_error():
    table = pd.DataFrame({"ID": ["a", "b"], "Label": ["1", "2"], "source": ["train", "train"]})
    with pytest.raises(UserInputError, match="cannot fill 5 folds"):
        assign_folds(table, 5)


def test_hash_distance_of_planted_copy_and_distinct_fields(small_synthetic):
    layout = small_synthetic
    ids = read_label_table(layout.train_csv)["ID"].tolist()[:12]
    fields = [read_field(layout.image_dir("train"), image_id) for image_id in ids]
    rng = np.random.default_rng(0)
    # planted copies: intensities scaled and noised slightly, one of them also flipped
    brighter = np.clip(fields[0].astype(float) * 1.08 + rng.normal(0, 3, fields[0].shape), 0, 255).astype(np.uint8)
    flipped = np.fliplr(np.clip(fields[1].astype(float) * 0.93 + 4, 0, 255).astype(np.uint8))
    codes = np.stack([dup.channel_hashes(f) for f in fields + [brighter, flipped]])
    names = ids + ["copy_of_0", "copy_of_1"]
    pairs = dup.find_pairs(names, codes, max_distance=12)
    found = {frozenset(p) for p in zip(pairs["ID_a"], pairs["ID_b"])}
    assert found == {frozenset((ids[0], "copy_of_0")), frozenset((ids[1], "copy_of_1"))}
    row = pairs[(pairs["ID_a"] == "copy_of_1") | (pairs["ID_b"] == "copy_of_1")].iloc[0]
    assert row["transform"] == "flip_lr"
    assert (pairs[["dist_red", "dist_green", "dist_blue"]].to_numpy() <= 12).all()
    assert (pairs["ID_a"] < pairs["ID_b"]).all()


def test_transform_recorded_turns_id_b_into_id_a():
    field = np.random.default_rng(4).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    field = np.repeat(np.repeat(field, 4, axis=0), 4, axis=1)  # blocky, so the hash is stable
    rotated = np.rot90(field, 1)
    codes = np.stack([dup.channel_hashes(field), dup.channel_hashes(rotated)])
    for names in (["a", "b"], ["b", "a"]):
        pairs = dup.find_pairs(names, codes)
        row = pairs.iloc[0]
        by_name = dict(zip(names, (field, rotated)))
        transformed = dup.TRANSFORMS[row["transform"]](by_name[row["ID_b"]][..., 0])
        np.testing.assert_array_equal(transformed, by_name[row["ID_a"]][..., 0])


def test_ids_to_drop_keeps_smallest_of_each_group():
    pairs = pd.DataFrame({"ID_a": ["b", "a", "x"], "ID_b": ["c", "b", "y"]})
    assert dup.ids_to_drop(pairs) == {"b", "c", "y"}


def test_cli_finds_planted_duplicate_and_folds_drop_it(tmp_path, small_synthetic):
    layout = DatasetLayout(tmp_path / "d")
    ids = read_label_table(small_synthetic.train_csv)["ID"].tolist()[:10]
    table = read_label_table(small_synthetic.train_csv).iloc[:10][["ID", "Label"]]
    for image_id in ids:
        field = read_field(small_synthetic.image_dir("train"), image_id)
        for c, name in enumerate(RGBY):
            write_channel(layout.image_dir("train") / f"{image_id}_{name}.png", field[..., c])
    copy = read_field(layout.image_dir("train"), ids[3])
    copy = np.clip(copy.astype(int) + 5, 0, 255).astype(np.uint8)
    for c, name in enumerate(RGBY):
        write_channel(layout.image_dir("train") / f"zz-copy_{name}.png", copy[..., c])
    table = pd.concat([table, pd.DataFrame({"ID": ["zz-copy"], "Label": [table["Label"].iloc[3]]})])
    table.to_csv(layout.train_csv, index=False)
    assert dup.main(["--dataset", str(layout.root)]) == 0
    pairs = dup.read_duplicates(layout.duplicates_csv)
    assert list(zip(pairs["ID_a"], pairs["ID_b"])) == [(ids[3], "zz-copy")]
    assert folds_cli.main(["--dataset", str(layout.root), "--drop-duplicates"]) == 0
    folds = pd.read_csv(layout.folds_csv)
    assert "zz-copy" not in set(folds["ID"]) and len(folds) == 10
    # an unreadable field is reported, not fatal
    (layout.image_dir("train") / f"{ids[0]}_red.png").write_bytes(b"")
    assert dup.main(["--dataset", str(layout.root), "--out", str(tmp_path / "p.csv")]) == 1
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1
