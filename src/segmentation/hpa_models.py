"""Loading and running the published HPA U-Nets (`dpn_unet_nuclei_v1.pth`,
`dpn_unet_cell_3ch_v1.pth`) without the hpacellseg package: the package's pre-processing, batched.

Facts taken from the package (CellProfiling/HPA-Cell-Segmentation, cellsegmentator.py):
- inputs: nuclei model [blue, blue, blue]; 3-channel cell model [red, yellow, blue]; 8-bit planes
  as floats in [0, 1], rescaled by the scale factor (0.25 for 2048-px fields) with scikit-image's
  rescale (Gaussian anti-aliasing, sigma = (factor - 1) / 2, then bilinear, half-pixel centres);
- normalisation: (x - (124, 117, 104) / 255) / std with std = 1 / (0.0167 * 255) on every channel;
- padding (only where the U-Net needs it here: sides not a multiple of 32): 32 px on top/left and
  up to the next multiple of 32 on bottom/right, mirrored with the edge pixel repeated;
- outputs: 3 logits per pixel (background, border, interior) -> softmax; background set to 0;
  the maps scaled back to the field size with cv2 INTER_AREA; as uint8 (x 255, rounded) - the
  nuclei map is rounded before the resize, the cell map after it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

NORMALISE_MEAN = (124 / 255, 117 / 255, 104 / 255)
NORMALISE_FACTOR = 0.0167 * 255  # 1 / the package's std
PAD_MULTIPLE = 32
CHECK_SIDE = 64  # side of the start-up test input


class HpaModelError(RuntimeError):
    """A model file is missing, unreadable or not a model with the expected contract; one line."""


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise HpaModelError(f"unknown torch device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HpaModelError(f"device {device!r} asked for, but torch sees no CUDA device")
    return resolved


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_model(path: str | os.PathLike | None, role: str, device: torch.device,
               allow_pickled: bool = False) -> torch.nn.Module:
    """Load a TorchScript archive; with `allow_pickled`, a whole pickled module (torch.load with
    weights_only=False, which runs code from the file) is accepted too. `role` names the model in errors."""
    if path is None:
        raise HpaModelError(f"the hpacellseg backend needs a local {role} model file (nothing is downloaded)")
    path = Path(path)
    if not path.is_file():
        raise HpaModelError(f"{role} model file {path} not found (nothing is downloaded)")
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; the published model files are TorchScript archives
            # or pickles, which torch.export cannot read.
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
            model = torch.jit.load(str(path), map_location=device)
    except Exception as script_error:  # torch raises RuntimeError/ValueError/OSError variants here
        if not allow_pickled:
            raise HpaModelError(
                f"{role} model {path} is not a TorchScript archive ({_first_line(script_error)}); if it is a whole "
                "pickled model you trust, --allow-pickled-model loads it") from None
        model = _load_pickled(path, role, device)
    return model.eval()


def _load_pickled(path: Path, role: str, device: torch.device) -> torch.nn.Module:
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:
        raise HpaModelError(f"{role} model {path} is neither a TorchScript archive nor a loadable pickled model "
                            f"({_first_line(error)})") from None
    if isinstance(model, torch.nn.DataParallel):
        model = model.module
    if not isinstance(model, torch.nn.Module):
        raise HpaModelError(f"{role} model {path} holds an object of type {type(model).__name__}, not a model (a state dict needs "
                            "the model's code: save the model as a TorchScript archive)")
    return model.to(device)


def check_model(model: torch.nn.Module, role: str, path: str | os.PathLike, device: torch.device) -> None:
    """One tiny forward pass: a (1, 3, 64, 64) input must give (1, 3, 64, 64) logits."""
    probe = torch.zeros(1, 3, CHECK_SIDE, CHECK_SIDE, device=device)
    try:
        with torch.inference_mode():
            output = model(probe)
    except Exception as error:
        raise HpaModelError(f"{role} model {path} fails on a (1, 3, {CHECK_SIDE}, {CHECK_SIDE}) input: "
                            f"{_first_line(error)}") from None
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (1, 3, CHECK_SIDE, CHECK_SIDE):
        raise HpaModelError(f"{role} model {path} gives {shape} for a (1, 3, {CHECK_SIDE}, {CHECK_SIDE}) input; "
                            "expected 3 maps (background, border, interior) of the input's size")


def working_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Shape after rescaling by `scale`, rounded as scikit-image's rescale does."""
    return tuple(max(1, int(round(side * scale))) for side in shape)


