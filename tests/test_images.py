import cv2
import numpy as np
import pytest

from src.data.cache import cache_one, load_cached, load_field
from src.data.images import RGBY, ImageReadError, read_channel, read_field, resize_field, to_uint8, write_channel
from src.data.schema import DatasetLayout
from src.preprocessing.cache_images import cache_dataset


def random_planes(rng, shape, dtype=np.uint8, count=4):
    high = 256 if dtype == np.uint8 else 65536
    return [rng.integers(0, high, shape, dtype=dtype) for _ in range(count)]


def write_field(folder, image_id, planes, ext="png", channels=RGBY):
    for name, plane in zip(channels, planes):
        write_channel(folder / f"{image_id}_{name}.{ext}", plane)


def test_to_uint8_scaling_by_hand():
    values = np.array([0, 128, 129, 257, 385, 65535], dtype=np.uint16)
    # round(v / 257): 0, 0.498 -> 0, 0.502 -> 1, 1, 1.498 -> 1, 255
    assert to_uint8(values).tolist() == [0, 0, 1, 1, 1, 255]
    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_read_8_and_16_bit(tmp_path, ext):
    rng = np.random.default_rng(0)
    planes8 = random_planes(rng, (40, 50))
    write_field(tmp_path, "a", planes8, ext)
    field = read_field(tmp_path, "a")
    assert field.shape == (40, 50, 4) and field.dtype == np.uint8
    for c in range(4):
        np.testing.assert_array_equal(field[..., c], planes8[c])
    planes16 = random_planes(rng, (40, 50), np.uint16)
    write_field(tmp_path, "b", planes16, ext)
    field16 = read_field(tmp_path, "b")
    expected = np.rint(planes16[2] / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(field16[..., 2], expected)


def test_jpeg_channel_order_and_n_channels(tmp_path):
    planes = [np.full((16, 16), v, np.uint8) for v in (10, 80, 160, 240)]
    write_field(tmp_path, "j", planes, "jpg")
    field = read_field(tmp_path, "j", channels=("yellow", "blue"))
    assert field.shape == (16, 16, 2)
    assert abs(int(field[..., 0].mean()) - 240) <= 2 and abs(int(field[..., 1].mean()) - 160) <= 2


def test_resize_and_colour_file(tmp_path):
    field = np.zeros((64, 64, 5), np.uint8)
    field[:32] = 200
    small = resize_field(field, 32)
    assert small.shape == (32, 32, 5) and small[:16].min() == 200 and small[16:].max() == 0
    assert resize_field(field, (16, 8)).shape == (16, 8, 5)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 1] = 90  # signal stored in one colour plane
    cv2.imwrite(str(tmp_path / "c_red.png"), colour)
    assert read_channel(tmp_path / "c_red.png").max() == 90


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated_png", "truncated_jpg", "garbage", "shape"])
def test_bad_files_raise_one_clear_error(tmp_path, damage):
    rng = np.random.default_rng(1)
    ext = "jpg" if damage == "truncated_jpg" else "png"
    write_field(tmp_path, "x", random_planes(rng, (64, 64)), ext)
    target = tmp_path / f"x_green.{ext}"
    if damage == "missing":
        target.unlink()
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage.startswith("truncated"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "garbage":
        target.write_bytes(b"not an image at all")
    else:
        write_channel(target, np.zeros((32, 64), np.uint8))
    with pytest.raises(ImageReadError) as info:
        read_field(tmp_path, "x")
    assert info.value.path.name.startswith("x_green")
    assert "x_green" in str(info.value)


def test_cache_equals_direct_decode(small_synthetic):
    layout = small_synthetic
    failures = cache_dataset(layout, "train", size=64)
    assert failures == []
    ids = sorted(p.stem for p in layout.cache_dir(64).glob("*.npy"))
    assert len(ids) == 40
    for image_id in ids[:5]:
        direct = read_field(layout.image_dir("train"), image_id, size=64)
        cached = load_cached(layout.cache_path(64, image_id))
        np.testing.assert_array_equal(cached, direct)
        np.testing.assert_array_equal(load_field(layout, "train", image_id, 64), direct)
        np.testing.assert_array_equal(load_cached(layout.cache_path(64, image_id), mmap=True)[10:20], direct[10:20])
    # Resumable: a second pass writes nothing and keeps the files.
    before = {p: p.stat().st_mtime_ns for p in layout.cache_dir(64).glob("*.npy")}
    assert cache_one(layout.image_dir("train"), ids[0], layout.cache_path(64, ids[0]), 64) is False
    assert cache_dataset(layout, "train", size=64) == []
    assert before == {p: p.stat().st_mtime_ns for p in layout.cache_dir(64).glob("*.npy")}


def test_cache_reports_unreadable_fields_and_leaves_no_partial_file(tmp_path):
    rng = np.random.default_rng(2)
    layout = DatasetLayout(tmp_path)
    (tmp_path / "train.csv").write_text("ID,Label\ngood,1\nbad,2\n")
    write_field(layout.image_dir("train"), "good", random_planes(rng, (32, 32)))
    write_field(layout.image_dir("train"), "bad", random_planes(rng, (32, 32)))
    (layout.image_dir("train") / "bad_blue.png").write_bytes(b"")
    failures = cache_dataset(layout, "train", size=16)
    assert [image_id for image_id, _ in failures] == ["bad"] and "bad_blue.png" in failures[0][1]
    assert sorted(p.name for p in layout.cache_dir(16).iterdir()) == ["good.npy"]


def test_real_hpa_fields(hpa_samples):
    image_id = "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"
    field = read_field(hpa_samples / "images", image_id)
    assert field.shape == (2048, 2048, 4) and field.dtype == np.uint8
    assert field[..., 2].max() > 100  # nuclei are bright in blue
    small = read_field(hpa_samples / "images", image_id, size=512)
    assert small.shape == (512, 512, 4)
    assert abs(float(small.mean()) - float(field.mean())) < 1.0


def test_full_resolution_uses_square_cache_and_never_squeezes(tmp_path):
    from src.data.cache import load_full_resolution
    from src.utils.io import save_npy_atomic

    rng = np.random.default_rng(5)
    layout = DatasetLayout(tmp_path)
    write_field(layout.image_dir("train"), "wide", random_planes(rng, (24, 40)))
    field = load_full_resolution(layout, "train", "wide", (24, 40))
    assert field.shape == (24, 40, 4)
    write_field(layout.image_dir("train"), "sq", random_planes(rng, (32, 32)))
    marker = np.full((32, 32, 4), 7, np.uint8)  # differs from the PNGs: proves the cache was read
    save_npy_atomic(marker, layout.cache_path(32, "sq"))
    np.testing.assert_array_equal(load_full_resolution(layout, "train", "sq", (32, 32)), marker)
    save_npy_atomic(marker, layout.cache_path(24, "wide"))
    assert load_full_resolution(layout, "train", "wide", (24, 40)).shape == (24, 40, 4)


def test_native_cache_keeps_16_bit_non_square_fields_at_their_own_size(tmp_path, caplog):
    import argparse
    import logging

    from src.data.cache import load_full_resolution
    from src.data.schema import NATIVE
    from src.preprocessing.cache_images import cache_size

    rng = np.random.default_rng(9)
    layout = DatasetLayout(tmp_path)
    (tmp_path / "train.csv").write_text("ID,Label\nwide,1\ntall,2\n")
    planes = {"wide": random_planes(rng, (24, 40), np.uint16), "tall": random_planes(rng, (40, 24), np.uint16)}
    for image_id, field_planes in planes.items():
        write_field(layout.image_dir("train"), image_id, field_planes)
    assert cache_dataset(layout, "train", size=NATIVE) == []
    for image_id, field_planes in planes.items():
        # 16-bit v -> round(v / 257), by hand; the field's own shape, no padding
        expected = np.stack([np.floor(p / 257 + 0.5) for p in field_planes], axis=-1).astype(np.uint8)
        cached = np.load(layout.cache_path(NATIVE, image_id))
        assert cached.shape == field_planes[0].shape + (4,)
        np.testing.assert_array_equal(cached, expected)
        loaded = load_full_resolution(layout, "train", image_id, field_planes[0].shape, mmap=True)
        assert isinstance(loaded, np.memmap)  # read from the cache, not decoded
        np.testing.assert_array_equal(loaded, expected)
    # a second pass writes nothing
    before = {p: p.stat().st_mtime_ns for p in layout.cache_dir(NATIVE).glob("*.npy")}
    assert cache_dataset(layout, "train", size=NATIVE) == [] and before == {
        p: p.stat().st_mtime_ns for p in layout.cache_dir(NATIVE).glob("*.npy")}
    # a native file whose shape is not the record's: one warning, the field decoded instead
    np.save(layout.cache_path(NATIVE, "wide"), np.zeros((40, 24, 4), np.uint8))
    with caplog.at_level(logging.WARNING):
        loaded = load_full_resolution(layout, "train", "wide", (24, 40), mmap=True)
    assert not isinstance(loaded, np.memmap) and loaded.shape == (24, 40, 4) and loaded.any()
    assert any("holds a 40x24 field, not 24x40" in r.getMessage() for r in caplog.records)
    assert cache_size("native") == NATIVE and cache_size("64") == 64
    for bad in ("0", "-3", "big", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            cache_size(bad)
