"""summary: per-module table, totals that add up, three renderings."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _helpers import Net, TiedLM
from torchfreeze import Frozen, freeze, pin_mode, summary
from torchfreeze.errors import ArgumentError, ArgumentTypeError


def test_totals_split_by_flag_and_use():
    inner = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(2, 4), Frozen(inner), nn.Linear(4, 1))
    freeze(model, "0")
    s = summary(model)
    assert s.total == 12 + 20 + 5
    assert s.frozen_by_flag == 12 and s.frozen_by_use == 20 and s.trainable == 5
    assert s.trainable + s.frozen == s.total
    frozen_row = next(r for r in s.rows if r.name == "1")
    assert "Frozen use" in frozen_row.notes and frozen_row.frozen_by_use == 20


def test_shared_counted_once_and_marked():
    model = TiedLM()
    s = summary(model)
    assert s.total == sum(p.numel() for p in model.parameters())  # unique
    assert s.shared == 1
    assert any("shared" in note for r in s.rows for note in r.notes)
    assert "counted once" in str(s)


def test_modes_and_pins_in_rows_and_text():
    model = Net()
    pin_mode(model, "backbone.1", mode="eval")
    model.train()
    s = summary(model)
    row = next(r for r in s.rows if r.name == "backbone.1")
    assert row.pinned and row.mode == "eval"
    assert "eval (pinned)" in str(s)


def test_depth_limits_rows_not_totals():
    model = Net()
    full, top = summary(model), summary(model, depth=1)
    assert [r.name for r in top.rows] == ["", "backbone", "head"]
    assert top.total == full.total
    assert [r.name for r in summary(model, depth=0).rows] == [""]


@pytest.mark.parametrize(
    ("depth", "error"),
    [(-1, ArgumentError), (1.5, ArgumentTypeError), ("2", ArgumentTypeError), (True, ArgumentTypeError)],
    ids=["negative", "float", "str", "bool"],
)
def test_bad_depth(depth, error):
    with pytest.raises(error, match=r"summary\(depth="):
        summary(Net(), depth=depth)


def test_to_dict_is_json_and_rich_renders():
    model = freeze(Net(), "backbone", mode="eval")
    data = summary(model).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["totals"]["trainable"] == 27
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(summary(model))
    text = console.export_text()
    assert "backbone" in text and "torchfreeze summary" in text


@st.composite
def trees(draw, level=0):
    if level >= 3 or (level > 0 and draw(st.booleans())):
        return draw(st.sampled_from([lambda: nn.Linear(2, 3), lambda: nn.LayerNorm(2), lambda: nn.ReLU()]))()
    children = [draw(trees(level=level + 1)) for _ in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()) and children:
        children.append(children[0])  # a shared module: its parameters have two paths
    if draw(st.booleans()):
        children.append(Frozen(nn.Linear(2, 2)))
    return nn.Sequential(*children)


@settings(max_examples=60, deadline=None)
@given(tree=trees(), freeze_some=st.booleans())
def test_totals_equal_unique_numel(tree, freeze_some):
    if freeze_some:
        freeze(tree, "0", shared="freeze")
    s = summary(tree)
    assert s.total == sum(p.numel() for p in tree.parameters())
    assert s.trainable + s.frozen_by_flag + s.frozen_by_use == s.total
    assert s.rows[0].parameters == s.total
    assert (s.rows[0].trainable, s.rows[0].frozen) == (s.trainable, s.frozen)
    assert all(r.trainable + r.frozen == r.parameters for r in s.rows)


def test_lazy_parameters_count_as_zero_and_are_noted():
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    freeze(model, "0")
    s = summary(model)
    assert s.total == 4 and s.trainable == 4 and s.frozen == 0
    assert any("lazy" in note for note in s.rows[1].notes)
    assert "lazy" in str(s)


def test_model_without_parameters():
    s = summary(nn.Sequential(nn.ReLU(), nn.Dropout()))
    assert (s.total, s.trainable, s.frozen, s.shared) == (0, 0, 0, 0)
    assert "total 0 parameters" in str(s)
