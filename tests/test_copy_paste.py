import cv2
import numpy as np
import pandas as pd
import pytest

from src.data.bbox_records import build_record, record_path, write_record
from src.data.classes import CLASS_INDEX
from src.data.make_synthetic import write_synthetic_dataset
from src.data.schema import OutputLayout
from src.data.synthetic import SyntheticConfig
from src.train.copy_paste import RarePasteDataset, paste_cell
from src.train.datasets import ImageLevelDataset, SampleReadError

MITOTIC = CLASS_INDEX["Mitotic spindle"]


def test_paste_cell_by_hand():
    field = np.zeros((5, 6, 2), np.uint8)
    pixels = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2) + 1
    mask = np.array([[True, False, True], [False, True, False]])
    out = paste_cell(field, pixels, mask, 2, 3)
    assert field.sum() == 0  # the input is not modified
    assert out[2, 3].tolist() == [1, 2] and out[2, 5].tolist() == [5, 6] and out[3, 4].tolist() == [9, 10]
    assert np.count_nonzero(out.any(axis=2)) == 3


def one_donor_dataset(tmp_path):
    """(training dataset of 6 synthetic fields whose first image alone is labelled mitotic, bboxes dir)."""
    layout = write_synthetic_dataset(tmp_path / "d", 6, 0, SyntheticConfig(image_size=96, label_noise=0.0), seed=2)
    outputs = OutputLayout(tmp_path / "out")
    table = pd.read_csv(layout.train_csv, dtype={"ID": str})
    table["Label"] = [str(MITOTIC)] + ["0"] * 5  # one donor image
    table["source"] = "train"
    for image_id in table["ID"]:
        mask = cv2.imread(str(layout.truth_mask_path(image_id)), cv2.IMREAD_UNCHANGED)
        write_record(record_path(outputs.bboxes_dir, "train", image_id), build_record(image_id, mask))
    return ImageLevelDataset(layout, table, img_size=48), outputs


def test_pasted_fields_carry_a_donor_cell_and_its_class(tmp_path):
    base, outputs = one_donor_dataset(tmp_path)
    assert RarePasteDataset(base, outputs.bboxes_dir, 0.0)[(3, 1)][0].equal(base[(3, 1)][0])
    dataset = RarePasteDataset(base, outputs.bboxes_dir, 1.0, seed=5)
    donor_cells = [dataset.donor_cell(row, cell_i) for row, cell_i, _ in dataset.donors]
    assert dataset.donors and all(row == 0 and cls == MITOTIC for row, _, cls in dataset.donors)
    changed = 0
    for index in range(1, 6):
        for epoch in range(2):
            image, target, _ = dataset[(index, epoch)]
            assert image.equal(dataset[(index, epoch)][0])  # a pure function of (seed, epoch, index)
            plain_image, plain_target, _ = base[(index, epoch)]
            field, plain = image.numpy().transpose(1, 2, 0), plain_image.numpy().transpose(1, 2, 0)
            if np.array_equal(field, plain):
                continue
            changed += 1
            assert target[MITOTIC] == 1 and plain_target[MITOTIC] == 0
            assert np.array_equal(np.delete(target.numpy(), MITOTIC), np.delete(plain_target.numpy(), MITOTIC))
            # the change is exactly one donor cell's pixels under its mask, at some offset
            found = False
            for pixels, mask in donor_cells:
                h, w = mask.shape
                for top in range(48 - h + 1):
                    for left in range(48 - w + 1):
                        expected = paste_cell(plain, pixels, mask, top, left)
                        if np.array_equal(expected, field):
                            found = True
                            break
                    if found:
                        break
                if found:
                    break
            assert found, (index, epoch)
    assert changed >= 6


def test_unreadable_donor_files_are_sample_read_errors(tmp_path):
    base, outputs = one_donor_dataset(tmp_path)
    donor_record = record_path(outputs.bboxes_dir, "train", base.ids[0])
    saved = donor_record.read_bytes()
    donor_record.write_text("not a record")
    with pytest.raises(SampleReadError, match="donor record"):
        RarePasteDataset(base, outputs.bboxes_dir, 1.0)
    donor_record.write_bytes(saved)
    dataset = RarePasteDataset(base, outputs.bboxes_dir, 1.0)
    for channel_file in base.layout.image_dir("train").glob(f"{base.ids[0]}_*"):
        channel_file.write_text("not an image")
    with pytest.raises(SampleReadError, match=f"image {base.ids[0]} \\(rare-cell donor\\)"):
        dataset[(1, 0)]
