"""``summary``: what is trainable, what is frozen and how, per module."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.mode import get_pin
from torchfreeze._core.render import percent, plain_table
from torchfreeze._core.uses import parameter_uses
from torchfreeze._core.wrappers import unwrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.nn.frozen import Frozen

__all__ = ["summary", "Summary", "SummaryRow"]


@dataclass(frozen=True)
class SummaryRow:
    """One module of a :class:`Summary` (counts are numbers of scalar weights in its subtree)."""

    name: str
    type: str
    depth: int
    parameters: int
    trainable: int
    frozen_by_flag: int
    frozen_by_use: int
    mode: str
    pinned: bool
    notes: tuple[str, ...] = ()

    @property
    def frozen(self) -> int:
        """Frozen by flag plus frozen by ``Frozen`` use only."""
        return self.frozen_by_flag + self.frozen_by_use


@dataclass(frozen=True)
class Summary:
    """Per-module table plus totals that add up; ``str()`` is plain text, rich renders a table.

    Counts are numbers of scalar weights; totals count each parameter tensor
    once (``trainable + frozen_by_flag + frozen_by_use == total``).

    Example:
        >>> from torch import nn
        >>> s = summary(nn.Linear(2, 1))
        >>> print(str(s).splitlines()[-1])
        total 3 parameters: 3 trainable (100.0%), 0 frozen (0 by requires_grad=False, 0 by Frozen use only)
    """

    rows: list[SummaryRow]
    total: int
    trainable: int
    frozen_by_flag: int
    frozen_by_use: int
    shared: int = 0
    columns: ClassVar[tuple[str, ...]] = ("module", "type", "params", "trainable", "frozen", "mode", "notes")

    @property
    def frozen(self) -> int:
        """Frozen by flag plus frozen by ``Frozen`` use only."""
        return self.frozen_by_flag + self.frozen_by_use

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"rows": [...], "totals": {...}}``.

        Example:
            >>> from torch import nn
            >>> summary(nn.Linear(2, 1)).to_dict()["totals"]["parameters"]
            3
        """
        return {
            "rows": [{**asdict(row), "notes": list(row.notes)} for row in self.rows],
            "totals": {
                "parameters": self.total,
                "trainable": self.trainable,
                "frozen": self.frozen,
                "frozen_by_flag": self.frozen_by_flag,
                "frozen_by_use": self.frozen_by_use,
                "shared": self.shared,
            },
        }

    def _cells(self, row: SummaryRow) -> list[str]:
        frozen = f"{row.frozen:,}"
        if row.frozen_by_use:
            frozen += f" ({row.frozen_by_use:,} by Frozen use)"
        mode = row.mode + (" (pinned)" if row.pinned else "")
        label = ("  " * row.depth) + (row.name or "(model)")
        return [label, row.type, f"{row.parameters:,}", f"{row.trainable:,}", frozen, mode, ", ".join(row.notes)]

    def _footer(self) -> str:
        text = (
            f"total {self.total:,} parameters: {self.trainable:,} trainable ({percent(self.trainable, self.total)}), "
            f"{self.frozen:,} frozen ({self.frozen_by_flag:,} by requires_grad=False, "
            f"{self.frozen_by_use:,} by Frozen use only)"
        )
        if self.shared:
            text += f"; {self.shared} shared parameter tensor(s) counted once"
        return text

    def __str__(self) -> str:
        return plain_table(self.columns, [self._cells(r) for r in self.rows]) + "\n" + self._footer()

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="torchfreeze summary", caption=self._footer(), show_lines=False)
        for column in self.columns:
            justify: Literal["right", "left"] = "right" if column in ("params", "trainable", "frozen") else "left"
            table.add_column(column, justify=justify, overflow="fold")  # names wrap, never cut
        for row in self.rows:
            style = "dim" if row.parameters and not row.trainable else None
            table.add_row(*self._cells(row), style=style)
        return table


def summary(model: nn.Module, *, depth: int | None = None) -> Summary:
    """Tabulate, per module, its parameters, what is trainable and frozen, and its mode.

    Trainability is structural (see :func:`torchfreeze.trainable_parameters`):
    frozen counts are split into frozen by ``requires_grad=False`` and frozen
    because the only uses go through ``Frozen``. Shared parameters are counted
    once in the totals and marked ``shared`` in the rows of their owners.

    Args:
        model: any ``nn.Module``.
        depth: deepest row to show (``0`` is the model itself); ``None`` shows all.
            Totals always cover the whole model.

    Returns:
        A :class:`Summary`: ``str()`` for plain text, a rich table in rich consoles, ``to_dict()``.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        ArgumentError: ``depth`` is negative or not an int.

    Example:
        >>> from torch import nn
        >>> from torchfreeze import freeze
        >>> model = freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0")
        >>> s = summary(model)
        >>> s.total, s.trainable, s.frozen
        (9, 3, 6)
    """
    require_module(model, "summary")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise ArgumentTypeError(
            f"summary(depth={short_repr(depth)}): expected None or an int, got {type(depth).__name__}. "
            "Fix: pass depth=1 for the model's children, or None for every module."
        )
    if depth is not None and depth < 0:
        raise ArgumentError(f"summary(depth={depth}): expected an int >= 0. Fix: pass depth=0 for the model row only.")
    uses = parameter_uses(model)
    shared_ids = {key for key, entry in uses.items() if len(entry.paths) > 1}

    def kind(param: nn.Parameter) -> str:
        entry = uses[id(param)]
        if entry.trainable:
            return "trainable"
        return "frozen_by_flag" if not param.requires_grad else "frozen_by_use"

    def count(params: Any) -> dict[str, int]:
        counts = {"parameters": 0, "trainable": 0, "frozen_by_flag": 0, "frozen_by_use": 0}
        for param in params:
            size = _numel(param)
            counts["parameters"] += size
            counts[kind(param)] += size
        return counts

    rows: list[SummaryRow] = []
    for name, module in model.named_modules():
        level = 0 if not name else name.count(".") + 1
        if depth is not None and level > depth:
            continue
        notes = []
        if isinstance(module, Frozen):
            notes.append("Frozen use")
        own_shared = [n for n, p in module.named_parameters(recurse=False) if id(p) in shared_ids]
        if own_shared:
            notes.append("shared: " + ", ".join(own_shared))
        if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False)):
            notes.append("uninitialised (lazy): counted as 0")
        rows.append(
            SummaryRow(
                name=name,
                type=type(module).__name__,
                depth=level,
                mode="train" if module.training else "eval",
                pinned=get_pin(module) is not None,
                notes=tuple(notes),
                **count(module.parameters()),
            )
        )
    totals = count(entry.parameter for entry in uses.values())
    return Summary(rows=rows, total=totals.pop("parameters"), shared=len(shared_ids), **totals)


def _numel(param: nn.Parameter) -> int:
    """Number of scalar weights; 0 for a lazy parameter that has no shape yet."""
    return 0 if nn.parameter.is_lazy(param) else param.numel()
