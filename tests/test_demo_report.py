import pandas as pd
import pytest

from src.evaluation.demo_figure import plot_per_class_ap
from src.evaluation.demo_report import target_check


def per_class_table():
    return pd.DataFrame({"name": ["A", "B", "C", "D"], "n_true_test": [5, 3, 4, 0],
                         "(a)": [0.8, 0.6, 0.2, 0.9], "(b)": [0.5, 0.5, 0.5, 0.5],
                         "(d)": [0.9, 0.54, 0.6, 0.0], "(e)": [0.85, 0.6, 0.5, 0.1]})


def test_target_check_by_hand():
    ratio, below = target_check(per_class_table())
    # class D has no true cells: left out; (0.9 + 0.54 + 0.6) / (0.8 + 0.6 + 0.2)
    assert ratio == pytest.approx(2.04 / 1.6)
    assert below == ["B"]  # 0.54 < 0.6 - 0.05; A and C are above
    assert target_check(per_class_table(), margin=0.07)[1] == []


def test_per_class_figure_is_written(tmp_path):
    tables = pd.concat([per_class_table().assign(run="style 1"), per_class_table().assign(run="style 2")])
    plot_per_class_ap(tables, ["(a)", "(b)", "(d)", "(e)"], tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]
