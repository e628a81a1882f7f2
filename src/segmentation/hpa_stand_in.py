"""Small stand-ins for the published HPA U-Nets, for tests and the bench (no published weights here).

Same contract as `dpn_unet_nuclei_v1.pth` / `dpn_unet_cell_3ch_v1.pth`: a (N, 3, H, W) normalised
input with H and W multiples of 32 -> (N, 3, H, W) logits (background, border, interior); saved as
TorchScript archives, the format the loader reads. The interior logit can be given a hand-set
linear term of the input's 8-bit grey levels, so that a stand-in finds bright objects and the
segmentation it leads to is known.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from src.segmentation.hpa_models import NORMALISE_FACTOR, NORMALISE_MEAN


class StandInUNet(nn.Module):
    """Encoder-decoder with skip connections, `depth` stride-2 levels (so sides must be multiples of
    2**depth), seeded random weights scaled by `noise`, plus interior logit
    `gain * (sum_c grey_weights[c] * grey_c - grey_level)` (grey levels 0-255 of the input channels)
    and a constant `background_logit` (so that, away from objects, the border probability is low)."""

    def __init__(self, width: int = 8, depth: int = 5, seed: int = 0, noise: float = 1.0,
                 grey_weights: tuple[float, float, float] = (0.0, 0.0, 0.0), grey_level: float = 0.0,
                 gain: float = 0.0, background_logit: float = 0.0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.down = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(depth))
            self.up = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
            self.head = nn.Conv2d(width, 3, 1)
        with torch.no_grad():
            self.head.weight.mul_(noise)
            self.head.bias.mul_(noise)
        # grey = (x / factor + mean) * 255, so the linear term is affine in the normalised input x
        weights = torch.tensor(grey_weights, dtype=torch.float32) * gain
        mean = torch.tensor(NORMALISE_MEAN, dtype=torch.float32)
        self.register_buffer("signal_weights", (weights * 255 / NORMALISE_FACTOR).view(1, 3, 1, 1))
        self.signal_bias = float((weights * mean * 255).sum() - gain * grey_level)
        self.background_logit = float(background_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.stem(x))
        skips = []
        for down in self.down:
            skips.append(features)
            features = F.relu(down(features))
        for up, skip in zip(self.up, reversed(skips)):
            features = F.relu(up(F.interpolate(features, scale_factor=2.0, mode="nearest"))) + skip
        logits = self.head(features)
        signal = (x * self.signal_weights).sum(dim=1, keepdim=True) + self.signal_bias
        background = torch.full_like(signal, self.background_logit)
        return logits + torch.cat([background, torch.zeros_like(signal), signal], dim=1)


def nuclei_stand_in(seed: int = 0) -> StandInUNet:
    """Interior where blue (input channel 0) is above grey level 60."""
    return StandInUNet(seed=seed, noise=0.05, grey_weights=(1.0, 0.0, 0.0), grey_level=60, gain=0.2,
                       background_logit=5.0)


def cell_stand_in(seed: int = 1) -> StandInUNet:
    """Interior where red + yellow (input channels 0, 1) is above grey level 40."""
    return StandInUNet(seed=seed, noise=0.05, grey_weights=(1.0, 1.0, 0.0), grey_level=40, gain=0.2,
                       background_logit=5.0)


def save_torchscript(model: nn.Module, path: str | os.PathLike, side: int = 64) -> None:
    """Trace `model` on a (1, 3, side, side) input and save the TorchScript archive at `path`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
        traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, side, side))
        traced.save(str(path))
