"""The run of :func:`~torchfreeze.speed.precompute_features`: the backbone once over the data set, rows into storage.

:func:`run` batches the items with a ``DataLoader`` (in order), calls the backbone under
``torch.inference_mode()`` and copies each batch's output rows into storage that an ``Allocate``
callback gives once the first batch shows the layout: preallocated tensors (:func:`memory`) or
the columns of a new safetensors file mapped in memory (:func:`write`, atomically renamed into
place). Items and outputs of another structure or shape than the first are refused.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torchfreeze._core import tree
from torchfreeze._core.files import atomic_write
from torchfreeze.errors import ArgumentError
from torchfreeze.speed import _features_file as ffile
from torchfreeze.speed._items import ItemKind, RestColumn, mismatch
from torchfreeze.speed.precomputed import Layout

__all__ = ["Allocate", "Batch", "UserOSError", "item_batches", "tensor_batches", "run", "memory", "write", "run_device"]

_VERB = "precompute_features"
Allocate = Callable[[Layout], dict[str, Tensor]]
Result = tuple[Layout, dict[str, Tensor], list[Any]]


class UserOSError(Exception):
    """An ``OSError`` of the user's code (data set, collate, backbone), carried past ``atomic_write`` unchanged."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


# --------------------------------------------------------------------------- the run


