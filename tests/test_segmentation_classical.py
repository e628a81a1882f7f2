"""Classical segmentation: accuracy against synthetic truth and the HPA reference masks, the
shared clean-up rules, scale invariance, 16-bit and 3072-px inputs."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from src.data.images import read_field, resize_field, write_channel
from src.segmentation import make_segmenter
from src.segmentation.classical import ClassicalParams, segment_field, split_touching
from src.segmentation.matching import iou_matrix, match_masks
from src.segmentation.postprocess import drop_small_border_objects, drop_small_relative, fill_label_holes

HPA_IDS = ("000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0", "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0",
           "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0")


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _pooled(pairs):
    stats = [match_masks(reference, predicted) for reference, predicted in pairs]
    matched = sum(s.matched for s in stats) / sum(s.n_reference for s in stats)
    spurious = sum(s.unmatched_predicted for s in stats) / sum(s.n_predicted for s in stats)
    return matched, spurious


def test_synthetic_truth_bar(small_synthetic):
    """>= 95% of truth cells matched at IoU >= 0.6 and <= 5% spurious cells (train + test fields)."""
    pairs = []
    for split, csv in (("train", small_synthetic.train_csv), ("test", small_synthetic.test_csv)):
        for image_id in pd.read_csv(csv)["ID"]:
            field = read_field(small_synthetic.image_dir(split), image_id)
            truth = cv2.imread(str(small_synthetic.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
            pairs.append((truth, segment_field(field)[1]))
    matched, spurious = _pooled(pairs)
    assert matched >= 0.95 and spurious <= 0.05, (matched, spurious)


def test_mask_contract(small_synthetic):
    image_id = pd.read_csv(small_synthetic.train_csv)["ID"][0]
    field = read_field(small_synthetic.image_dir("train"), image_id)
    nuclei, cells = make_segmenter("classical").segment(field)
    assert nuclei.dtype == cells.dtype == np.uint16 and cells.shape == field.shape[:2]
    n = int(cells.max())
    assert n > 3 and set(np.unique(cells)) == set(range(n + 1))
    # nucleus k inside cell k, and every cell has a nucleus
    assert np.array_equal(nuclei[nuclei > 0], cells[nuclei > 0])
    assert set(np.unique(nuclei)) == set(range(n + 1))


def test_touching_cells_are_separated():
    """Two cells whose bodies and nuclei touch: two cells, split near the midline."""
    shape = (160, 240)
    blue = np.zeros(shape, np.uint8)
    blue[_disc(shape, (80, 95), 22) | _disc(shape, (80, 143), 22)] = 200  # nuclei overlap a little
    body = _disc(shape, (80, 80), 60) | _disc(shape, (80, 160), 60)
    red = np.where(body, 90, 5).astype(np.uint8)
    field = np.stack([red, np.zeros(shape, np.uint8), blue, red], axis=-1)
    _, cells = segment_field(field)
    assert cells.max() == 2
    left, right = cells[80, 60], cells[80, 180]
    assert left and right and left != right
    assert abs(int(np.nonzero(cells[80] == left)[0].max()) - 119) <= 8


def test_split_touching_keeps_single_blobs_whole():
    shape = (120, 200)
    two = _disc(shape, (60, 70), 25) | _disc(shape, (60, 115), 25)
    assert split_touching(two, depth=3.0).max() == 2
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    ellipse = ((yy - 60) / 18.0) ** 2 + ((xx - 100) / 60.0) ** 2 <= 1  # elongated (mitotic-like)
    assert split_touching(ellipse, depth=3.0).max() == 1
    textured = _disc(shape, (60, 100), 35)
    textured[50:70, 60:100] = False  # a deep notch is still one nucleus: its neck is wide
    assert split_touching(textured, depth=3.0).max() == 1


def test_small_nuclei_dropped_relative_to_median_at_any_scale():
    shape = (200, 200)
    labels = np.zeros(shape, np.uint16)
    for index, centre in enumerate([(40, 40), (40, 150), (150, 40), (150, 150)], start=1):
        labels[_disc(shape, centre, 18)] = index
    labels[_disc(shape, (100, 100), 4)] = 5  # ~50 px vs median ~1000 px
    kept = drop_small_relative(labels, 0.15)
    assert kept.max() == 4 and kept[100, 100] == 0
    big = cv2.resize(labels, (800, 800), interpolation=cv2.INTER_NEAREST)  # same field, 4x the pixels
    assert drop_small_relative(big, 0.15).max() == 4


def test_small_border_cells_dropped_large_ones_kept():
    shape = (200, 200)
    labels = np.zeros(shape, np.uint16)
    labels[_disc(shape, (100, 100), 40)] = 1
    labels[_disc(shape, (40, 150), 30)] = 2
    labels[_disc(shape, (100, 0), 12)] = 3     # small sliver cut by the left border
    labels[_disc(shape, (199, 100), 35)] = 4   # half a cell on the bottom border: large enough
    labels[_disc(shape, (170, 30), 8)] = 5     # small but not on the border
    out = drop_small_border_objects(labels, 0.15)
    assert out[100, 2] == 0 and out[195, 100] > 0 and out[170, 30] > 0 and out.max() == 4


def test_fill_label_holes_only_inside_one_label():
    labels = np.zeros((50, 50), np.uint16)
    labels[5:25, 5:25] = 1
    labels[10:15, 10:15] = 0                  # hole in cell 1
    labels[25:45, 5:45] = 2
    labels[30:40, 20:30] = 0                  # hole in cell 2
    filled = fill_label_holes(labels)
    assert (filled[10:15, 10:15] == 1).all() and (filled[30:40, 20:30] == 2).all()


def test_empty_and_flat_fields_give_no_cells():
    rng = np.random.default_rng(0)
    noise = np.clip(8 + 3 * rng.standard_normal((256, 256, 4)), 0, 255).astype(np.uint8)
    assert segment_field(noise)[1].max() == 0
    assert segment_field(np.zeros((128, 128, 4), np.uint8))[1].max() == 0


def test_16bit_input_same_cells_as_8bit(small_synthetic, tmp_path):
    image_id = pd.read_csv(small_synthetic.train_csv)["ID"][1]
    field8 = read_field(small_synthetic.image_dir("train"), image_id)
    for channel, name in enumerate(("red", "green", "blue", "yellow")):
        write_channel(tmp_path / f"{image_id}_{name}.png", field8[..., channel].astype(np.uint16) * 257)
    assert cv2.imread(str(tmp_path / f"{image_id}_blue.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    from_files = read_field(tmp_path, image_id)
    direct16 = field8.astype(np.uint16) * 257
    expected = segment_field(field8)[1]
    assert np.array_equal(segment_field(from_files)[1], expected)
    assert np.array_equal(segment_field(direct16)[1], expected)


def test_3072_px_field(small_synthetic):
    """A 3072-px field (the largest HPA size) segments like its small original, at full resolution."""
    image_id = pd.read_csv(small_synthetic.train_csv)["ID"][2]
    field = read_field(small_synthetic.image_dir("train"), image_id)
    truth = cv2.imread(str(small_synthetic.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
    big = resize_field(field, 3072)
    _, cells = segment_field(big)
    assert cells.shape == (3072, 3072)
    big_truth = cv2.resize(truth, (3072, 3072), interpolation=cv2.INTER_NEAREST)
    stats = match_masks(big_truth, cells)
    assert stats.match_rate >= 0.9 and stats.unmatched_predicted <= 1


def test_iou_matrix_counts():
    a = np.array([[1, 1, 0], [2, 2, 0]], np.uint16)
    b = np.array([[1, 0, 0], [2, 2, 2]], np.uint16)
    ious = iou_matrix(a, b)
    assert ious[0, 0] == pytest.approx(0.5) and ious[1, 1] == pytest.approx(2 / 3) and ious[0, 1] == 0


@pytest.mark.parametrize("size", [2048, 512])
def test_hpa_reference_match(hpa_samples, size):
    """Classical backend vs the HPA model's masks, at full size and downscaled to 512 px."""
    pairs = []
    for image_id in HPA_IDS:
        field = read_field(hpa_samples / "images", image_id, size=size)
        reference = cv2.imread(str(hpa_samples / "masks" / f"{image_id}_predictedmask.png"), cv2.IMREAD_UNCHANGED)
        reference = cv2.resize(reference, (size, size), interpolation=cv2.INTER_NEAREST)
        pairs.append((reference, segment_field(field, ClassicalParams())[1]))
    matched, _ = _pooled(pairs)
    assert matched >= 0.8, matched


