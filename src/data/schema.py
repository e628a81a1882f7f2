"""Every on-disk location and table layout of the pipeline, defined once (documented in README.md).

A dataset folder (default `input/synthetic`) holds what users have plus what early stages add:

    train.csv                    ID,Label                  image-level labels ('|'-joined class ids)
    train/{ID}_{channel}.png     one file per channel      (tif/tiff/jpg also read)
    public.csv, public/          optional public HPA data  same layout, source "public"
    test.csv, test/              images to predict         ID,ImageWidth,ImageHeight (sizes optional)
    folds.csv                    ID,source,fold            image-level folds (fold in 0..K-1)
    duplicates.csv               ID_a,ID_b,transform,dist_red,dist_green,dist_blue
    cache_{size}/{ID}.npy        (size, size, C) uint8     decoded-image cache, C channels in RGBY order
                                                           (non-square: aspect kept, zero-padded)
    cache_native/{ID}.npy        (H, W, C) uint8           the same at each field's own size (cell crops)
    truth/                       synthetic data only: cell-level truth
        masks/{ID}.png           uint16 cell label mask (0 = background, cells 1..n)
        cell_labels.csv          ID,split,cell_id,labels
        image_labels_clean.csv   ID,split,Label            majority-rule labels before label noise
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from src.data.classes import class_slug

NATIVE = "native"  # the cache 'size' of fields kept at their own height and width
FOLDS_COLUMNS = ("ID", "source", "fold")
DUPLICATES_COLUMNS = ("ID_a", "ID_b", "transform", "dist_red", "dist_green", "dist_blue")
CELL_LABELS_COLUMNS = ("ID", "split", "cell_id", "labels")
TEST_COLUMNS = ("ID", "ImageWidth", "ImageHeight")


@dataclass(frozen=True)
class DatasetLayout:
    """Paths inside one dataset folder."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    @property
    def public_csv(self) -> Path:
        return self.root / "public.csv"

    @property
    def test_csv(self) -> Path:
        return self.root / "test.csv"

    def image_dir(self, source: str) -> Path:
        """Folder of the channel files for source 'train', 'public' or 'test'."""
        if source not in ("train", "public", "test"):
            raise ValueError(f"unknown source {source!r}")
        return self.root / source

    @property
    def folds_csv(self) -> Path:
        return self.root / "folds.csv"

    @property
    def duplicates_csv(self) -> Path:
        return self.root / "duplicates.csv"

    def cache_dir(self, size: int | str) -> Path:
        """`cache_{size}` for a square side, `cache_native` for size NATIVE."""
        return self.root / f"cache_{size}"

    def cache_path(self, size: int | str, image_id: str) -> Path:
        return self.cache_dir(size) / f"{image_id}.npy"

    @property
    def truth_dir(self) -> Path:
        return self.root / "truth"

    def truth_mask_path(self, image_id: str) -> Path:
        return self.truth_dir / "masks" / f"{image_id}.png"

    @property
    def truth_cell_labels_csv(self) -> Path:
        return self.truth_dir / "cell_labels.csv"

    @property
    def truth_image_labels_csv(self) -> Path:
        return self.truth_dir / "image_labels_clean.csv"

    @property
    def synthetic_config_json(self) -> Path:
        """Settings a synthetic dataset was generated with (src.data.make_synthetic)."""
        return self.root / "synthetic_config.json"


# ---------------------------------------------------------------------------------------------
# Outputs of the later stages, under one output folder (default `output/`):
#
#   bboxes/                               cell boxes and alien-pixel indices per image (segmentation)
#   denoising_folds.csv                   ID,cell_i,fold          cells split into denoising folds
#   models/{run_name}/fold{N}/            checkpoints, metrics.csv, curves.png
#   models/{run_name}/feature_model.joblib   cell feature model (src.features.cell_classifier)
#   pseudo_labels.h5                      per-cell predictions and embeddings (PSEUDO_LABEL_DATASETS)
#   denoising/fold{K}.h5                  Y_init, Y_opt, image_id, cell_i, eigenvalues (DENOISED_DATASETS)
# ---------------------------------------------------------------------------------------------

