"""The run of :func:`~torchfreeze.speed.precompute_features`: the backbone once over the data set, rows into storage.

:func:`run` batches the items with a ``DataLoader`` (in order), calls the backbone under
``torch.inference_mode()`` and copies each batch's output rows into storage that an ``Allocate``
callback gives once the first batch shows the layout: preallocated tensors (:func:`memory`) or
the columns of a new safetensors file mapped in memory (:func:`write`, atomically renamed into
place). Items and outputs of another structure or shape than the first are refused.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from torchfreeze._core import tree
from torchfreeze._core.files import atomic_write
from torchfreeze.errors import ArgumentError
from torchfreeze.speed import _features_file as ffile
from torchfreeze.speed._items import RestColumn, mismatch
from torchfreeze.speed.precomputed import Layout

__all__ = ["Allocate", "UserOSError", "run", "memory", "write", "run_device"]

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


def _user_batches(loader: DataLoader[Any]) -> Iterator[Any]:
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except OSError as error:
            raise UserOSError(error) from error
        yield batch


def _first(out: Any, rests: list[Any], kinds: list[Any], n: int, dtype: torch.dtype | None) -> Layout:
    leaves, spec = tree.flatten(out)
    b = len(kinds)
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
    rest_leaves, rest_spec = rests[0]
    layout = Layout(n, kinds[0], spec, rest_spec, [RestColumn.of(v) for v in rest_leaves])
    layout.features = [
        ffile.Column(
            f"feature.{j}", dtype if dtype is not None and t.is_floating_point() else t.dtype, (n, *t.shape[1:])
        )
        for j, t in enumerate(leaves)
    ]
    return layout


def _check_batch(
    layout: Layout, first: list[Tensor], out: Any, rests: list[Any], kinds: list[Any], start: int
) -> list[Tensor]:
    leaves, spec = tree.flatten(out)
    b = len(kinds)
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
                f"{tuple(getattr(leaf, 'shape', ()))}, those of item 0 {tuple(ref.shape[1:])} per row; every row must have "
                "one shape. Fix: pool or pad the features to a fixed size (e.g. tokenize with padding='max_length')."
            )
    for k, ((values, spec_r), kind) in enumerate(zip(rests, kinds, strict=True)):
        if kind != layout.item:
            raise mismatch(start + k, "the form", layout.item, kind)
        if spec_r != layout.rest_spec:
            raise mismatch(start + k, "targets of structure", layout.rest_spec, spec_r)
        for value, column in zip(values, layout.rest, strict=True):
            if not column.accepts(value):
                raise mismatch(start + k, "a target", column, value)
    return leaves


def run(
    fn: Callable[[Any], Any],
    loader: DataLoader[Any],
    n: int,
    run_device: torch.device,
    dtype: torch.dtype | None,
    allocate: Allocate,
) -> Result:
    """Every item once through ``fn``, in order; returns the layout, the stored columns and the rest."""
    start = 0
    layout: Layout | None = None
    first: list[Tensor] = []
    stored: dict[str, Tensor] = {}
    rest: list[Any] = []
    for xb, rests, kinds in _user_batches(loader):
        rests = [tree.flatten(r) for r in rests]
        xb = tree.map_tensors(lambda t: t.to(run_device), xb)
        try:
            with torch.inference_mode():
                out = fn(xb)
        except OSError as error:
            raise UserOSError(error) from error
        if layout is None:
            layout = _first(out, rests, kinds, n, dtype)
            first = tree.flatten(out)[0]
            stored = allocate(layout)
            rest = [[] if c.kind == "object" else stored.get(f"rest.{j}") for j, c in enumerate(layout.rest)]
        leaves = _check_batch(layout, first, out, rests, kinds, start)
        b = len(kinds)
        for j, leaf in enumerate(leaves):
            stored[f"feature.{j}"][start : start + b].copy_(leaf)
        for j, column in enumerate(layout.rest):
            values = [leaves_r[j] for leaves_r, _ in rests]
            if column.kind == "object":
                rest[j].extend(values)
            elif column.kind != "none":
                rest[j][start : start + b].copy_(column.rows(values))
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
