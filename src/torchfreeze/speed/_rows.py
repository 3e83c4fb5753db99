"""Per-sample rows of a :class:`~torchfreeze.speed.FeatureCache`: call layouts, slabs, and the sample path.

A call layout (method, input structure, dtypes, row shapes, autocast state) has a
:class:`RowLayout`: its key salt, its output structure and a
:class:`~torchfreeze.speed.slabs.SlabStore` of output rows. :class:`SampleRows` is the
``granularity="sample"`` path of the cache: one key pass, one lookup, one
``index_select`` per output tensor on a hit; the missing rows are read from the
directory or computed (only they), stored, and the batch assembled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchfreeze._core import tree
from torchfreeze.errors import ArgumentError
from torchfreeze.speed._entry import LEAF, Entry, check_rows, entry_rows, flatten_output, row_entries
from torchfreeze.speed.keys import autocast_state, batch_key, key_salt, row_keys_fast, take_rows
from torchfreeze.speed.slabs import SlabStore, int64

if TYPE_CHECKING:
    from torchfreeze.speed.storage import EntryStore

__all__ = ["RowLayout", "RowLayouts", "SampleRows", "assemble"]

_TENSOR = object()  # where a tensor goes in a layout's leaves
_NOTHING: Any = object()  # "not computed yet"


class RowLayout:
    """Per-sample rows of one call layout (method, input structure, dtypes, row shapes, autocast).

    Holds the key salt, the output structure (spec, constants, and each tensor's row
    shape and dtype: set by the first output seen) and a :class:`SlabStore` with the
    output's tensor rows.
    """

    __slots__ = ("batches", "leaves", "probe_hits", "probe_misses", "rows", "salt", "single", "spec", "store", "warm")

    def __init__(self, salt: bytes, max_bytes: int) -> None:
        self.salt = salt
        #: whole batches seen before: batch key -> (store, its generation, the rows' slots); lets a
        #: batch that comes again unchanged (a loader without shuffling) skip the per-row keys
        self.batches: dict[bytes, tuple[SlabStore, int, Tensor]] = {}
        self.warm = False  # the last batch was all hits
        self.probe_hits = 0
        self.probe_misses = 0  # batches whose rows all hit but which were not remembered as a whole
        self.store = SlabStore(max_bytes=max_bytes)
        self.spec: tree.TreeSpec | None = None
        self.leaves: list[Any] = []  # constants, and _TENSOR where a tensor goes
        self.rows: list[tuple[torch.Size, torch.dtype]] = []
        self.single = False  # the output is one tensor

    def matches(self, spec: tree.TreeSpec, leaves: Sequence[Any]) -> bool:
        """Whether a batch output (tensors with rows in dim 0) has this layout's structure, constants and rows."""
        if self.spec is None:
            return False
        if len(leaves) != len(self.leaves) or (spec is not self.spec and spec != self.spec):
            return False
        if [(t.shape[1:], t.dtype) for t in leaves if isinstance(t, Tensor)] != self.rows:
            return False
        return all(
            (c is _TENSOR) == isinstance(x, Tensor) and (c is _TENSOR or x == c)
            for x, c in zip(leaves, self.leaves, strict=True)
        )

    def adopt(self, spec: tree.TreeSpec, leaves: Sequence[Any]) -> None:
        """Take this structure; the rows held so far are dropped."""
        self.store = SlabStore(max_bytes=self.store.max_bytes)
        self.spec = spec
        self.leaves = [_TENSOR if isinstance(x, Tensor) else x for x in leaves]
        self.rows = [(t.shape[1:], t.dtype) for t in leaves if isinstance(t, Tensor)]
        self.single = spec.is_leaf() and len(leaves) == 1 and isinstance(leaves[0], Tensor)

    def probing(self) -> bool:
        """Whether to try the whole-batch shortcut: the layout is warm, and the shortcut pays.

        After 256 all-hit batches that it missed, it must hit one in eight, or it is dropped for good
        (rows reshuffled into new batches every epoch never repeat as a whole): the first epoch
        and shuffled loaders do not pay for a second hash of their inputs.
        """
        return self.warm and self.probe_hits * 8 + 256 >= self.probe_misses

    def settle(self, *, probed: bool) -> bool:
        """A batch whose rows all hit: count a missed probe; whether to remember the batch."""
        self.warm = True
        if probed:
            self.probe_misses += 1
        return self.probe_hits * 8 + 256 >= self.probe_misses

    def recall(self, batch: bytes) -> Tensor | None:
        """The slots of a whole batch remembered under ``batch``, if still valid."""
        got = self.batches.get(batch)
        if got is None or got[0] is not self.store or got[1] != self.store.generation:
            return None
        self.probe_hits += 1
        return got[2]

    def remember(self, batch: bytes, slots: Tensor) -> None:
        """Remember the slots of a whole batch (at most 4096 batches per layout)."""
        if len(self.batches) >= 4096:
            self.batches.clear()
        self.batches[batch] = (self.store, self.store.generation, slots)

    def output(self, tensors: list[Tensor]) -> Any:
        """The output rebuilt from its tensor leaves (batches)."""
        if self.single:
            return tensors[0]
        it = iter(tensors)
        assert self.spec is not None  # rows are only stored after adopt
        return tree.unflatten(self.spec, [next(it) if c is _TENSOR else c for c in self.leaves])


