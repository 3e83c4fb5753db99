"""Outputs of the bench (torchfreeze.cli.bench.report): the console table of headline ratios."""

from __future__ import annotations

from torchfreeze.cli.bench.report import headline_table

RESULTS = {
    "scenarios": [
        {"scenario": 4, "model": "cnn", "ratios": {"folded_vs_bn_eval": 0.5, "frozen_batchnorm_vs_bn_eval": 1.0}},
        {"scenario": 5, "model": "cnn", "ratios": {}},
    ]
}


def test_headline_table_has_one_row_per_ratio() -> None:
    table = headline_table(RESULTS)
    assert list(table.columns) == ["scenario", "model", "ratio", "value"]
    assert [tuple(r) for r in table.rows] == [
        ("4", "cnn", "folded_vs_bn_eval", "0.500"),
        ("4", "cnn", "frozen_batchnorm_vs_bn_eval", "1.000"),
    ]
    text = str(table)
    assert text.startswith("headline ratios")
    assert [line.split() for line in text.splitlines()[3:]] == [
        ["4", "cnn", "folded_vs_bn_eval", "0.500"],
        ["4", "cnn", "frozen_batchnorm_vs_bn_eval", "1.000"],
    ]
