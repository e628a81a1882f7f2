"""Per-epoch learning-rate schedules, selected by name, times a multiplier, with an epoch offset.

Epochs are counted from 1 in the tables below; `lr_for_epoch(e)` takes the 0-based epoch index of the
training loop and looks up epoch `e + 1 + epoch_offset` (the offset lets a second pass continue a
schedule where a first one stopped).

- Adam10: 1e-5 (epochs 1-2), 5e-6 (3-4), 2e-6 (5-6), 1e-6 (7-8), 5e-7 after.
- Adam20: 1e-5 (epochs 1-5), 5e-6 (6-10), 2e-6 (11-12), 1e-6 (13-17), 5e-7 after.
- Adam20WarmUP: Adam20 with a first epoch at 1e-6 (the reference's cell-level default).
- Cosine: half cosine from 1e-5 at epoch 1 down to 5e-7 (the Adam10 floor) at the last epoch
  (`total_epochs + epoch_offset`), 5e-7 after it.
- Constant: 1e-5 every epoch.
All values are multiplied by `--scheduler-lr-multiplier` (the reference: 4 for the first pass, 0.3 for
the second). The Adam tables are those of the reference's `scheduler.py`, whose epochs also count from 1.
"""
from __future__ import annotations

import math
from typing import Callable

BASE_LR = 1e-5
FLOOR_LR = 5e-7
# (last epoch of the step, learning rate)
STEP_TABLES: dict[str, tuple[tuple[int, float], ...]] = {
    "Adam10": ((2, 1e-5), (4, 5e-6), (6, 2e-6), (8, 1e-6)),
    "Adam20": ((5, 1e-5), (10, 5e-6), (12, 2e-6), (17, 1e-6)),
    "Adam20WarmUP": ((1, 1e-6), (5, 1e-5), (10, 5e-6), (12, 2e-6), (17, 1e-6)),
}
SCHEDULES: tuple[str, ...] = ("Adam10", "Adam20", "Adam20WarmUP", "Cosine", "Constant")


def base_learning_rate(name: str, epoch: int, total_epochs: int = 10) -> float:
    """Learning rate of the 1-based `epoch` before the multiplier."""
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got {epoch}")
    if name in STEP_TABLES:
        for last_epoch, lr in STEP_TABLES[name]:
            if epoch <= last_epoch:
                return lr
        return FLOOR_LR
    if name == "Cosine":
        if total_epochs <= 1 or epoch >= total_epochs:
            return BASE_LR if total_epochs <= 1 and epoch == 1 else FLOOR_LR
        progress = (epoch - 1) / (total_epochs - 1)
        return FLOOR_LR + (BASE_LR - FLOOR_LR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "Constant":
        return BASE_LR
    raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULES)}")


def make_lr_schedule(name: str, multiplier: float = 1.0, epoch_offset: int = 0,
                     total_epochs: int = 10) -> Callable[[int], float]:
    """A function from the 0-based epoch index of this run to its learning rate."""
    base_learning_rate(name, 1, total_epochs + epoch_offset)  # validate the name now

    def lr_for_epoch(epoch_index: int) -> float:
        return multiplier * base_learning_rate(name, epoch_index + 1 + epoch_offset, total_epochs + epoch_offset)

    return lr_for_epoch
