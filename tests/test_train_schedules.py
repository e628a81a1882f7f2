"""Learning-rate schedules per epoch."""
from __future__ import annotations

import pytest

from src.train.schedules import make_lr_schedule


def _values(name: str, epochs: int, multiplier: float = 1.0, offset: int = 0) -> list[float]:
    schedule = make_lr_schedule(name, multiplier, offset, epochs)
    return [schedule(epoch) for epoch in range(epochs)]


def test_adam10_values_with_multiplier() -> None:
    expected = [4e-5, 4e-5, 2e-5, 2e-5, 8e-6, 8e-6, 4e-6, 4e-6, 2e-6, 2e-6, 2e-6]
    assert _values("Adam10", 11, multiplier=4) == pytest.approx(expected)
    assert _values("Adam10", 10, multiplier=0.3)[0] == pytest.approx(3e-6)


def test_epoch_offset_continues_the_schedule() -> None:
    assert _values("Adam10", 4, offset=2) == pytest.approx([5e-6, 5e-6, 2e-6, 2e-6])
    assert _values("Adam10", 2, offset=20) == pytest.approx([5e-7, 5e-7])


def test_adam20_and_its_warm_up_as_in_the_reference() -> None:
    # the reference's epochs e = 1, 2, ...: 1e-5, then 5e-6 for e > 5, 2e-6 for e > 10, 1e-6 for e > 12, 5e-7 for e > 17
    adam20 = [1e-5] * 5 + [5e-6] * 5 + [2e-6] * 2 + [1e-6] * 5 + [5e-7] * 3
    assert _values("Adam20", 20) == pytest.approx(adam20)
    assert _values("Adam20WarmUP", 20) == pytest.approx([1e-6] + adam20[1:])  # warm-up: 1e-6 while e <= 1
    assert _values("Adam20WarmUP", 3, multiplier=4, offset=1) == pytest.approx([4e-5] * 3)


def test_cosine_decreases_from_base_to_floor() -> None:
    values = _values("Cosine", 6, multiplier=2)
    assert values[0] == pytest.approx(2e-5) and values[-1] == pytest.approx(1e-6)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert _values("Constant", 3) == pytest.approx([1e-5] * 3)


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="Adam10"):
        make_lr_schedule("Adam7")