def test_reconstruct_by_dilation_equals_skimage():
    """The fast reconstruction is the same fixed point as skimage's (slow reference)."""
    from skimage.morphology import reconstruction

    from src.segmentation.classical import reconstruct_by_dilation

    rng = np.random.default_rng(3)
    for _ in range(4):
        mask = cv2.GaussianBlur(rng.random((67, 91)).astype(np.float32), (0, 0), 2.5) * 10
        marker = np.maximum(mask - rng.uniform(0.05, 0.6), 0)
        expected = reconstruction(marker, mask, method="dilation")
        assert np.array_equal(reconstruct_by_dilation(marker, mask), expected.astype(np.float32))


def test_faint_cell_keeps_its_cytoplasm_next_to_a_bright_one():
    """A cell 12x fainter than its neighbour is outlined at its own edge, not cut to its brightest
    part by the field-wide threshold (the per-cell edge)."""
    shape = (200, 400)
    blue = np.zeros(shape, np.uint8)
    blue[_disc(shape, (100, 100), 20) | _disc(shape, (100, 300), 20)] = 180
    bright, faint = _disc(shape, (100, 100), 70), _disc(shape, (100, 300), 70)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    # the faint cell's cytoplasm fades from 20 grey levels at its nucleus to 8 at its edge
    fade = 20 - 12 * np.sqrt((yy - 100) ** 2 + (xx - 300) ** 2) / 70
    red = np.where(bright, 240, np.where(faint, fade, 0)).astype(np.uint8)
    field = np.stack([red, np.zeros(shape, np.uint8), blue, red], axis=-1)
    _, cells = segment_field(field)
    assert cells.max() == 2
    faint_label = cells[100, 300]
    assert faint_label and cells[100, 100] and faint_label != cells[100, 100]
    iou = ((cells == faint_label) & faint).sum() / ((cells == faint_label) | faint).sum()
    assert iou >= 0.85, iou


