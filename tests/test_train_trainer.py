"""Gradient accumulation equals one large batch; clipping acts on the accumulated gradient."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from src.train.losses import focal_loss
from src.train.models import build_model
from src.train.trainer import TrainerConfig, TrainState, set_train_mode, train_one_epoch


def _data(num: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num, 4, size, size), dtype=torch.uint8, generator=generator)
    targets = (torch.rand(num, 19, generator=generator) < 0.3).float()
    return images, targets


def _batches(images: torch.Tensor, targets: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i:i + size], targets[i:i + size]) for i in range(0, len(images), size)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("densenet_tiny", dropout=0.0)  # BN frozen by freeze_bn below: no batch statistics


def _run_trainer(model: torch.nn.Module, batches: list, accumulation: int, clip: float | None, tmp_path: Path,
                 optimizer_name: str = "sgd", lr: float = 0.01) -> TrainState:
    optimizer = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer_name == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    cfg = TrainerConfig(out_dir=tmp_path, epochs=1, accumulation_steps=accumulation, clip_norm=clip,
                        freeze_bn=True, log_every=0)
    state = TrainState()
    train_one_epoch(model, batches, [len(b[0]) for b in batches], focal_loss, optimizer, cfg, state)
    return state


def _bare_large_batch_steps(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                            group_sizes: list[int], clip: float | None, lr: float = 0.01) -> None:
    """Hand-written reference: one SGD step per group on the group's concatenated samples."""
    set_train_mode(model, freeze_bn=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    start = 0
    for size in group_sizes:
        optimizer.zero_grad()
        focal_loss(model(images[start:start + size]), targets[start:start + size]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        start += size


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-5, atol=atol), f"{name}: max diff {(x - y).abs().max():.3g}"


@pytest.mark.parametrize("num, batch, accumulation, groups", [
    (12, 2, 3, [6, 6]),        # 6 micro-batches in 2 full groups
    (14, 2, 3, [6, 6, 2]),     # 7 micro-batches: the last group holds one batch and steps on its own mean
    (13, 3, 2, [6, 6, 1]),     # uneven last batch (1 sample) weighted by its size
])
def test_accumulation_equals_large_batch(num: int, batch: int, accumulation: int, groups: list[int],
                                         tmp_path: Path) -> None:
    images, targets = _data(num)
    accumulated, reference = _model(), _model()
    state = _run_trainer(accumulated, _batches(images, targets, batch), accumulation, None, tmp_path)
    _bare_large_batch_steps(reference, images, targets, groups, None)
    assert state.step == len(groups)
    assert any(not torch.equal(p, q) for p, q in zip(accumulated.parameters(), _model().parameters()))
    _assert_same_parameters(accumulated, reference)


def test_clipping_applies_to_the_accumulated_gradient(tmp_path: Path) -> None:
    images, targets = _data(8)
    accumulated, reference, start = _model(), _model(), _model()
    _run_trainer(accumulated, _batches(images, targets, 2), 4, 0.05, tmp_path, lr=1.0)
    _bare_large_batch_steps(reference, images, targets, [8], 0.05, lr=1.0)
    _assert_same_parameters(accumulated, reference)
    with torch.no_grad():
        change = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(accumulated.parameters(), start.parameters())))
    assert float(change) == pytest.approx(0.05, rel=1e-3)  # SGD lr 1: the step is the clipped gradient


def test_adam_accumulation_matches_large_batch(tmp_path: Path) -> None:
    images, targets = _data(8)
    accumulated, large = _model(), _model()
    _run_trainer(accumulated, _batches(images, targets, 2), 4, 1.0, tmp_path, "adam")
    _run_trainer(large, _batches(images, targets, 8), 1, 1.0, tmp_path, "adam")
    _assert_same_parameters(accumulated, large, atol=2e-5)  # updates are ~1e-3: the tolerance is 2 % of one


def test_training_loss_is_the_sample_mean_and_bad_batch_sizes_are_caught(tmp_path: Path) -> None:
    images, targets = _data(6)
    model = _model()
    reference = copy.deepcopy(model)
    set_train_mode(reference, freeze_bn=True)
    with torch.no_grad():
        first_loss = float(focal_loss(reference(images[:3]), targets[:3]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = TrainerConfig(out_dir=tmp_path, epochs=1, accumulation_steps=1, freeze_bn=True, log_every=0)
    mean_loss = train_one_epoch(model, _batches(images[:3], targets[:3], 3), [3], focal_loss, optimizer, cfg,
                                TrainState())
    assert mean_loss == pytest.approx(first_loss, rel=1e-5)
    with pytest.raises(ValueError, match="expected 2"):
        train_one_epoch(model, _batches(images, targets, 3), [2, 2, 2], focal_loss, optimizer, cfg, TrainState())


def test_non_finite_gradient_skips_the_step(tmp_path: Path) -> None:
    images, targets = _data(4)
    model, start = _model(), _model()

    def broken_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets) * float("nan")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainerConfig(out_dir=tmp_path, epochs=1, accumulation_steps=2, clip_norm=1.0, freeze_bn=True, log_every=0)
    state = TrainState()
    train_one_epoch(model, _batches(images, targets, 2), [2, 2], broken_loss, optimizer, cfg, state)
    assert state.step == 1
    _assert_same_parameters(model, start, atol=0.0)
