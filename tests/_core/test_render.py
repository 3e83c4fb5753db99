"""The one plain-text table fallback and its rich rendering."""

from __future__ import annotations

from torchfreeze._core.render import Table, plain_table


def test_plain_table_aligns_columns_and_keeps_long_names_whole() -> None:
    name = "encoder.layers.11.attention.output.dense"
    text = plain_table(("module", "params"), [(name, 1024), ("head", 2)])
    lines = text.splitlines()
    assert lines[0].startswith("module ") and set(lines[1]) <= {"-", " "}
    assert name in lines[2]
    assert lines[2].index("1024") == lines[3].index("2") == lines[0].index("params")


def test_table_renders_with_rich_and_as_text() -> None:
    from rich.console import Console

    table = Table(("a", "b"), [("x", "y")], title="T", caption="C")
    assert str(table).splitlines()[0] == "T" and str(table).splitlines()[-1] == "C"
    console = Console(record=True, width=40)
    console.print(table)
    out = console.export_text()
    assert "x" in out and "y" in out and "T" in out
