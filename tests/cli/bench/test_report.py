"""Outputs of the bench (torchfreeze.cli.bench.report): the headline rows, figures with their spreads."""

from __future__ import annotations

import pytest

from torchfreeze.cli.bench.report import fmt_figure, headline_rows, headline_table

RATIO = {"median": 0.5, "q1": 0.4, "q3": 0.6, "unit": "x"}
RESULTS = {
    "scenarios": [
        {
            "scenario": 1,
            "model": "mlp",
            "ratios": {"cache_epochs_vs_floor": {"median": 1.2, "q1": 1.1, "q3": 1.4, "unit": "x"}},
            "goals": [{"what": "cached / floor", "ratio": "cache_epochs_vs_floor", "goal": "<= 1.3", "met": True}],
        },
        {"scenario": 4, "model": "cnn", "ratios": {"folded_vs_bn_eval": RATIO}},
        {"scenario": 5, "model": "cnn", "ratios": {}},
        {
            "scenario": 6,
            "model": "encoder",
            "ratios": {},
            "goals": [{"what": "accuracy difference", "value": -2.5, "goal": "within 1 point", "met": False}],
        },
    ]
}


def test_headline_rows_carry_spread_goal_and_verdict() -> None:
    assert headline_rows(RESULTS) == [
        ("1", "mlp", "cache_epochs_vs_floor", "1.200x [1.100-1.400]", "<= 1.3", "**met**"),
        ("4", "cnn", "folded_vs_bn_eval", "0.500x [0.400-0.600]", "", ""),
        ("6", "encoder", "accuracy difference", "-2.50", "within 1 point", "**not met**"),
    ]


def test_headline_table_is_the_same_rows_without_markdown() -> None:
    table = headline_table(RESULTS)
    assert list(table.columns) == ["scenario", "model", "measurement", "median [range]", "goal", "met"]
    assert [tuple(r) for r in table.rows][0] == (
        "1",
        "mlp",
        "cache_epochs_vs_floor",
        "1.200x [1.100-1.400]",
        "<= 1.3",
        "met",
    )
    assert str(table).startswith("headline")


@pytest.mark.parametrize(
    ("fig", "text"),
    [
        pytest.param({"median": 2.5e-4, "q1": 2e-4, "q3": 3e-4, "unit": "s"}, "250.0 us [200.0-300.0 us]", id="us"),
        pytest.param(
            {"median": 0.9e-3, "q1": 0.8e-3, "q3": 1.1e-3, "unit": "s"}, "900.0 us [800.0 us-1.10 ms]", id="mixed-units"
        ),
        pytest.param({"median": 12.0, "q1": 11.0, "q3": 13.5, "unit": "s"}, "12.00 s [11.00-13.50 s]", id="seconds"),
        pytest.param(RATIO, "0.500x [0.400-0.600]", id="ratio"),
    ],
)
def test_figures_print_as_median_and_iqr(fig: dict[str, float], text: str) -> None:
    assert fmt_figure(fig) == text