class RowLayouts:
    """The :class:`RowLayout` of each call layout, least recently used first out when over ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.layouts: OrderedDict[tuple[Any, ...], RowLayout] = OrderedDict()
        self.dropped = 0  # rows of whole layouts dropped for the budget

    def get(self, ident: tuple[Any, ...], salt: Any) -> RowLayout:
        """The layout ``ident`` (made with ``salt()`` when new), marked as used now."""
        layout = self.layouts.get(ident)
        if layout is None:
            layout = self.layouts[ident] = RowLayout(salt(), self.max_bytes)
        else:
            self.layouts.move_to_end(ident)
        return layout

    def insert(self, layout: RowLayout, keys: Sequence[bytes], tensors: Sequence[Tensor]) -> None:
        """Store rows in ``layout``, then drop other layouts (least recently used first) over the budget."""
        layout.store.insert(keys, tensors)
        total = self.nbytes
        while total > self.max_bytes and len(self.layouts) > 1:
            ident, old = next(iter(self.layouts.items()))
            if old is layout:
                self.layouts.move_to_end(ident)
                continue
            del self.layouts[ident]
            total -= old.store.nbytes
            self.dropped += len(old.store)

    def clear(self) -> None:
        self.layouts.clear()

    @property
    def nbytes(self) -> int:
        return sum(lay.store.nbytes for lay in self.layouts.values())

    def counts(self) -> tuple[int, int, int]:
        """Rows held, rows evicted, rows skipped (larger than the budget)."""
        stores = [lay.store for lay in self.layouts.values()]
        return (
            sum(map(len, stores)),
            self.dropped + sum(s.evictions for s in stores),
            sum(s.skipped for s in stores),
        )


class SampleRows:
    """The ``granularity="sample"`` path of :class:`~torchfreeze.speed.FeatureCache` (a mixin)."""

    _store: EntryStore

    def _compute(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        raise NotImplementedError

    def _key_base(self) -> str:
        raise NotImplementedError

    def _call_sample(
        self,
        method: str,
        signature: tuple[Any, ...],
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        leaves: list[Tensor],
    ) -> Any:
        if not leaves:
            raise ArgumentError(
                "cache_features: granularity='sample' needs at least one tensor input with a batch "
                "dimension; got none. Use granularity='batch'."
            )
        n = leaves[0].shape[0] if leaves[0].dim() > 0 else -1
        for i, t in enumerate(leaves):
            if t.dim() == 0 or t.shape[0] != n:
                raise ArgumentError(
                    "cache_features: with granularity='sample' every tensor input must share the leading "
                    f"batch dimension; input #0 has shape {tuple(leaves[0].shape)} and input #{i} has "
                    f"{tuple(t.shape)}. Use granularity='batch' for such modules."
                )
        if len(leaves) == 1:
            x = leaves[0]
            ident: tuple[Any, ...] = (method, signature, autocast_state(), x.dtype, x.shape[1:])
        else:
            ident = (method, signature, autocast_state(), *[(t.dtype, t.shape[1:]) for t in leaves])
        store = self._store
        with store.lock:
            layout = store.rows.get(ident, lambda: key_salt(self._key_base(), method, "sample", signature))
        device = leaves[0].device
        # a warm layout whose whole batches come again (a loader without shuffling) tries one hash of
        # the whole batch first: a batch seen before skips the per-row keys
        probing = layout.probing()
        batch = batch_key(leaves, salt=layout.salt) if probing else None
        if batch is not None:
            with store.lock:
                slots = layout.recall(batch)
                if slots is not None:
                    store.stats.hits += n
                    store.stats.memory_hits += n
                    return layout.output(layout.store.gather(slots, device))
        keys = row_keys_fast(leaves, n, salt=layout.salt)
        with store.lock:
            found = layout.store.get(keys)
            missing = found.count(None)
            if not missing:  # every row is in the slabs (in other batches before)
                store.stats.hits += n
                store.stats.memory_hits += n
                slots = int64(found)  # type: ignore[arg-type]
                if layout.settle(probed=probing):
                    layout.remember(batch or batch_key(leaves, salt=layout.salt), slots)
                return layout.output(layout.store.gather(slots, device))
            layout.warm = False
            hit = [r for r, s in enumerate(found) if s is not None] if missing < n else []
            hit_rows = layout.store.gather(int64([found[r] for r in hit]), device) if hit else []  # type: ignore[misc]
        if not hit and store.directory is None and layout.single:  # all new rows, a known one-tensor output
            result = self._compute(fn, args, kwargs)
            if isinstance(result, Tensor) and result.dim() and result.shape[0] == n and layout.matches(LEAF, [result]):
                with store.lock:
                    store.stats.misses += n
                    store.rows.insert(layout, keys, [result.detach()])
                return result
            return self._fill(layout, keys, [], [], fn, args, kwargs, device, result)
        return self._fill(layout, keys, hit, hit_rows, fn, args, kwargs, device)

    def _fill(
        self,
        layout: RowLayout,
        keys: list[bytes],
        hit: list[int],
        hit_rows: list[Tensor],
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        device: torch.device,
        computed: Any = _NOTHING,
    ) -> Any:
        """A batch with missing rows: read them from disk or compute them, store them, assemble the output.

        ``computed`` is the whole batch's output when the caller computed it already.
        """
        n, store = len(keys), self._store
        hit_set = set(hit)
        missing = [r for r in range(n) if r not in hit_set]
        found = self._read_rows(layout, keys, missing)
        todo = [r for r in missing if r not in found]
        with store.lock:
            store.stats.hits += len(hit) + len(found)
            store.stats.memory_hits += len(hit)
            store.stats.disk_hits += len(found)
            store.stats.misses += len(todo)
        parts = [(hit, hit_rows)]
        if found:
            rows = list(found)
            tensors = entry_rows([found[r] for r in rows])
            with store.lock:
                store.rows.insert(layout, [keys[r] for r in rows], tensors)
            parts.append((rows, tensors))
        if not todo:
            return layout.output(assemble(n, parts, device))
        whole = len(todo) == n
        if computed is not _NOTHING:
            result = computed
        else:
            sub = (args, kwargs) if whole else take_rows((args, kwargs), int64(todo).to(device))
            result = self._compute(fn, *sub)
        spec, out = flatten_output(result)
        check_rows(out, len(todo))
        if not layout.matches(spec, out):
            if not whole:  # the rows at hand have another output structure: compute the whole batch once more
                result = self._compute(fn, args, kwargs)
                spec, out = flatten_output(result)
                check_rows(out, n)
                todo, whole = list(range(n)), True
            with store.lock:
                layout.adopt(spec, out)  # a new structure: the old rows are dropped
        tensors = [x.detach() for x in out if isinstance(x, Tensor)]
        with store.lock:
            store.rows.insert(layout, [keys[r] for r in todo], tensors)
        if store.directory is not None:
            for r, entry in zip(todo, row_entries(result, len(todo)), strict=True):
                store.write(keys[r].hex(), entry)
        if whole:
            return result
        parts.append((todo, tensors))
        return layout.output(assemble(n, parts, device))

    def _read_rows(self, layout: RowLayout, keys: list[bytes], missing: list[int]) -> dict[int, Entry]:
        """The missing rows found in the directory whose structure fits the layout (it adopts the first one's)."""
        found: dict[int, Entry] = {}
        if self._store.directory is None:
            return found
        for r in missing:
            e = self._store.read(keys[r].hex())
            if e is None:
                continue
            batched = [x.unsqueeze(0) if isinstance(x, Tensor) else x for x in e.leaves]
            with self._store.lock:
                if layout.spec is None:
                    layout.adopt(e.spec, batched)
                if layout.matches(e.spec, batched):
                    found[r] = e
        return found


def assemble(n: int, parts: list[tuple[list[int], list[Tensor]]], device: torch.device) -> list[Tensor]:
    """Output tensors of ``n`` rows from parts (rows, one tensor per output leaf): one ``index_copy_`` per part."""
    template = next(ts for rows, ts in parts if rows)
    out = [torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=device) for t in template]
    for rows, tensors in parts:
        if rows:
            idx = torch.tensor(rows, device=device)
            for o, t in zip(out, tensors, strict=True):
                o.index_copy_(0, idx, t.to(device))
    return out