# Pseudo-label HDF5: one row per cell, rows of one image contiguous. Strings are fixed-length bytes.
PSEUDO_LABEL_DATASETS = {
    "image_id": "S64 (N,)      image ID",
    "cell_i": "int32 (N,)     cell index inside the image's bbox record (0-based)",
    "source": "uint8 (N,)     0 = train, 1 = public",
    "fold": "int8 (N,)      image-level fold whose model predicted the cell (out of fold)",
    "predictions": "float16 (N, 19)  mean sigmoid over TTA views",
    "embeddings": "float16 (N, 1024) mean penultimate embedding over TTA views",
}
DENOISING_FOLDS_COLUMNS = ("ID", "cell_i", "fold")
SELECTION_COLUMNS = ("ID", "cell_i")
FUSION_COLUMNS = ("class", "name", "weight", "ap_cell", "ap_fused")  # fusion_weights.csv (src.predict.choose_fusion)
DENOISED_DATASETS = {
    "image_id": "S64 (N,)",
    "cell_i": "int32 (N,)",
    "Y_init": "float32 (N, 20)  pseudo-labels + 'nothing there' column",
    "Y_opt": "float32 (N, 20)   denoised labels",
    "eigenvalues": "float32 (m,)  smallest eigenvalues of the normalised Laplacian",
}


@dataclass(frozen=True)
class OutputLayout:
    """Paths inside the output folder."""

    root: Path

    def __init__(self, root: str | os.PathLike = "output"):
        object.__setattr__(self, "root", Path(root))

    @property
    def bboxes_dir(self) -> Path:
        return self.root / "bboxes"

    @property
    def denoising_folds_csv(self) -> Path:
        return self.root / "denoising_folds.csv"

    def model_dir(self, run_name: str, fold: int) -> Path:
        return self.root / "models" / run_name / f"fold{fold}"

    def feature_model_path(self, run_name: str) -> Path:
        return self.root / "models" / run_name / "feature_model.joblib"

    @property
    def pseudo_labels_h5(self) -> Path:
        return self.root / "pseudo_labels.h5"

    @property
    def fusion_weights_csv(self) -> Path:
        return self.root / "fusion_weights.csv"

    def denoised_h5(self, fold: int) -> Path:
        return self.root / "denoising" / f"fold{fold}.h5"


def selection_csv(class_name: str, input_root: str | os.PathLike = "input") -> Path:
    """`input/{slug}_cells_selection.csv` (ID,cell_i): cells whose label a denoising selection adds.

    'Mitotic spindle' -> input/mitotic_cells_selection.csv, the name the reference used.
    """
    return Path(input_root) / f"{class_slug(class_name)}_cells_selection.csv"


# ---------------------------------------------------------------------------------------------
# Segmentation outputs (stage 4, src.preprocessing.generate_cell_bboxes; format in src/data/bbox_records.py)
#
#   bboxes/{source}/{ID}.npz     one record per image: cell_mask uint16 (H, W), boxes int32 (n, 4)
#                                y0,x0,y1,x1 end-exclusive full-res px, areas, alien_offsets (n+1,)
#                                and delta-encoded box-relative alien pixel indices of each cell
#   bboxes/{source}/cells.csv    ID,cell_i,y0,x0,y1,x1,area,image_height,image_width (all records)
#   bboxes/{source}/failed.csv   ID,error                images that could not be segmented (last run)
#
# cell_i everywhere (denoising folds, pseudo-labels, selections, obvious staining) is the 0-based
# index of the cell in its image's record: the order of `boxes`, label cell_i + 1 in `cell_mask`.
# Dataset-side tables of stage 1 (src.preprocessing.detect_negatives_with_obvious_staining):
#   {dataset}/obvious_staining.csv          ID,source,cell_i,top10_mean,obvious
#   {dataset}/obvious_staining_images.csv   ID,source,n_cells,n_obvious,obvious
# ---------------------------------------------------------------------------------------------
OBVIOUS_STAINING_COLUMNS = ("ID", "source", "cell_i", "top10_mean", "obvious")
OBVIOUS_STAINING_IMAGE_COLUMNS = ("ID", "source", "n_cells", "n_obvious", "obvious")


def obvious_staining_csv(dataset_root: str | os.PathLike) -> Path:
    return Path(dataset_root) / "obvious_staining.csv"


def obvious_staining_images_csv(dataset_root: str | os.PathLike) -> Path:
    return Path(dataset_root) / "obvious_staining_images.csv"
