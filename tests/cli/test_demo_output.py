"""What the demo prints: percentages that keep small shares, tables that never cut names, COLUMNS."""

from __future__ import annotations

import io

import pytest

from torchfreeze._core.render import Table, percent
from torchfreeze.cli.console import Output

PERCENTS = {
    "tiny-share": (1540, 22_000_000, "0.007%"),
    "ordinary": (1, 3, "33.3%"),
    "zero": (0, 5, "0.0%"),
    "all": (5, 5, "100.0%"),
    "almost-all": (99_993, 100_000, "99.993%"),
    "empty-model": (0, 0, "0.0%"),
}


@pytest.mark.parametrize("part, whole, text", PERCENTS.values(), ids=PERCENTS.keys())
def test_percent_never_rounds_a_share_away(part: int, whole: int, text: str) -> None:
    assert percent(part, whole) == text


def test_rich_tables_wrap_long_module_names_and_honour_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    name = "backbone.model.encoder.layer.5.attention.self.query_key_value_projection"
    monkeypatch.setenv("COLUMNS", "50")
    out = Output(progress=False, stream=io.StringIO())
    out.render(Table(("module", "trainable"), [(name, "1,540")]))
    text = out.stream.getvalue()  # type: ignore[attr-defined]
    assert max(len(line) for line in text.splitlines()) <= 50
    assert "…" not in text
    assert name in "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") >= 2)


def test_the_summary_table_wraps_long_module_names_instead_of_cutting_them(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    import torch

    import torchfreeze

    model = torch.nn.Sequential()
    model.add_module("a_rather_long_encoder_name", torch.nn.Sequential())
    model.get_submodule("a_rather_long_encoder_name").add_module("attention_output_projection", torch.nn.Linear(2, 2))
    monkeypatch.setenv("COLUMNS", "60")
    out = Output(progress=False, stream=io.StringIO())
    out.render(torchfreeze.summary(model))
    text = out.stream.getvalue()  # type: ignore[attr-defined]
    assert "…" not in text
    first_cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") >= 2)
    assert "a_rather_long_encoder_name.attention_output_projection" in first_cells
