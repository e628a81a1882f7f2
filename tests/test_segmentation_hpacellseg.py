"""The hpacellseg backend, wired against a stand-in package with the same API: model paths and
scale factor passed through, channel layout as the package expects, our fixes applied after its
label_cell, and clear errors when the package or a model file is missing."""
from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from src.segmentation import make_segmenter
from src.segmentation.hpacellseg_backend import HpaCellSegUnavailable, hpacellseg_available

STAND_IN = {
    "hpacellseg/__init__.py": "",
    "hpacellseg/cellsegmentator.py": '''
        import numpy as np

        CALLS = []


        class CellSegmentator:
            def __init__(self, nuclei_model="./nuclei_model.pth", cell_model="./cell_model.pth", scale_factor=0.25,
                         device="cuda", padding=False, multi_channel_model=True):
                CALLS.append(("init", dict(nuclei_model=nuclei_model, cell_model=cell_model, scale_factor=scale_factor,
                                           device=device, padding=padding, multi_channel_model=multi_channel_model)))

            def pred_nuclei(self, images):
                CALLS.append(("pred_nuclei", images))
                out = []
                for image in images:
                    prediction = np.zeros(image.shape + (3,), np.uint8)
                    prediction[..., 2] = np.where(image > 60, 255, 0)
                    out.append(prediction)
                return out

            def pred_cells(self, images, precombined=False):
                CALLS.append(("pred_cells", images))
                red, yellow, blue = images
                out = []
                for r, y, b in zip(red, yellow, blue):
                    prediction = np.zeros(r.shape + (3,), np.uint8)
                    prediction[..., 2] = np.where(r.astype(int) + y + b > 40, 255, 0)
                    out.append(prediction)
                return out
    ''',
    "hpacellseg/utils.py": '''
        import numpy as np
        from scipy import ndimage as ndi
        from skimage.segmentation import watershed


        def label_cell(nuclei_pred, cell_pred):
            nuclei = ndi.label(nuclei_pred[..., 2] > 127)[0]
            cells = watershed(ndi.distance_transform_edt(nuclei == 0), nuclei, mask=cell_pred[..., 2] > 127)
            return nuclei, cells
    ''',
}


@pytest.fixture()
def stand_in(tmp_path, monkeypatch):
    for name, text in STAND_IN.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    for name in [m for m in sys.modules if m.startswith("hpacellseg")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m.startswith("hpacellseg")]:
        del sys.modules[name]


@pytest.fixture()
def models(tmp_path):
    nuclei, cell = tmp_path / "nuclei.pth", tmp_path / "cell.pth"
    nuclei.write_bytes(b"weights")
    cell.write_bytes(b"weights")
    return nuclei, cell


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _field(size: int = 256) -> np.ndarray:
    """Three cells; a debris speck with a little cytoplasm; a small cell cut by the left border."""
    shape = (size, size)
    blue = np.zeros(shape, np.uint8)
    body = np.zeros(shape, bool)
    for centre in [(60, 70), (60, 190), (180, 130)]:
        blue[_disc(shape, centre, 14)] = 200
        body |= _disc(shape, centre, 45)
    blue[_disc(shape, (215, 35), 2)] = 220      # debris: a tiny 'nucleus'
    body |= _disc(shape, (215, 35), 14)
    blue[_disc(shape, (128, 0), 12)] = 200      # border cell: half a nucleus, a sliver of cytoplasm
    body |= _disc(shape, (128, 0), 16)
    red = np.where(body, 60, 3).astype(np.uint8)
    yellow = np.where(body, 50, 2).astype(np.uint8)
    return np.stack([red, np.full(shape, 9, np.uint8), blue, yellow], axis=-1)


def test_wiring_and_fixes(stand_in, models):
    import hpacellseg.cellsegmentator as stand_in_module

    assert hpacellseg_available()
    field = _field()
    segmenter = make_segmenter("hpacellseg", nuclei_model=str(models[0]), cell_model=str(models[1]), work_size=64,
                               device="cpu")
    nuclei, cells = segmenter.segment(field)
    calls = stand_in_module.CALLS
    init = calls[0][1]
    assert init == dict(nuclei_model=str(models[0]), cell_model=str(models[1]), scale_factor=0.25, device="cpu",
                        padding=False, multi_channel_model=True)
    (_, nuclei_images), (_, cell_images) = calls[1], calls[2]
    assert len(nuclei_images) == 1 and np.array_equal(nuclei_images[0], field[..., 2])
    red, yellow, blue = cell_images
    assert np.array_equal(red[0], field[..., 0]) and np.array_equal(yellow[0], field[..., 3])
    assert np.array_equal(blue[0], field[..., 2])
    # The stand-in's label_cell gives 5 cells; the median-area nucleus rule removes the debris
    # cell and the border rule the sliver.
    assert cells.dtype == np.uint16 and cells.shape == field.shape[:2] and cells.max() == 3
    assert cells[215, 35] == 0 and cells[128, 3] == 0 and cells[60, 70] > 0
    assert np.array_equal(nuclei[nuclei > 0], cells[nuclei > 0])
    # a second field of the same size reuses the loaded models
    segmenter.segment(field)
    assert sum(call[0] == "init" for call in calls) == 1


def test_classical_backend_applies_the_same_fixes():
    _, cells = make_segmenter("classical").segment(_field())
    assert cells.max() == 3 and cells[215, 35] == 0 and cells[128, 3] == 0


def test_missing_model_file_or_package(tmp_path, models, monkeypatch):
    with pytest.raises(HpaCellSegUnavailable, match="not found"):
        make_segmenter("hpacellseg", nuclei_model=str(tmp_path / "absent.pth"), cell_model=str(models[1]))
    with pytest.raises(HpaCellSegUnavailable, match="needs a local"):
        make_segmenter("hpacellseg", nuclei_model=None, cell_model=str(models[1]))
    monkeypatch.setitem(sys.modules, "hpacellseg", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "hpacellseg.cellsegmentator", None)
    with pytest.raises(HpaCellSegUnavailable, match="package"):
        make_segmenter("hpacellseg", nuclei_model=str(models[0]), cell_model=str(models[1]))
    with pytest.raises(ValueError, match="unknown"):
        make_segmenter("cellpose")