def rescale_planes(planes: np.ndarray, scale: float) -> np.ndarray:
    """(H, W, C) uint8 -> float32 in [0, 1] rescaled by `scale` (<= 1): Gaussian anti-aliasing with
    sigma = (factor - 1) / 2 per axis (mirrored edges, truncated at 4 sigma), then bilinear."""
    image = planes.astype(np.float32) / 255.0
    if scale >= 1:
        return image
    height, width = working_shape(planes.shape[:2], scale)
    sigma_y = max(0.0, (planes.shape[0] / height - 1) / 2)
    sigma_x = max(0.0, (planes.shape[1] / width - 1) / 2)
    kernel = (2 * int(4 * sigma_x + 0.5) + 1, 2 * int(4 * sigma_y + 0.5) + 1)
    image = cv2.GaussianBlur(image, kernel, sigmaX=sigma_x, sigmaY=sigma_y, borderType=cv2.BORDER_REFLECT_101)
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image.reshape(height, width, planes.shape[2])


def padding_for(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding: none when both sides are multiples of 32, else the package's."""
    if shape[0] % PAD_MULTIPLE == 0 and shape[1] % PAD_MULTIPLE == 0:
        return 0, 0, 0, 0
    return (PAD_MULTIPLE, PAD_MULTIPLE - shape[0] % PAD_MULTIPLE, PAD_MULTIPLE, PAD_MULTIPLE - shape[1] % PAD_MULTIPLE)


def network_inputs(field: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei input, cell input): (3, h, w) float32 each, rescaled, padded, not yet normalised."""
    red_yellow_blue = rescale_planes(np.ascontiguousarray(field[..., [0, 3, 2]]), scale)
    top, bottom, left, right = padding_for(red_yellow_blue.shape[:2])
    if top or bottom or left or right:
        red_yellow_blue = cv2.copyMakeBorder(red_yellow_blue, top, bottom, left, right, cv2.BORDER_REFLECT)
    cell = red_yellow_blue.transpose(2, 0, 1)
    nuclei = np.repeat(cell[2:3], 3, axis=0)
    return nuclei, cell


def predict(model: torch.nn.Module, batch: np.ndarray, device: torch.device, amp: bool = False) -> torch.Tensor:
    """(N, 3, h, w) float32 inputs in [0, 1] -> (N, 3, h, w) softmax probabilities (float32, on device)."""
    inputs = torch.from_numpy(batch).to(device)
    mean = torch.tensor(NORMALISE_MEAN, device=device).view(1, 3, 1, 1)
    inputs = (inputs - mean) * NORMALISE_FACTOR
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
        logits = model(inputs)
    return F.softmax(logits.float(), dim=1)


def full_resolution_maps(probabilities: np.ndarray, padding: tuple[int, int, int, int],
                         field_shape: tuple[int, int], round_first: bool) -> np.ndarray:
    """(3, h, w) probabilities of one field -> (H, W, 3) uint8 prediction map at the field's size,
    padding cut off, background zeroed. `round_first`: quantise before the resize (the package's
    nuclei path) rather than after (its cell path)."""
    top, bottom, left, right = padding
    height, width = probabilities.shape[1:]
    maps = probabilities[:, top:height - bottom, left:width - right].transpose(1, 2, 0)
    if round_first:
        maps = np.rint(maps * 255).astype(np.uint8)
    maps = np.ascontiguousarray(maps)
    maps[..., 0] = 0
    if maps.shape[:2] != tuple(field_shape):
        maps = cv2.resize(maps, (field_shape[1], field_shape[0]), interpolation=cv2.INTER_AREA)
    if not round_first:
        maps = np.rint(np.clip(maps, 0, 1) * 255).astype(np.uint8)
    return maps
