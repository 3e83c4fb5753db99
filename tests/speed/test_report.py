"""Tests of explain's report: Explanation and FrozenPart, their table and their dict form."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchfreeze as tf
from torchfreeze.speed import Explanation, FrozenPart, explain


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 3))


def x() -> torch.Tensor:
    return torch.randn(16, 8)


def test_report_renders_and_serialises() -> None:
    report = explain(tf.freeze(mlp(), "2"), x())
    assert isinstance(report, Explanation)
    text = str(report)
    assert "frozen part" in text and "Best speed-up steps" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["parts"][0]["name"] == "2" and d["step_ms"] > 0
    with pytest.raises(KeyError):
        report.part("nope")


def test_table_has_one_row_per_part_under_a_rule() -> None:
    report = explain(tf.freeze(mlp(), "0", "2"), x())
    lines = str(report).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("frozen part"))
    assert set(lines[header + 1]) <= {"-", " "}
    assert [line.split()[0] for line in lines[header + 2 : header + 4]] == ["0", "2"]
    assert all(isinstance(p, FrozenPart) for p in report.parts)


def test_whole_model_part_is_labelled_model() -> None:
    report = explain(tf.freeze(mlp()), x())
    assert report.part("").label == "<model>" and "<model>" in str(report)
