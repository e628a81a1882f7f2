"""The hpacellseg backend without the package: TorchScript stand-ins of the published U-Nets saved to
files and loaded through the real loader; the package's pre-processing against scikit-image's
rescale; batched = one field at a time; label_cell's re-implementation on hand-built probability
maps; wrong model files stop the CLI at start-up with one line."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from src.data.bbox_records import read_record
from src.preprocessing import generate_cell_bboxes as cli
from src.segmentation import make_segmenter
from src.segmentation.hpa_labels import LabelSizes, fill_holes, label_cells_from_maps, thick_boundaries
from src.segmentation.hpa_models import (NORMALISE_FACTOR, NORMALISE_MEAN, HpaModelError, load_model, predict,
                                         rescale_planes)
from src.segmentation.hpa_stand_in import StandInUNet, cell_stand_in, nuclei_stand_in, save_torchscript
from src.utils.io import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny stand-ins run faster on one thread, and much faster when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    files = {name: folder / f"{name}.pth" for name in ("nuclei", "cell", "random_a", "random_b")}
    save_torchscript(nuclei_stand_in(), files["nuclei"])
    save_torchscript(cell_stand_in(), files["cell"])
    save_torchscript(StandInUNet(seed=3), files["random_a"])
    save_torchscript(StandInUNet(seed=4), files["random_b"])
    return files


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


CENTRES = [(60, 70), (60, 190), (180, 130)]


def _field(shape=(256, 256), shift: int = 0) -> np.ndarray:
    """Three cells (nucleus radius 14, body 45); a debris speck with a little cytoplasm; a small
    cell cut by the left border."""
    blue = np.zeros(shape, np.uint8)
    body = np.zeros(shape, bool)
    for y, x in CENTRES:
        blue[_disc(shape, (y, x + shift), 14)] = 200
        body |= _disc(shape, (y, x + shift), 45)
    blue[_disc(shape, (215, 35), 2)] = 220
    body |= _disc(shape, (215, 35), 14)
    blue[_disc(shape, (128, 0), 12)] = 200
    body |= _disc(shape, (128, 0), 16)
    red = np.where(body, 60, 3).astype(np.uint8)
    yellow = np.where(body, 50, 2).astype(np.uint8)
    return np.stack([red, np.full(shape, 9, np.uint8), blue, yellow], axis=-1)


def test_stand_ins_end_to_end(model_files):
    segmenter = make_segmenter("hpacellseg", nuclei_model=model_files["nuclei"], cell_model=model_files["cell"],
                               device="cpu")
    nuclei, cells = segmenter.segment(_field())
    assert cells.dtype == nuclei.dtype == np.uint16 and cells.shape == (256, 256) and cells.max() == 3
    for centre in CENTRES:
        label = cells[centre]
        # the nucleus is the blue disc exactly; label_cell's two boundary erasures shrink the body by 2 px
        assert np.array_equal(nuclei == label, _disc(cells.shape, centre, 14))
        assert (cells == label)[_disc(cells.shape, centre, 42)].all()
        assert not (cells == label)[~_disc(cells.shape, centre, 45)].any()
    assert cells[215, 35] == 0 and cells[128, 3] == 0  # debris nucleus below the size cut; border sliver
    mixed = make_segmenter("hpacellseg", nuclei_model=model_files["nuclei"], cell_model=model_files["cell"],
                           device="cpu", amp=True)  # autocast (bfloat16 on CPU): the same cells here
    assert np.array_equal(mixed.segment(_field())[1], cells)


def test_rescale_matches_scikit_image():
    from skimage.transform import rescale

    planes = np.random.default_rng(0).integers(0, 256, (128, 96, 3), dtype=np.uint8)
    for scale in (0.25, 0.3, 1.0):
        ours = rescale_planes(planes, scale)
        reference = rescale(planes, scale, channel_axis=-1, order=1)  # what the package calls, today's API
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() < 2e-3


class _Echo(torch.nn.Module):
    def forward(self, x):
        return x


def test_normalisation_is_the_packages(tmp_path):
    path = tmp_path / "echo.pt"
    save_torchscript(_Echo(), path)
    model = load_model(path, "nuclei", torch.device("cpu"))
    grey = np.array([0, 124, 255], np.float32)
    batch = np.broadcast_to((grey / 255)[None, :, None, None], (1, 3, 2, 2)).copy()
    probabilities = predict(model, batch, torch.device("cpu"))[0, :, 0, 0].numpy()
    normalised = (grey / 255 - np.array(NORMALISE_MEAN)) * NORMALISE_FACTOR  # (x - mean) / std, std = 1/(0.0167*255)
    expected = np.exp(normalised) / np.exp(normalised).sum()
    assert np.allclose(probabilities, expected, atol=1e-6)


def test_batched_equals_one_field_at_a_time(model_files):
    fields = [_field(), _field(shift=5), _field(shift=-7), _field((200, 256), shift=3), _field()[:, ::-1].copy()]
    for nuclei_file, cell_file in ((model_files["random_a"], model_files["random_b"]),
                                   (model_files["nuclei"], model_files["cell"])):
        batched = make_segmenter("hpacellseg", nuclei_model=nuclei_file, cell_model=cell_file, device="cpu",
                                 batch_size=3)
        single = make_segmenter("hpacellseg", nuclei_model=nuclei_file, cell_model=cell_file, device="cpu",
                                batch_size=1)
        for together, alone in zip(batched.predict_maps(fields), [single.predict_maps([f])[0] for f in fields]):
            for a, b in zip(together, alone):
                assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1
        masks = batched.segment_batch(fields)
        for field, (nuclei, cells) in zip(fields, masks):
            one_nuclei, one_cells = single.segment(field)
            assert np.array_equal(nuclei, one_nuclei) and np.array_equal(cells, one_cells)
    assert masks[3][1].shape == (200, 256) and masks[3][1].max() == 3  # padded to multiples of 32 and back


def test_fast_boundaries_and_hole_filling_equal_the_library_versions():
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(2)
    for _ in range(5):
        labels = ndi.label(ndi.gaussian_filter(rng.random((64, 80)), 2) > 0.5)[0]
        labels[rng.random(labels.shape) < 0.05] = 0  # pinholes
        assert np.array_equal(thick_boundaries(labels), find_boundaries(labels, connectivity=1, mode="thick"))
        assert np.array_equal(fill_holes(labels > 0), ndi.binary_fill_holes(labels > 0))


SMALL = LabelSizes(nucleus_seed_min=20, nucleus_hole_max=40, nucleus_speck_min=2, nucleus_min=50, cell_min=300,
                   closing_radius=1)


def _maps(shape, nucleus_discs, cell_interior, nucleus_border=None, cell_border=None):
    nuclei_pred = np.zeros(shape + (3,), np.uint8)
    cell_pred = np.zeros(shape + (3,), np.uint8)
    for centre, radius in nucleus_discs:
        nuclei_pred[..., 2][_disc(shape, centre, radius)] = 255
    cell_pred[..., 2] = cell_interior
    if nucleus_border is not None:
        nuclei_pred[..., 1] = nucleus_border
    if cell_border is not None:
        cell_pred[..., 1] = cell_border
    return nuclei_pred, cell_pred


def _label_cell_by_library_calls(nuclei_pred, cell_pred, sizes):
    """A slow reference: the package's label_cell step by step with scikit-image / scipy calls of
    today's API (max_size = the package's min_size - 1), float maps as the package computes them."""
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology, segmentation

    def fill(labels):
        labels = labels * ~segmentation.find_boundaries(labels)
        return ndi.label(ndi.binary_fill_holes(labels > 0))[0]

    def small(labels, size):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Only one label")
            return morphology.remove_small_objects(labels, max_size=int(size) - 1)

    interior = nuclei_pred[..., 2] / 255.0
    away = 1 - (nuclei_pred[..., 1] + cell_pred[..., 1]) / 255.0 > 0.05
    seeds = small(interior * away > 0.4 - 0.25, sizes.nucleus_seed_min)
    mask = morphology.remove_small_holes(interior > 0.4, max_size=int(sizes.nucleus_hole_max) - 1)
    mask = small(mask, sizes.nucleus_speck_min)
    nuclei = segmentation.watershed(mask.astype(np.uint8), ndi.label(seeds)[0], mask=mask, watershed_line=True)
    nuclei = measure.label(small(nuclei, sizes.nucleus_min))
    cell = cell_pred[..., 2] / 255.0
    threshold = max(0.22, filters.threshold_otsu(cell) * 0.5)
    landscape = -cell_pred[..., 2].astype(float)
    cells = segmentation.watershed(landscape, nuclei, mask=cell > threshold)
    cells = small(cells, sizes.cell_min).astype(np.uint8)
    cells = fill(morphology.closing(cells, morphology.disk(int(sizes.closing_radius))))
    cells = fill(segmentation.watershed(landscape, cells, mask=(cells > 0) | (cell_pred[..., 1] / 255.0 > 0.05)))
    cells = measure.label(small(measure.label(cells > 0), sizes.cell_min)).astype(np.uint16)
    nuclei = small(measure.label((cells > 0) & (nuclei > 0)), sizes.nucleus_min)
    return cells * (nuclei > 0), cells


def test_label_cell_equals_the_library_call_reference_on_random_maps():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    sizes = LabelSizes(nucleus_seed_min=15, nucleus_hole_max=30, nucleus_speck_min=3, nucleus_min=40, cell_min=150,
                       closing_radius=2)
    for _ in range(4):
        maps = []
        for sigma, offsets in ((4, (0, -2, 0)), (6, (0, -1.5, 1))):  # smooth random logits per channel
            logits = ndi.gaussian_filter(rng.standard_normal((3, 128, 144)), (0, sigma, sigma))
            logits = logits / logits.std(axis=(1, 2), keepdims=True) * 3 + np.array(offsets)[:, None, None]
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=0)
            prediction = np.rint(probabilities.transpose(1, 2, 0) * 255).astype(np.uint8)
            prediction[..., 0] = 0
            maps.append(prediction)
        ours = label_cells_from_maps(*maps, sizes)
        reference = _label_cell_by_library_calls(*maps, sizes)
        assert ours[1].max() >= 5
        assert np.array_equal(ours[0], reference[0]) and np.array_equal(ours[1], reference[1])


def test_touching_cells_split_along_the_dim_valley():
    shape = (128, 160)
    interior = np.zeros(shape, np.uint8)
    interior[20:108, 5:155] = 255
    interior[20:108, 90] = 100  # a dim valley, still above the cell threshold
    nuclei, cells = label_cells_from_maps(*_maps(shape, [((64, 40), 10), ((64, 130), 10)], interior), SMALL)
    assert cells.max() == 2 and nuclei.max() == 2
    left, right = cells[64, 40], cells[64, 130]
    assert left != right and left > 0 and right > 0
    assert np.array_equal(nuclei == left, _disc(shape, (64, 40), 10))
    assert np.array_equal(nuclei == right, _disc(shape, (64, 130), 10))
    columns_left = np.nonzero((cells == left).any(axis=0))[0]
    columns_right = np.nonzero((cells == right).any(axis=0))[0]
    assert columns_left.max() < 90 < columns_right.min()
    assert (cells[23:105, 8:87] == left).all() and (cells[23:105, 93:152] == right).all()
    assert not cells[interior == 0].any()


def test_nucleus_border_map_splits_touching_nuclei():
    shape = (96, 128)
    interior = np.zeros(shape, np.uint8)
    interior[10:86, 10:118] = 255
    discs = [((48, 54), 12), ((48, 74), 12)]  # overlapping: one blob
    line = np.zeros(shape, np.uint8)
    line[:, 64] = 255
    _, merged = label_cells_from_maps(*_maps(shape, discs, interior), SMALL)
    nuclei, cells = label_cells_from_maps(*_maps(shape, discs, interior, nucleus_border=line), SMALL)
    assert merged.max() == 1
    assert cells.max() == 2 and cells[48, 54] != cells[48, 74]
    assert set(np.unique(nuclei[nuclei > 0])) == {1, 2}
    # the package adds the two uint8 border maps in uint8: 200 + 100 wraps to 44, no border there
    _, wrapped = label_cells_from_maps(*_maps(shape, discs, interior, nucleus_border=np.where(line, 200, 0),
                                              cell_border=np.where(line, 100, 0)), SMALL)
    assert wrapped.max() == 1


def test_small_nuclei_and_their_cells_are_dropped_and_cells_grow_into_the_border_map():
    shape = (96, 160)
    interior = np.zeros(shape, np.uint8)
    interior[20:76, 10:70] = 255
    interior[20:76, 90:150] = 255
    border = np.zeros(shape, np.uint8)
    border[14:82, 4:76] = 255
    border[23:73, 13:67] = 0  # a ring of cell-border probability over the left cell's edge, 6 px outside it
    discs = [((48, 40), 10), ((48, 120), 3)]  # the right nucleus is below nucleus_min
    nuclei, cells = label_cells_from_maps(*_maps(shape, discs, interior, cell_border=border), SMALL)
    assert cells.max() == 1 and nuclei.max() == 1 and cells[48, 120] == 0
    rows, columns = np.nonzero(cells == 1)
    # grown over the ring: its outer edge (rows 14-81, columns 4-75) less the last 1-px boundary erasure
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (15, 80, 5, 74)


def test_loader_refuses_wrong_files_with_one_line(model_files, tmp_path):
    cpu = torch.device("cpu")
    text = tmp_path / "text.pth"
    text.write_text("not a model\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(model_files["nuclei"].read_bytes()[:2000])
    state_dict = tmp_path / "state_dict.pth"
    torch.save(nuclei_stand_in().state_dict(), state_dict)
    pickled = tmp_path / "pickled.pth"
    torch.save(nuclei_stand_in(), pickled)
    for path in (text, truncated, state_dict, pickled):
        with pytest.raises(HpaModelError, match="not a TorchScript archive.*--allow-pickled-model") as info:
            load_model(path, "nuclei", cpu)
        assert "\n" not in str(info.value)
    with pytest.raises(HpaModelError, match="of type OrderedDict, not a model"):
        load_model(state_dict, "nuclei", cpu, allow_pickled=True)
    assert isinstance(load_model(pickled, "nuclei", cpu, allow_pickled=True), StandInUNet)
    with pytest.raises(HpaModelError, match="not found"):
        load_model(tmp_path / "absent.pth", "nuclei", cpu)
    with pytest.raises(HpaModelError, match="needs a local nuclei model"):
        load_model(None, "nuclei", cpu)
    two_maps = tmp_path / "two_maps.pth"
    save_torchscript(torch.nn.Conv2d(3, 2, 1), two_maps)
    with pytest.raises(HpaModelError, match=r"gives \(1, 2, 64, 64\)"):
        make_segmenter("hpacellseg", nuclei_model=two_maps, cell_model=model_files["cell"], device="cpu")
    with pytest.raises(ValueError, match="unknown"):
        make_segmenter("cellpose")


def _cli_args(dataset: Path, output: Path, nuclei: Path, cell: Path) -> list[str]:
    return ["--dataset", str(dataset), "--output-dir", str(output), "--backend", "hpacellseg", "--nuclei-model",
            str(nuclei), "--cell-model", str(cell), "--limit", "3", "--no-progress"]


def test_cli_runs_on_stand_ins(small_synthetic, model_files, tmp_path):
    assert cli.main(_cli_args(small_synthetic.root, tmp_path, model_files["nuclei"], model_files["cell"])) == 0
    records = sorted((tmp_path / "bboxes" / "train").glob("*.npz"))
    assert len(records) == 3 and all(read_record(path).backend == "hpacellseg" for path in records)
    # Worker processes (spawned, not forked: the parent has run the models) write the same records.
    pooled = tmp_path / "pooled"
    args = _cli_args(small_synthetic.root, pooled, model_files["nuclei"], model_files["cell"])
    assert cli.main([*args, "--workers", "2", "--batch-size", "2"]) == 0
    for path in records:
        one, other = read_record(path), read_record(pooled / "bboxes" / "train" / path.name)
        assert np.array_equal(one.cell_mask, other.cell_mask) and np.array_equal(one.boxes, other.boxes)


def test_cli_stops_at_once_on_a_wrong_model_file(small_synthetic, model_files, tmp_path, capsys):
    text = tmp_path / "text.pth"
    text.write_text("not a model\n")
    command = [sys.executable, "-m", "src.preprocessing.generate_cell_bboxes",
               *_cli_args(small_synthetic.root, tmp_path / "out", text, model_files["cell"])]
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: nuclei model {text} is not")
    state_dict = tmp_path / "state_dict.pth"
    torch.save(cell_stand_in().state_dict(), state_dict)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli.main, _cli_args(small_synthetic.root, tmp_path / "out", model_files["nuclei"], state_dict))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: cell model {state_dict}")
    assert not list((tmp_path / "out").rglob("*.npz"))


def test_classical_backend_applies_the_same_fixes():
    _, cells = make_segmenter("classical").segment(_field())
    assert cells.max() == 3 and cells[215, 35] == 0 and cells[128, 3] == 0


class _FailsOnBlankFields:
    """A batching segmenter whose batch fails when one of its fields is blank."""

    name = "fake"

    def segment(self, field):
        if not field.any():
            raise ValueError("blank field")
        return field[..., 2], field[..., 0]

    def segment_batch(self, fields):
        return [self.segment(field) for field in fields]


def test_a_failing_batch_is_redone_field_by_field(monkeypatch):
    monkeypatch.setitem(cli._worker, "segmenter", _FailsOnBlankFields())
    fields = [_field(), np.zeros((256, 256, 4), np.uint8), _field(shift=4)]
    results = cli._segment_fields(fields)
    assert isinstance(results[1], ValueError)
    assert np.array_equal(results[0][1], fields[0][..., 0]) and np.array_equal(results[2][1], fields[2][..., 0])
