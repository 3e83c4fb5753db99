"""The state behind :mod:`torchfreeze.speed.prefix`: counters, stores, one call's state, output checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torchfreeze._core import tree
from torchfreeze.speed.slabs import SlabStore

__all__ = ["PrefixStats", "Record", "Store", "Call", "ForwardRestore", "difference", "row_shape"]


@dataclass
class PrefixStats:
    """Counters of a :class:`PrefixCache` (rows for hits and misses, batches for the rest).

    >>> PrefixStats(hits=6, misses=2).hit_rate
    0.75
    """

    hits: int = 0
    misses: int = 0
    replayed_batches: int = 0
    captured_batches: int = 0
    uncached_batches: int = 0
    verifications: int = 0
    boundary: str | None = None
    frozen_groups: int = 0
    bytes: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Share of rows served from the cache."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {**asdict(self), "hit_rate": self.hit_rate}


@dataclass
class Record:
    """What one module of the prefix returned in a full forward: enough to stand in for it."""

    spec: tree.TreeSpec
    leaves: list[Any]  # non-tensor leaves as they were; tensors as (dtype, shape without the batch dim)


@dataclass
class Store:
    """The stored boundary outputs of one frozen prefix (one number of frozen groups)."""

    depth: int
    token: tuple[Any, ...]
    slabs: SlabStore
    boundary: str = ""
    early: list[str] = field(default_factory=list)  # prefix modules that run before the boundary's consumers
    records: dict[str, Record] = field(default_factory=dict)
    verified: bool = False
    refused: str = ""
    #: parameters trainable when it was made: a store stays valid while no other one becomes trainable
    trainable: frozenset[int] = frozenset()
    #: verified under autograd: nothing trainable feeds the boundary's output
    grad_checked: bool = False


class ForwardRestore:
    """Removes an instance-level ``forward`` stand-in (a ``RemovableHandle`` look-alike)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


@dataclass
class Call:
    """State of one forward call between the root's pre-hook and post-hook."""

    mode: str  # "replay" | "capture" | "off"
    store: Store | None = None  # the store replayed ("replay") or filled ("capture")
    keys: list[bytes] = field(default_factory=list)
    slots: Tensor | None = None  # the rows' slots in ``store`` (-1: missing)
    source: Store | None = None  # a capture may replay a shallower prefix that holds every row
    source_slots: Tensor | None = None
    n: int = 0
    order: list[str] = field(default_factory=list)
    suffix_started: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)
    handles: list[RemovableHandle | ForwardRestore] = field(default_factory=list)
    started: float = 0.0
    grad: bool = False  # autograd on for this call
    last: tuple[str, list[Any]] = ("", [])  # the latest prefix output, copied when it was returned


def row_shape(t: Tensor, n: int) -> tuple[int, ...] | None:
    """The shape of one row of ``t`` when its first dimension holds the ``n`` rows of the batch."""
    return tuple(t.shape[1:]) if t.dim() > 0 and t.shape[0] == n else None


def difference(full: Any, replayed: Any) -> str:
    a_leaves, a_spec = tree.flatten(full)
    b_leaves, b_spec = tree.flatten(replayed)
    if a_spec != b_spec:
        return "the output structure differs"
    for i, (a, b) in enumerate(zip(a_leaves, b_leaves, strict=True)):
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            a, b = a.detach(), b.detach()
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"output #{i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
            if a.is_floating_point() or a.is_complex():
                scale = float(a.abs().max()) if a.numel() else 0.0
                if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-6)):
                    return f"output #{i} differs by up to {float((a - b).abs().max()):.3g}"
            elif not torch.equal(a, b):
                return f"output #{i} differs"
    return ""
