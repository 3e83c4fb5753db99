"""Rows of one cached output kept in preallocated contiguous tensors ("slabs"), one per output leaf.

A :class:`SlabStore` maps a row key (``bytes``) to a *slot*: row ``slot`` of every
slab. There is no Python object per row and no copy per row: a batch of rows is
written with one ``index_copy_`` per leaf and read back with one ``index_select``
per leaf. The feature cache (:mod:`torchfreeze.speed.cache`) and the prefix cache
keep their per-sample outputs here.

The layout (each leaf's row shape, dtype and device) is fixed by the first
:meth:`SlabStore.insert`; rows of another layout are refused
(:meth:`SlabStore.accepts` says so beforehand). Slabs live on the device of the
first rows inserted (on a GPU, cached features stay on the GPU, within the budget).

Budget and eviction: the slabs grow (by a factor of four) up to ``max_bytes // row_bytes``
rows and never beyond. Once full, the oldest inserted row is overwritten first
(a ring: first in, first out, counted in :attr:`SlabStore.evictions`); a hit does
not refresh a row's age. ``max_bytes`` smaller than one row stores nothing
(counted in :attr:`SlabStore.skipped`).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch
from torch import Tensor

from torchfreeze.errors import ArgumentError, ArgumentTypeError

__all__ = ["SlabStore", "int64"]

#: slabs grow by this factor (each growth copies the rows so far: at most a third of the final size in all)
_GROWTH = 4


def int64(values: Sequence[int]) -> Tensor:
    """A CPU int64 tensor from Python ints (through an ``array``: several times faster than ``torch.tensor``)."""
    if not values:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array("q", values), dtype=torch.int64)


class SlabStore:
    """Rows of one output layout in preallocated slabs, looked up by key.

    Args:
        max_bytes: the most bytes the slabs may hold (all leaves together).

    Not thread-safe: callers hold their own lock.

    >>> store = SlabStore(max_bytes=1 << 20)
    >>> store.insert([b"a", b"b"], [torch.tensor([[1.0, 2.0], [3.0, 4.0]])])
    2
    >>> slots = store.lookup([b"b", b"zz", b"a"]); slots.tolist()
    [1, -1, 0]
    >>> store.gather(slots[slots >= 0])[0].tolist()
    [[3.0, 4.0], [1.0, 2.0]]
    >>> len(store), store.nbytes
    (2, 16)
    """

    __slots__ = (
        "_capacity",
        "_dtypes",
        "_filled",
        "_index",
        "_keys",
        "_next",
        "_row_shapes",
        "_slabs",
        "device",
        "evictions",
        "generation",
        "max_bytes",
        "row_bytes",
        "skipped",
    )

    def __init__(self, *, max_bytes: int) -> None:
        if type(max_bytes) is not int:
            raise ArgumentTypeError(
                f"SlabStore(max_bytes={max_bytes!r}): expected an int, got {type(max_bytes).__name__}. "
                "Fix: pass e.g. max_bytes=1 << 30."
            )
        if max_bytes < 0:
            raise ArgumentError(
                f"SlabStore(max_bytes={max_bytes!r}): expected a byte budget >= 0. Fix: pass e.g. max_bytes=1 << 30."
            )
        self.max_bytes = max_bytes
        self._row_shapes: tuple[tuple[int, ...], ...] | None = None
        self._dtypes: tuple[torch.dtype, ...] = ()
        self.device: torch.device | None = None
        self.row_bytes = 0
        self.evictions = 0
        self.skipped = 0
        #: bumped whenever a slot may come to hold another key's row (eviction, clear): slots
        #: remembered under an older generation are stale
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        self._index: dict[bytes, int] = {}
        self._keys: list[bytes | None] = []
        self._slabs: list[Tensor] = []
        self._capacity = 0
        self._filled = 0  # slots 0.._filled-1 hold (or held) rows
        self._next = 0  # the oldest slot once the slabs are full: the next one overwritten

    # -- queries -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def nbytes(self) -> int:
        """Bytes held by the slabs (their allocated capacity, not only the filled rows)."""
        return self._capacity * self.row_bytes

    @property
    def max_rows(self) -> int:
        """The most rows the budget allows (0 before the layout is known, or when a row exceeds the budget)."""
        return self.max_bytes // self.row_bytes if self.row_bytes else 0

    def slots(self, keys: Sequence[bytes]) -> list[int]:
        """The slot of each key, -1 where missing (a plain list: the cheapest form)."""
        get = self._index.get
        return [get(k, -1) for k in keys]

    def lookup(self, keys: Sequence[bytes]) -> Tensor:
        """An int64 tensor (on the CPU) with the slot of each key, -1 where missing."""
        return int64(self.slots(keys))

    def get(self, keys: Sequence[bytes]) -> list[int | None]:
        """The slot of each key, None where missing (one C-level pass: the fast hit path)."""
        return list(map(self._index.get, keys))

    def gather(self, slots: Tensor, device: torch.device | str | None = None) -> list[Tensor]:
        """The rows at ``slots`` (all present, none -1), one tensor per leaf, on ``device`` (default: the slabs').

        One ``index_select`` per leaf; the result never shares memory with the slabs.
        """
        if not self._slabs:
            raise ArgumentError("SlabStore.gather: the store is empty; look the keys up first (lookup gives -1).")
        here = self.device
        if here is not None and here.type != "cpu":
            slots = slots.to(here, non_blocking=True)
        out = [slab.index_select(0, slots) for slab in self._slabs]
        if device is not None and device != here:
            out = [t.to(device, non_blocking=True) for t in out]
        return out

    def accepts(self, leaves: Sequence[Tensor]) -> bool:
        """Whether rows shaped like ``leaves`` (batched, rows in dim 0) fit this store's layout."""
        if self._row_shapes is None:
            return True
        return (
            len(leaves) == len(self._row_shapes)
            and all(tuple(t.shape[1:]) == s for t, s in zip(leaves, self._row_shapes, strict=True))
            and all(t.dtype == d for t, d in zip(leaves, self._dtypes, strict=True))
        )

    # -- changes -------------------------------------------------------------
    def clear(self) -> None:
        """Drop every row and free the slabs (the layout is kept)."""
        self.generation += 1
        self._reset()

    def insert(self, keys: Sequence[bytes], leaves: Sequence[Tensor]) -> int:
        """Store row ``r`` of every leaf under ``keys[r]``; returns how many rows are now stored.

        A key already present is overwritten in place; a key repeated within ``keys``
        keeps its last row. Rows beyond the budget evict the oldest rows first.

        Raises:
            ArgumentError: no leaves, a leaf without ``len(keys)`` rows, or a layout other than the store's.
        """
        n = len(keys)
        if not leaves or any(t.dim() == 0 or t.shape[0] != n for t in leaves):
            raise ArgumentError(
                f"SlabStore.insert: expected one or more tensors with {n} rows (one per key) in dim 0; got shapes "
                f"{[tuple(t.shape) for t in leaves][:4]}."
            )
        if not self.accepts(leaves):
            raise ArgumentError(
                "SlabStore.insert: these rows have another layout (row shapes/dtypes) than the store's "
                f"{list(zip(self._row_shapes or (), self._dtypes, strict=False))[:4]}; use one store per layout."
            )
        if self._row_shapes is None:
            self._row_shapes = tuple(tuple(t.shape[1:]) for t in leaves)
            self._dtypes = tuple(t.dtype for t in leaves)
            self.device = leaves[0].device
            self.row_bytes = sum(t[0].numel() * t.element_size() for t in leaves)
        if n == 0:
            return 0
        limit = self.max_rows
        if limit == 0:
            self.skipped += n
            return 0
        start = self._append(keys, limit)
        if start is not None:  # the common case: new, distinct keys with room at the end
            for slab, leaf in zip(self._slabs, leaves, strict=True):
                slab[start : start + n].copy_(leaf.detach())
            return n
        rows, slots = self._place(keys, limit)
        if not rows:
            return 0
        dst = int64(slots).to(self.device)
        src = None if len(rows) == n else int64(rows).to(leaves[0].device)
        for slab, leaf in zip(self._slabs, leaves, strict=True):
            leaf = leaf.detach()
            if src is not None:
                leaf = leaf.index_select(0, src)
            slab.index_copy_(0, dst, leaf.to(slab.device, slab.dtype))
        return len(rows)

    def _append(self, keys: Sequence[bytes], limit: int) -> int | None:
        """Slots ``start..start+n`` for ``keys`` when they are all new and distinct and fit at the end, else None."""
        n, index, filled = len(keys), self._index, self._filled
        if filled + n > limit or any(map(index.__contains__, keys)) or len(set(keys)) != n:
            return None
        if filled + n > self._capacity:
            self._grow(min(limit, max(_GROWTH * self._capacity, filled + n)))
        index.update(zip(keys, range(filled, filled + n)))
        self._keys[filled : filled + n] = keys
        self._filled = filled + n
        return filled

    def _place(self, keys: Sequence[bytes], limit: int) -> tuple[list[int], list[int]]:
        """Choose a slot for each row to write (growing the slabs first); the rows and slots to copy."""
        index = self._index
        last: dict[bytes, int] = {}  # key -> its last row in this batch
        for r, k in enumerate(keys):
            last[k] = r
        new = [k for k in last if k not in index]
        if len(new) > limit:  # more new rows than the budget holds: the first ones are dropped at once
            self.evictions += len(new) - limit
            self.generation += 1
            for k in new[: len(new) - limit]:
                del last[k]
            new = new[len(new) - limit :]
        free = self._capacity - self._filled
        if len(new) > free and self._capacity < limit:
            self._grow(min(limit, max(_GROWTH * self._capacity, self._filled + len(new))))
        rows: list[int] = []
        slots: list[int] = []
        for k, r in last.items():
            slot = index.get(k)
            if slot is None:
                slot = self._free_slot()
                index[k] = slot
                self._keys[slot] = k
            rows.append(r)
            slots.append(slot)
        return rows, slots

    def _free_slot(self) -> int:
        if self._filled < self._capacity:
            slot = self._filled
            self._filled += 1
            return slot
        slot = self._next  # full: overwrite the oldest row
        self._next = (slot + 1) % self._capacity
        old = self._keys[slot]
        if old is not None:
            del self._index[old]
            self.evictions += 1
            self.generation += 1
        return slot

    def _grow(self, capacity: int) -> None:
        assert self._row_shapes is not None  # set by insert before it places rows
        device = self.device
        grown = []
        for i, (shape, dtype) in enumerate(zip(self._row_shapes, self._dtypes, strict=True)):
            slab = torch.empty((capacity, *shape), dtype=dtype, device=device)
            if self._filled:
                slab[: self._filled].copy_(self._slabs[i][: self._filled])
            grown.append(slab)
        self._slabs = grown
        self._keys.extend([None] * (capacity - self._capacity))
        self._capacity = capacity
