"""Challenge mask strings: COCO RLE of the Fortran-order binary mask, zlib level 9, base64.

The challenge's sample string `eNoLCAgIMAEABJkBdQ==` is an empty 2048x2048 mask.
"""
from __future__ import annotations

import base64
import zlib

import numpy as np
from pycocotools import mask as coco_mask


def encode_mask(mask: np.ndarray) -> str:
    """(H, W) boolean mask -> challenge mask string."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return base64.b64encode(zlib.compress(rle["counts"], 9)).decode("ascii")


def mask_string_to_rle(text: str, height: int, width: int) -> dict:
    """Challenge mask string -> COCO compressed RLE dict (for pycocotools.mask.iou without decoding)."""
    return {"size": [int(height), int(width)], "counts": zlib.decompress(base64.b64decode(text))}


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """Challenge mask string -> (H, W) boolean mask."""
    return coco_mask.decode(mask_string_to_rle(text, height, width)).astype(bool)


def label_mask_to_rles(label_mask: np.ndarray) -> dict[int, dict]:
    """COCO RLE of every cell (label > 0) of an (H, W) label mask, keyed by label."""
    labels = np.unique(label_mask)
    labels = labels[labels > 0]
    if labels.size == 0:
        return {}
    stack = np.asfortranarray(np.stack([label_mask == label for label in labels], axis=-1).astype(np.uint8))
    return dict(zip(labels.tolist(), coco_mask.encode(stack)))