def run_device(backbone: nn.Module) -> torch.device:
    """Where the backbone runs: the device of its first parameter or buffer (CPU without any)."""
    for t in itertools.chain(backbone.parameters(), backbone.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class Batch:
    """``size`` items of one kind: their batched inputs, and per leaf of the rest the items' values (or rows)."""

    x: Any
    size: int
    kind: ItemKind
    rest_spec: tree.TreeSpec
    rest: list[Any]  # per leaf: a list of the items' values, or a tensor of their rows


_PLAIN_LEAVES = frozenset({Tensor, int, float, bool, str})


@functools.lru_cache(maxsize=16)
def _tuple_spec(k: int) -> tree.TreeSpec:
    return tree.flatten(tuple(range(k)))[1]


def _flatten_rest(rest: tuple[Any, ...]) -> tuple[list[Any], tree.TreeSpec]:
    if all(type(v) in _PLAIN_LEAVES for v in rest):  # the common (x, label) item: no pytree walk per item
        return list(rest), _tuple_spec(len(rest))
    return tree.flatten(rest)


def item_batches(loader: DataLoader[Any], start: int = 0) -> Iterator[Batch]:
    """Batches from a ``DataLoader`` whose collate is :class:`~torchfreeze.speed._items.Split`.

    The data set's own ``OSError`` is carried as :class:`UserOSError` (see there).
    """
    batches = iter(loader)
    while True:
        try:
            xb, rests, kinds = next(batches)
        except StopIteration:
            return
        except OSError as error:
            raise UserOSError(error) from error
        flat = [_flatten_rest(r) for r in rests]
        spec = flat[0][1]
        for k, ((_, spec_k), kind) in enumerate(zip(flat, kinds, strict=True)):
            if kind != kinds[0]:
                raise mismatch(start + k, "the form", kinds[0], kind)
            if spec_k != spec:
                raise mismatch(start + k, "targets of structure", spec, spec_k)
        columns = [list(values) for values in zip(*(leaves for leaves, _ in flat), strict=True)] if flat[0][0] else []
        yield Batch(xb, len(kinds), kinds[0], spec, columns)
        start += len(kinds)


def tensor_batches(dataset: TensorDataset, batch_size: int) -> Iterator[Batch]:
    """Batches of a plain ``TensorDataset`` by slicing its tensors: the items it would give, without per-item work."""
    x, *rest = dataset.tensors
    spec = _tuple_spec(len(rest))
    for start in range(0, len(x), batch_size):
        rows = [t[start : start + batch_size] for t in rest]
        yield Batch(x[start : start + batch_size], len(x[start : start + batch_size]), "tuple", spec, rows)


def _first(out: Any, batch: Batch, n: int, dtype: torch.dtype | None) -> Layout:
    leaves, spec = tree.flatten(out)
    b = batch.size
    for j, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != b:
            what = f"shape {tuple(leaf.shape)}" if isinstance(leaf, Tensor) else f"a {type(leaf).__name__}"
            raise ArgumentError(
                f"{_VERB}(backbone=...): output leaf #{j} is {what}; expected tensors with the batch ({b}) first. "
                "Fix: return a tensor (or a tuple/dict of tensors) of features per item, e.g. pooled features."
            )
        stored = dtype if dtype is not None and leaf.is_floating_point() else leaf.dtype
        if not ffile.storable(stored):
            raise ArgumentError(
                f"{_VERB}(backbone=...): output leaf #{j} has dtype {leaf.dtype}, which cannot be stored. "
                "Fix: return real floating or integer features."
            )
    columns = [RestColumn.of(v[0]) for v in batch.rest]
    layout = Layout(n, batch.kind, spec, batch.rest_spec, columns)
    layout.features = [
        ffile.Column(
            f"feature.{j}", dtype if dtype is not None and t.is_floating_point() else t.dtype, (n, *t.shape[1:])
        )
        for j, t in enumerate(leaves)
    ]
    return layout


def _check_batch(layout: Layout, first: list[Tensor], out: Any, batch: Batch, start: int) -> list[Tensor]:
    leaves, spec = tree.flatten(out)
    b = batch.size
    if start + b > layout.n:
        raise ArgumentError(f"{_VERB}(dataset=...): the loader gave more than len(dataset)={layout.n} items.")
    if spec != layout.out_spec:
        raise mismatch(start, "a backbone output of structure", layout.out_spec, spec)
    for leaf, ref in zip(leaves, first, strict=True):
        if (
            not isinstance(leaf, Tensor)
            or leaf.shape[1:] != ref.shape[1:]
            or leaf.dtype != ref.dtype
            or leaf.shape[0] != b
        ):
            raise ArgumentError(
                f"{_VERB}(backbone=...): the features of items {start}..{start + b - 1} have shape "
                f"{tuple(getattr(leaf, 'shape', ()))}, those of item 0 {tuple(ref.shape[1:])} per row; every row must "
                "have one shape. Fix: pool or pad the features to a fixed size (e.g. tokenize with padding='max_length')."
            )
    if batch.kind != layout.item:
        raise mismatch(start, "the form", layout.item, batch.kind)
    if batch.rest_spec != layout.rest_spec:
        raise mismatch(start, "targets of structure", layout.rest_spec, batch.rest_spec)
    for values, column in zip(batch.rest, layout.rest, strict=True):
        if isinstance(values, Tensor):
            if tuple(values.shape[1:]) != column.shape or values.dtype != column.dtype:
                raise mismatch(start, "targets of shape", column, values.shape)
            continue
        for k, value in enumerate(values):
            if not column.accepts(value):
                raise mismatch(start + k, "a target", column, value)
    return leaves


def run(
    fn: Callable[[Any], Any],
    batches: Iterator[Batch],
    n: int,
    run_device: torch.device,
    dtype: torch.dtype | None,
    allocate: Allocate,
) -> Result:
    """Every batch once through ``fn``, in order; returns the layout, the stored columns and the rest."""
    start = 0
    layout: Layout | None = None
    first: list[Tensor] = []
    stored: dict[str, Tensor] = {}
    rest: list[Any] = []
    for batch in batches:
        xb = batch.x
        if not isinstance(xb, Tensor) or xb.device != run_device:  # a plain tensor in place needs no pytree walk
            xb = tree.map_tensors(lambda t: t.to(run_device), xb)
        try:
            with torch.inference_mode():
                out = fn(xb)
        except OSError as error:
            raise UserOSError(error) from error
        if layout is None:
            layout = _first(out, batch, n, dtype)
            first = tree.flatten(out)[0]
            stored = allocate(layout)
            rest = [[] if c.kind == "object" else stored.get(f"rest.{j}") for j, c in enumerate(layout.rest)]
        leaves = _check_batch(layout, first, out, batch, start)
        b = batch.size
        for j, leaf in enumerate(leaves):
            stored[f"feature.{j}"][start : start + b].copy_(leaf)
        for j, (column, values) in enumerate(zip(layout.rest, batch.rest, strict=True)):
            if column.kind == "object":
                rest[j].extend(values)
            elif column.kind != "none":
                rest[j][start : start + b].copy_(values if isinstance(values, Tensor) else column.rows(values))
        start += b
    if layout is None or start != n:
        raise ArgumentError(f"{_VERB}(dataset=...): the loader gave {start} items, len(dataset) is {n}.")
    return layout, stored, rest


def memory(device: torch.device) -> Allocate:
    """Storage in memory: features preallocated on ``device``, targets on the CPU."""

    def allocate(layout: Layout) -> dict[str, Tensor]:
        out = {c.name: torch.empty(c.shape, dtype=c.dtype, device=device) for c in layout.features}
        out.update({c.name: torch.empty(c.shape, dtype=c.dtype) for c in layout.rest_columns()})
        return out

    return allocate


# --------------------------------------------------------------------------- the file


def write(path: Path, key: str, go: Callable[[Allocate], Result]) -> None:
    """Run ``go`` with storage in a new file at ``path`` (atomically renamed into place when complete)."""

    def fill(tmp: str) -> None:
        handle: dict[str, Any] = {}

        def allocate(layout: Layout) -> dict[str, Tensor]:
            if any(c.kind == "object" for c in layout.rest):
                kinds = sorted({c.kind for c in layout.rest})
                raise ArgumentError(
                    f"{_VERB}(directory=...): the items' targets include values that are not tensors or numbers "
                    f"({kinds}); a file holds tensors only. Fix: map them to numbers, or pass directory=None."
                )
            try:
                metadata = {"format": ffile.FORMAT, "key": key, **layout.metadata()}
            except (NotImplementedError, TypeError) as error:
                raise ArgumentError(
                    f"{_VERB}(directory=...): the structure of the backbone's output or of the items cannot be written "
                    f"to a file ({str(error)[:80]}). Fix: return a tensor or a tuple/dict of tensors, or pass directory=None."
                ) from error
            columns = [*layout.features, *layout.rest_columns()]
            handle["raw"], views = ffile.create(tmp, columns, metadata)
            handle["seal"] = (columns, metadata)
            return views

        go(allocate)
        ffile.seal(handle["raw"], *handle["seal"])
        handle.clear()  # unmap before the rename

    atomic_write(path, fill, durable=False, verb=_VERB, argument="directory")
