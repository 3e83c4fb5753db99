"""Items of a data set for :func:`~torchfreeze.speed.precompute_features`: split, compare, hash, store the rest.

An item is ``x`` (a tensor, a dict of tensors, anything the collate function batches) or a tuple
or list ``(x, *rest)``. The rest (targets, ids...) is kept per leaf of ``torch.utils._pytree``'s
flattening, in a column of ``n`` rows: tensors (and arrays) as one tensor ``(n, *shape)``, Python
``bool``/``int``/``float`` as a ``bool``/``int64``/``float64`` tensor (given back as Python numbers,
and batched exactly as ``default_collate`` batches them), ``None`` as nothing, anything else
(strings) as a Python list, which a file cannot hold.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from torchfreeze._core import tree
from torchfreeze._core.checks import short_repr
from torchfreeze._core.fingerprint import hash_tensor
from torchfreeze.errors import ArgumentError

__all__ = ["ItemKind", "RestKind", "split_item", "difference", "hash_item", "rest_kind", "Split"]

ItemKind = Literal["bare", "tuple", "list"]
RestKind = Literal["tensor", "bool", "int", "float", "none", "object"]
#: the dtype of each number column (what ``default_collate`` makes of such numbers)
NUMBER_DTYPES: dict[str, torch.dtype] = {"bool": torch.bool, "int": torch.int64, "float": torch.float64}
_CONSTANTS = (type(None), bool, int, float, str, bytes)


def split_item(item: Any, index: int) -> tuple[Any, tuple[Any, ...], ItemKind]:
    """``(x, rest, kind)`` of one item: a tuple/list item is ``(x, *rest)``, anything else is ``x``."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise ArgumentError(
                f"precompute_features(dataset=...): item {index} is an empty {type(item).__name__}; expected x "
                "or (x, target, ...). Fix: return the input first in every item."
            )
        return item[0], tuple(item[1:]), "list" if isinstance(item, list) else "tuple"
    return item, (), "bare"


def as_tensor(leaf: Any) -> Tensor | None:
    """A tensor, or an array-like (``numpy.ndarray``) as a tensor; ``None`` for anything else."""
    if isinstance(leaf, Tensor):
        return leaf
    if hasattr(leaf, "__array__") and not isinstance(leaf, _CONSTANTS):
        try:
            return torch.as_tensor(leaf)
        except (TypeError, RuntimeError, ValueError):
            return None
    return None


def _bits(t: Tensor) -> Tensor:
    return t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def difference(a: Any, b: Any) -> str | None:
    """Where two reads of an item differ (``None`` when they are bit for bit the same)."""
    leaves_a, spec_a = tree.flatten(a)
    leaves_b, spec_b = tree.flatten(b)
    if spec_a != spec_b:
        return "structure"
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b, strict=True)):
        tx, ty = as_tensor(x), as_tensor(y)
        if tx is not None and ty is not None:
            same = tx.dtype == ty.dtype and tx.shape == ty.shape and torch.equal(_bits(tx), _bits(ty))
        elif tx is None and ty is None:
            try:
                same = type(x) is type(y) and bool(x == y)
            except (TypeError, ValueError, RuntimeError):  # an __eq__ that gives no single answer
                same = x is y
        else:
            same = False
        if not same:
            return f"values (leaf #{i} of the item, a {type(x).__name__})"
    return None


def hash_item(h: Any, item: Any) -> None:
    """Feed an item's structure, tensors and constants to a hashlib object (the data set's part of a file key)."""
    leaves, spec = tree.flatten(item)
    h.update(f"{spec!r}|".encode())
    for leaf in leaves:
        t = as_tensor(leaf)
        if t is not None:
            hash_tensor(h, t if t.layout == torch.strided else t.to_dense())
        elif isinstance(leaf, _CONSTANTS):
            h.update(f"{type(leaf).__name__}:{leaf!r}|".encode())
        else:  # no stable content we can read: its type only
            h.update(f"{type(leaf).__module__}.{type(leaf).__qualname__}|".encode())


def item_digest(items: Sequence[Any]) -> str:
    """SHA-256 of the sampled items, in order."""
    h = hashlib.sha256()
    for item in items:
        hash_item(h, item)
    return h.hexdigest()


def rest_kind(value: Any) -> RestKind:
    """How a leaf of the rest of an item is stored."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if value is None:
        return "none"
    return "tensor" if as_tensor(value) is not None else "object"


@dataclass(frozen=True)
class RestColumn:
    """One leaf of the rest: its kind, and for tensors the row's shape and dtype."""

    kind: RestKind
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None

    @staticmethod
    def of(value: Any) -> RestColumn:
        """The column a first value starts."""
        kind = rest_kind(value)
        t = as_tensor(value) if kind == "tensor" else None
        if t is not None:
            return RestColumn(kind, tuple(t.shape), t.dtype)
        return RestColumn(kind, (), NUMBER_DTYPES.get(kind))

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` fits this column (same kind; for tensors same shape and dtype)."""
        if type(value) is Tensor:  # the common case first
            return self.kind == "tensor" and tuple(value.shape) == self.shape and value.dtype == self.dtype
        if rest_kind(value) != self.kind:
            return False
        if self.kind != "tensor":
            return True
        t = as_tensor(value)
        return t is not None and tuple(t.shape) == self.shape and t.dtype == self.dtype

    def rows(self, values: list[Any]) -> Tensor:
        """The values of a batch as rows of this column's tensor."""
        if self.kind == "tensor":
            return torch.stack([t.cpu() for t in map(as_tensor, values) if t is not None])
        return torch.tensor(values, dtype=self.dtype)


class Split:
    """The collate function of the run: items -> (batched x, per-item rest, kinds).

    A class (not a closure) so that ``DataLoader`` workers can pickle it.
    """

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> tuple[Any, list[tuple[Any, ...]], list[ItemKind]]:
        xs: list[Any] = []
        rests: list[tuple[Any, ...]] = []
        kinds: list[ItemKind] = []
        for item in items:
            x, rest, kind = split_item(item, -1)
            xs.append(x)
            rests.append(rest)
            kinds.append(kind)
        return self.collate(xs), rests, kinds


def mismatch(index: int, what: str, first: Any, now: Any) -> ArgumentError:
    """The error for an item whose structure differs from item 0's."""
    return ArgumentError(
        f"precompute_features(dataset=...): item {index} has {what} {short_repr(now, 60)}, item 0 has "
        f"{short_repr(first, 60)}; every item must have the same structure, and targets the same type and shape. "
        "Fix: make the data set return items of one form, e.g. (tensor, int)."
    )