def test_refine_upscale_draws_outlines_at_full_resolution():
    """A disc found at 1/4 scale: the refined upscale follows the full-resolution outline of the
    (bilinearly upscaled) signal instead of 4-px stairs, and keeps the interior."""
    from src.segmentation.postprocess import refine_upscale, upscale_labels

    small_shape, full_shape = (48, 48), (192, 192)
    yy, xx = np.mgrid[:small_shape[0], :small_shape[1]]
    signal = np.clip(1.0 - np.hypot(yy - 23.5, xx - 23.5) / 30.0, 0, None).astype(np.float32)  # cone
    edge = np.array([np.inf, 0.5], np.float32)  # the cell ends where the cone falls to 0.5: radius 15
    labels = (signal > edge[1]).astype(np.uint16)
    fine_yy, fine_xx = np.mgrid[:full_shape[0], :full_shape[1]]
    fine_signal = cv2.resize(signal, full_shape[::-1], interpolation=cv2.INTER_LINEAR)
    truth = fine_signal > 0.5  # where the upscaled signal crosses the edge
    refined = refine_upscale(labels, signal, edge, full_shape)
    nearest = upscale_labels(labels, full_shape)
    assert np.array_equal(refined > 0, truth)
    assert ((nearest > 0) != truth).sum() > 50
    assert refined.dtype == np.uint16 and set(np.unique(refined)) == {0, 1}


def test_small_cells_are_looked_at_again_finer(monkeypatch):
    """A dense field of small cells (nuclei under min_nucleus_radius at the working scale) is
    segmented a second time at a finer scale, and its cells still match the truth."""
    from src.data.synthetic import SyntheticConfig, make_field
    from src.segmentation import classical

    field, truth, _ = make_field(np.random.default_rng(0),
                                 SyntheticConfig(image_size=1024, cells_min=60, cells_max=80, cell_radius=0.04))
    shapes = []
    real = classical.segment_nuclei
    monkeypatch.setattr(classical, "segment_nuclei", lambda blue, *args: shapes.append(blue.shape) or real(blue, *args))
    cells = classical.segment_field(field)[1]
    assert shapes[0] == (512, 512) and len(shapes) == 2 and 512 < shapes[1][0] <= 1024
    stats = match_masks(truth, cells)
    assert stats.match_rate >= 0.95 and stats.spurious_rate <= 0.05, stats
    shapes.clear()
    classical.segment_field(field, ClassicalParams(max_zoom=1.0))
    assert shapes == [(512, 512)]
