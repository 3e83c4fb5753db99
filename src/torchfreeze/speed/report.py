"""The result of :func:`~torchfreeze.speed.explain`: :class:`Explanation` and its :class:`FrozenPart` entries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torchfreeze._core.render import plain_table

__all__ = ["Explanation", "FrozenPart", "format_bytes"]

_COLUMNS = ("frozen part", "type", "backward path", "no autograd", "cacheable", "time", "activations")


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (bytes as a whole number, larger units with one decimal).

    >>> format_bytes(100), format_bytes(3 * 2**20)
    ('100 B', '3.0 MiB')
    """
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class FrozenPart:
    """What :func:`~torchfreeze.speed.explain` found about one frozen part (one entry of ``Explanation.parts``).

    >>> from torch import nn; import torch
    >>> from torchfreeze import explain, freeze
    >>> part = explain(freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0"), torch.ones(4, 2)).parts[0]
    >>> part.name, part.on_backward_path, part.cacheable
    ('0', False, True)
    """

    name: str
    type: str
    parameters: int
    calls: int
    on_backward_path: bool
    upstream: list[str]
    can_skip_autograd: bool
    cacheable: bool
    not_cacheable_because: list[str]
    stochastic_layers: list[str]
    updating_batchnorms: list[str]
    forward_ms: float
    backward_ms: float
    time_share: float
    activation_bytes: int
    activation_share: float

    @property
    def label(self) -> str:
        """The part's name, or ``"<model>"`` for the whole model."""
        return self.name or "<model>"

    def row(self) -> tuple[str, ...]:
        """This part's cells of the report's table."""
        path = "no"
        if self.on_backward_path:
            path = f"yes, via {self.upstream[0]}" if self.upstream else "yes"
        return (
            self.label,
            self.type,
            path,
            "yes" if self.can_skip_autograd else "no",
            "yes" if self.cacheable else "no",
            f"{self.time_share:.0%} ({self.forward_ms:.1f}+{self.backward_ms:.1f} ms)",
            f"{self.activation_share:.0%} ({format_bytes(self.activation_bytes)})",
        )


@dataclass
class Explanation:
    """The report of :func:`~torchfreeze.speed.explain`: per frozen part, totals, and speed-up steps.

    ``str()`` gives a plain-text table followed by the steps; ``to_dict()`` a JSON-able dict.

    >>> from torch import nn; import torch
    >>> from torchfreeze import explain, freeze
    >>> report = explain(freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0"), torch.ones(4, 2))
    >>> report.part("0").can_skip_autograd, "Best speed-up steps" in str(report)
    (True, True)
    """

    parts: list[FrozenPart]
    forward_ms: float
    backward_ms: float
    activation_bytes: int
    trainable_parameters: int
    frozen_parameters: int
    steps: list[str] = field(default_factory=list)

    @property
    def step_ms(self) -> float:
        """Measured forward + backward time of the example step."""
        return self.forward_ms + self.backward_ms

    def part(self, name: str) -> FrozenPart:
        """The report of the frozen part called ``name`` (KeyError if there is none)."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no frozen part named {name!r}; parts: {[p.name for p in self.parts]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form of the whole report."""
        d = asdict(self)
        d["step_ms"] = self.step_ms
        return d

    def __str__(self) -> str:
        lines = [
            f"explain: one training step took {self.step_ms:.1f} ms (forward {self.forward_ms:.1f}, "
            f"backward {self.backward_ms:.1f}); autograd saved {format_bytes(self.activation_bytes)} of activations.",
            f"parameters: {self.trainable_parameters:,} trainable, {self.frozen_parameters:,} frozen.",
        ]
        if not self.parts:
            lines.append("No frozen part: every parameter trains.")
        else:
            lines.append(plain_table(_COLUMNS, [p.row() for p in self.parts]))
            lines.extend(
                f"- {p.label} is not cacheable: " + "; ".join(p.not_cacheable_because)
                for p in self.parts
                if p.not_cacheable_because
            )
        lines.append("Best speed-up steps:")
        if self.steps:
            lines.extend(f"  {i}. {s}" for i, s in enumerate(self.steps, 1))
        else:
            lines.append("  none: freezing already saves what it can here.")
        return "\n".join(lines)
