"""The bbox record format: boxes and alien indices against the mask, write/read round trips,
masked crops at the record's and at another resolution, empty and corrupt records."""
from __future__ import annotations

import numpy as np
import pytest

from src.data.bbox_records import (RecordError, build_cell_table, build_record, cell_crop_mask, list_record_ids,
                                   masked_crop, read_record, write_record)


def _random_cells(seed: int = 0, shape=(90, 120), n: int = 7) -> np.ndarray:
    """Touching, irregular cells: a Voronoi partition of a blob, labels 1..n."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform((10, 10), (shape[0] - 10, shape[1] - 10), size=(n, 2))
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    distance = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    labels = (np.argmin(distance, axis=-1) + 1).astype(np.uint16)
    labels[np.min(distance, axis=-1) > 28 ** 2] = 0
    return labels


def test_boxes_and_alien_indices_match_the_mask():
    mask = _random_cells()
    record = build_record("img", mask)
    assert record.n_cells == mask.max() == 7
    for cell_i in range(record.n_cells):
        ys, xs = np.nonzero(mask == cell_i + 1)
        y0, x0, y1, x1 = record.box(cell_i)
        assert (y0, x0, y1, x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        assert record.areas[cell_i] == ys.size
        # brute force: every pixel of the box that belongs to another cell, row-major
        expected = [r * (x1 - x0) + c for r in range(y1 - y0) for c in range(x1 - x0)
                    if mask[y0 + r, x0 + c] not in (0, cell_i + 1)]
        assert record.alien_indices(cell_i).tolist() == expected
    assert record.alien_flat_indices.dtype == np.int32 and record.boxes.dtype == np.int32
    assert sum(len(record.alien_indices(i)) for i in range(record.n_cells)) > 0  # the cells touch


def test_write_read_round_trip_is_exact_and_deterministic(tmp_path):
    mask = _random_cells(1)
    record = build_record("img", mask, backend="classical")
    write_record(tmp_path / "img.npz", record)
    write_record(tmp_path / "again.npz", record)
    assert (tmp_path / "img.npz").read_bytes() == (tmp_path / "again.npz").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    back = read_record(tmp_path / "img.npz")
    assert back.image_id == "img" and back.backend == "classical" and back.image_shape == mask.shape
    for name in ("cell_mask", "boxes", "areas", "alien_offsets", "alien_flat_indices"):
        assert np.array_equal(getattr(back, name), getattr(record, name)), name
        assert getattr(back, name).dtype == getattr(record, name).dtype, name
    light = read_record(tmp_path / "img.npz", load_mask=False)
    assert light.cell_mask is None and light.image_shape == mask.shape
    assert np.array_equal(light.alien_flat_indices, record.alien_flat_indices)


def test_masked_crop_round_trip():
    mask = _random_cells(2)
    rng = np.random.default_rng(3)
    field = rng.integers(1, 255, size=mask.shape + (4,), dtype=np.uint8)  # no zero pixels
    record = build_record("img", mask)
    for cell_i in range(record.n_cells):
        y0, x0, y1, x1 = record.box(cell_i)
        labels = mask[y0:y1, x0:x1]
        crop = masked_crop(field, record, cell_i)
        other = (labels != 0) & (labels != cell_i + 1)
        assert crop.shape == (y1 - y0, x1 - x0, 4)
        assert (crop[other] == 0).all()
        assert np.array_equal(crop[~other], field[y0:y1, x0:x1][~other])  # cell and background kept
        strict = masked_crop(field, record, cell_i, zero_background=True)
        assert (strict[labels != cell_i + 1] == 0).all()
        assert np.array_equal(strict[labels == cell_i + 1], field[y0:y1, x0:x1][labels == cell_i + 1])
        plane = masked_crop(field[..., 1], record, cell_i)  # a single channel works too
        assert np.array_equal(plane, crop[..., 1])
    assert (field != 0).all()  # the field itself is untouched


def test_masked_crop_on_a_downscaled_field():
    mask = np.kron(_random_cells(4, shape=(60, 80)), np.ones((2, 2), np.uint16))  # (120, 160)
    record = build_record("img", mask)
    half = np.full((60, 80), 7, np.uint8)
    for cell_i in range(record.n_cells):
        (y0, x0, y1, x1), labels = cell_crop_mask(record, cell_i, half.shape)
        crop = masked_crop(half, record, cell_i)
        ry0, rx0, ry1, rx1 = record.box(cell_i)
        assert (y0, x0, y1, x1) == (ry0 // 2, rx0 // 2, -(-ry1 // 2), -(-rx1 // 2))
        small = mask[::2, ::2][y0:y1, x0:x1]  # exact here: the mask is 2x2 blocks
        assert np.array_equal(labels, small)
        assert np.array_equal(crop == 0, (small != 0) & (small != cell_i + 1))


def test_empty_image_gives_an_empty_valid_record(tmp_path):
    record = build_record("blank", np.zeros((64, 48), np.uint16))
    assert record.n_cells == 0 and record.boxes.shape == (0, 4) and record.alien_offsets.tolist() == [0]
    write_record(tmp_path / "blank.npz", record)
    back = read_record(tmp_path / "blank.npz")
    assert back.n_cells == 0 and back.image_shape == (64, 48) and (tmp_path / "blank.npz").stat().st_size > 0
    table = build_cell_table(tmp_path)
    assert table.empty and list(table.columns)[:2] == ["ID", "cell_i"]
    with pytest.raises(IndexError):
        masked_crop(np.zeros((64, 48), np.uint8), back, 0)


def test_label_gaps_are_renumbered_in_order():
    mask = np.zeros((20, 20), np.uint16)
    mask[2:6, 2:6] = 3
    mask[10:15, 10:15] = 9
    record = build_record("gaps", mask)
    assert record.n_cells == 2 and record.cell_mask[3, 3] == 1 and record.cell_mask[12, 12] == 2


def test_corrupt_or_foreign_files_raise_record_error(tmp_path):
    write_record(tmp_path / "good.npz", build_record("good", _random_cells()))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "foreign.npz", x=np.arange(3))
    for name in ("cut.npz", "empty.npz", "foreign.npz"):
        with pytest.raises(RecordError, match=name):
            read_record(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "absent.npz")


def test_cell_table_lists_every_cell(tmp_path):
    for seed in range(3):
        write_record(tmp_path / f"im{seed}.npz", build_record(f"im{seed}", _random_cells(seed)))
    (tmp_path / ".im9.abc.tmp.npz").write_bytes(b"partial")  # a temporary file is not a record
    assert list_record_ids(tmp_path) == ["im0", "im1", "im2"]
    table = build_cell_table(tmp_path)
    assert len(table) == sum(build_record("x", _random_cells(s)).n_cells for s in range(3))
    first = table[table["ID"] == "im1"].iloc[2]
    assert (first["y0"], first["x0"], first["y1"], first["x1"]) == build_record("x", _random_cells(1)).box(2)


def _border_fractions_slow(mask: np.ndarray) -> np.ndarray:
    """Reference: walk every side of every cell pixel."""
    height, width = mask.shape
    outline = np.zeros(int(mask.max()) + 1)
    border = np.zeros(int(mask.max()) + 1)
    for y in range(height):
        for x in range(width):
            label = mask[y, x]
            if label == 0:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = y + dy, x + dx
                if not (0 <= ny < height and 0 <= nx < width):
                    border[label] += 1
                    outline[label] += 1
                elif mask[ny, nx] != label:
                    outline[label] += 1
    return border[1:] / outline[1:]


def test_border_fractions_hand_computed():
    from src.data.bbox_records import border_fractions

    mask = np.zeros((6, 8), np.uint16)
    mask[0:3, 0:4] = 1   # 3x4 in the top-left corner: top 4 + left 3 of 14 sides on the border
    mask[2:4, 6:8] = 2   # 2x2 against the right edge: 2 of 8
    mask[4, 2:5] = 3     # 1x3 inside the field: 0
    mask[5, 2:5] = 4     # 1x3 on the bottom row, under cell 3: the 3 bottom sides of 8
    mask[5, 7] = 5       # one pixel in the bottom-right corner: 2 of 4
    expected = [7 / 14, 2 / 8, 0.0, 3 / 8, 2 / 4]
    assert np.allclose(border_fractions(mask), expected)
    assert np.allclose(build_record("img", mask).border_fractions, expected)
    for seed in range(3):
        cells = _random_cells(seed, shape=(40, 50), n=5)  # touching cells, most on the border
        assert (border_fractions(cells) > 0).sum() >= 2
        assert np.allclose(border_fractions(cells), _border_fractions_slow(cells))


def _rewrite_record(path, version: int, drop: tuple[str, ...] = ()) -> None:
    """Rewrite a record file with another format_version and without the members in `drop`
    (format 1 records were written without border_fractions)."""
    import io
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name[:-4] not in drop}
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(np.int32(version)))
    members["format_version.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_format_1_records_stay_readable_and_unknown_formats_are_refused(tmp_path):
    mask = _random_cells(4)
    mask[:, :2] = mask[:, 2:4]  # some cells reach the left edge
    record = build_record("old", mask)
    assert record.border_fractions.max() > 0
    write_record(tmp_path / "old.npz", record)
    _rewrite_record(tmp_path / "old.npz", 1, drop=("border_fractions",))
    for load_mask in (False, True):
        back = read_record(tmp_path / "old.npz", load_mask=load_mask)
        assert np.array_equal(back.border_fractions, record.border_fractions)
        assert (back.cell_mask is None) == (not load_mask)
    assert np.allclose(build_cell_table(tmp_path)["border_fraction"], record.border_fractions)
    write_record(tmp_path / "future.npz", record)
    _rewrite_record(tmp_path / "future.npz", 99)
    write_record(tmp_path / "no_fractions.npz", record)
    _rewrite_record(tmp_path / "no_fractions.npz", 2, drop=("border_fractions",))
    for name, version in (("future.npz", 99), ("no_fractions.npz", 2)):
        with pytest.raises(RecordError, match=f"{name}: record format {version}"):
            read_record(tmp_path / name)


def test_read_cell_table_exposes_border_fraction_even_from_an_old_table(tmp_path):
    from src.data.bbox_records import CELL_TABLE_NAME, read_cell_table

    for seed in range(2):
        write_record(tmp_path / f"im{seed}.npz", build_record(f"im{seed}", _random_cells(seed)))
    table = build_cell_table(tmp_path)
    table.drop(columns="border_fraction").to_csv(tmp_path / CELL_TABLE_NAME, index=False)  # written by format 1 code
    read = read_cell_table(tmp_path)
    expected = np.concatenate([build_record("x", _random_cells(s)).border_fractions for s in range(2)])
    assert np.allclose(read["border_fraction"], expected)
    table.to_csv(tmp_path / CELL_TABLE_NAME, index=False)
    assert np.allclose(read_cell_table(tmp_path)["border_fraction"], expected)
