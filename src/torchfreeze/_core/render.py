"""Tables for the terminal: rich where it is installed, one plain-text fallback.

Every table torchfreeze prints (``summary``, ``explain``, the demo, the bench)
goes through :class:`Table`, so ``str()`` gives the same aligned plain text
everywhere and rich renders the same rows in a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Table", "plain_table", "have_rich", "percent"]


def have_rich() -> bool:
    """True when the optional ``rich`` package can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def percent(part: float, whole: float) -> str:
    """``part / whole`` as a percentage that never rounds a small share away.

    One decimal between 0.1% and 99.9%; outside, as many decimals as the first significant
    digit (of the share, or of its distance to 100%) needs, so 1,540 of 22 million reads
    0.007%, not 0.0%.

    >>> percent(1540, 22_000_000), percent(1, 3), percent(0, 5), percent(5, 5), percent(99_993, 100_000)
    ('0.007%', '33.3%', '0.0%', '100.0%', '99.993%')
    """
    share = 100.0 * part / whole if whole else 0.0
    edge = min(share, 100.0 - share)
    if edge <= 0.0:
        return f"{share:.1f}%"
    decimals = 1 if edge >= 0.1 else -math.floor(math.log10(edge))
    return f"{share:.{decimals}f}%"


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, rule: bool = True) -> str:
    """Aligned plain-text table: the one fallback renderer.

    Args:
        columns: header cells.
        rows: one sequence of cells per row (converted with ``str``).
        rule: draw a dashed line under the header.

    Returns:
        The table, lines joined with ``"\\n"``, trailing spaces stripped.

    >>> print(plain_table(("name", "n"), [("a", 1), ("bb", 22)]))
    name  n
    ----  --
    a     1
    bb    22
    """
    table = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Table:
    """A titled table that renders as plain text (``str``) or as a rich table (``__rich__``).

    >>> t = Table(("layer", "params"), [("0", "6")], title="demo", caption="1 layer")
    >>> print(t)
    demo
    layer  params
    -----  ------
    0      6
    1 layer
    """

    columns: Sequence[str]
    rows: list[Sequence[Any]] = field(default_factory=list)
    title: str | None = None
    caption: str | None = None

    def __str__(self) -> str:
        parts = [self.title] if self.title else []
        parts.append(plain_table(self.columns, self.rows))
        if self.caption:
            parts.append(self.caption)
        return "\n".join(parts)

    def __rich__(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, caption=self.caption)
        for column in self.columns:
            table.add_column(str(column), overflow="fold")  # names are the information: wrap, never cut
        for row in self.rows:
            table.add_row(*(str(c) for c in row))
        return table
