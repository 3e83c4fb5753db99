"""The data set :func:`~torchfreeze.speed.precompute_features` returns: stored features, with the items' rest.

:class:`PrecomputedFeatures` holds one contiguous tensor per leaf of the backbone's output (rows
first, in memory or memory-mapped from the file) and one column per leaf of the rest of the items
(targets: see :mod:`torchfreeze.speed._items`). ``ds[i]`` has the structure of the original item
with the feature in the place of ``x``; :meth:`PrecomputedFeatures.batches` gives whole batches with
one ``index_select`` per column, without per-item work.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset

from torchfreeze._core import tree
from torchfreeze._core.checks import require_bool, require_positive_int, short_repr
from torchfreeze.errors import ArgumentTypeError
from torchfreeze.speed._features_file import Column, FileProblem
from torchfreeze.speed._items import NUMBER_DTYPES, ItemKind, RestColumn

__all__ = ["PrecomputedFeatures", "Layout"]

_SPEC_ERRORS = (ValueError, KeyError, TypeError, NotImplementedError, IndexError, AttributeError)
_NO_SPEC = tree.flatten(())[1]


@functools.lru_cache(maxsize=16)
def _tuple_spec(k: int) -> tree.TreeSpec:
    return tree.flatten(tuple(range(k)))[1]


@dataclass
class Layout:
    """The shape of what is stored: ``n`` items of one kind, the output's and the rest's structure."""

    n: int
    item: ItemKind
    out_spec: tree.TreeSpec
    rest_spec: tree.TreeSpec = field(default_factory=lambda: _NO_SPEC)
    rest: list[RestColumn] = field(default_factory=list)
    features: list[Column] = field(default_factory=list)

    def rest_columns(self) -> list[Column]:
        """The file columns of the rest (``None`` leaves and Python objects have none)."""
        return [
            Column(f"rest.{j}", c.dtype, (self.n, *c.shape))
            for j, c in enumerate(self.rest)
            if c.dtype is not None and c.kind != "object"
        ]

    def metadata(self) -> dict[str, str]:
        """The layout as safetensors metadata (strings)."""
        return {
            "length": str(self.n),
            "item": self.item,
            "output_spec": pytree.treespec_dumps(self.out_spec),
            "rest_spec": pytree.treespec_dumps(self.rest_spec),
            "rest_kinds": json.dumps([c.kind for c in self.rest]),
        }

    @staticmethod
    def read(metadata: dict[str, str], tensors: dict[str, Tensor], n: int) -> tuple[Layout, list[Tensor], list[Any]]:
        """The layout and columns of a file (untrusted): :class:`FileProblem` if anything does not fit."""
        try:
            item, kinds = metadata["item"], json.loads(metadata["rest_kinds"])
            out_spec = pytree.treespec_loads(metadata["output_spec"])
            rest_spec = pytree.treespec_loads(metadata["rest_spec"])
            length = int(metadata["length"])
        except _SPEC_ERRORS as error:
            raise FileProblem("the metadata does not describe the items") from error
        if length != n or not isinstance(kinds, list):
            raise FileProblem("the metadata does not describe this data set")
        if item not in ("bare", "tuple", "list"):
            raise FileProblem("the metadata does not describe the items")
        item_kind = cast(ItemKind, item)
        if any(k not in ("tensor", "bool", "int", "float", "none") for k in kinds) or rest_spec.num_leaves != len(
            kinds
        ):
            raise FileProblem("the metadata describes unknown targets")
        features = [tensors.get(f"feature.{j}") for j in range(out_spec.num_leaves)]
        rest: list[Any] = [None if k == "none" else tensors.get(f"rest.{j}") for j, k in enumerate(kinds)]
        expected = {f"feature.{j}" for j in range(len(features))} | {
            f"rest.{j}" for j, k in enumerate(kinds) if k != "none"
        }
        if set(tensors) != expected or any(t is None or t.dim() == 0 or t.shape[0] != n for t in features):
            raise FileProblem("the tensors do not match the metadata")
        columns = []
        for kind, t in zip(kinds, rest, strict=True):
            if kind != "none" and (
                t.dim() == 0 or t.shape[0] != n or (kind != "tensor" and t.dtype != NUMBER_DTYPES[kind])
            ):
                raise FileProblem("a target column does not match the metadata")
            columns.append(
                RestColumn(kind, tuple(t.shape[1:]) if t is not None else (), None if t is None else t.dtype)
            )
        layout = Layout(n, item_kind, out_spec, rest_spec, columns)
        return layout, [t for t in features if t is not None], rest


class PrecomputedFeatures(Dataset[Any]):
    """Features of a frozen backbone, computed once (what :func:`~torchfreeze.speed.precompute_features` returns).

    ``ds[i]`` is ``feature`` when the original items were bare inputs, else ``(feature, *rest)``
    (a list for list items), the rest given back as the data set gave it (Python numbers as Python
    numbers; arrays as tensors). A ``DataLoader`` over it works as over the original;
    :meth:`batches` gives the same batches without per-item work.

    Attributes:
        path: the file the features live in (``None`` in memory).
        reused: ``True`` when an existing file was reused (the backbone did not run).

    >>> import torch
    >>> from torch import nn
    >>> from torchfreeze.speed import precompute_features
    >>> data = [(torch.full((2,), float(i)), i) for i in range(5)]
    >>> ds = precompute_features(nn.Linear(2, 3).requires_grad_(False), data, batch_size=2)
    >>> ds.features.shape, ds[4][1], [y.tolist() for _, y in ds.batches(2)]
    (torch.Size([5, 3]), 4, [[0, 1], [2, 3], [4]])
    """

    def __init__(
        self, layout: Layout, features: Sequence[Tensor], rest: Sequence[Any], *, path: Path | None, reused: bool
    ) -> None:
        self.layout = layout
        self._features = list(features)
        self._rest = list(rest)
        self.path = path
        self.reused = reused

    def __len__(self) -> int:
        return self.layout.n

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        shapes = [tuple(t.shape[1:]) for t in self._features]
        dtypes = sorted({str(t.dtype) for t in self._features})
        return f"PrecomputedFeatures(n={self.layout.n}, rows={shapes}, dtype={', '.join(dtypes)}{where})"

    @property
    def features(self) -> Any:
        """All features, rows first: one tensor ``(n, ...)`` (or the backbone's output structure of them)."""
        return tree.unflatten(self.layout.out_spec, list(self._features))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored features."""
        return sum(t.numel() * t.element_size() for t in self._features)

    def _index(self, index: Any) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise ArgumentTypeError(
                f"PrecomputedFeatures[{short_repr(index)}]: expected an int index, got {type(index).__name__}. "
                "Fix: index one item (ds[3]), or use ds.batches(batch_size) for batches."
            ) from None
        if not -self.layout.n <= i < self.layout.n:
            raise IndexError(f"PrecomputedFeatures index {i} out of range for {self.layout.n} items")
        return i % self.layout.n

    def __getitem__(self, index: Any) -> Any:
        i = self._index(index)
        feature = tree.unflatten(self.layout.out_spec, [t[i] for t in self._features])
        if self.layout.item == "bare":
            return feature
        values: list[Any] = []
        for column, data in zip(self.layout.rest, self._rest, strict=True):
            if column.kind in ("tensor", "object"):
                values.append(data[i])
            elif column.kind == "none":
                values.append(None)
            else:  # a Python number, as the data set gave it
                values.append({"bool": bool, "int": int, "float": float}[column.kind](data[i].item()))
        rest = tree.unflatten(self.layout.rest_spec, values)
        return [feature, *rest] if self.layout.item == "list" else (feature, *rest)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The items at ``indices``, as ``[ds[i] for i in indices]`` (a ``DataLoader`` fetches a batch so).

        One ``index_select`` per column instead of one lookup per item and column.
        """
        idx = torch.tensor([self._index(i) for i in indices], dtype=torch.int64)
        rows = [t.index_select(0, idx.to(t.device)).unbind(0) for t in self._features]
        spec = self.layout.out_spec
        features = list(rows[0]) if spec.is_leaf() else [tree.unflatten(spec, list(r)) for r in zip(*rows, strict=True)]
        if self.layout.item == "bare":
            return features
        columns: list[Sequence[Any]] = []
        for column, data in zip(self.layout.rest, self._rest, strict=True):
            if column.kind == "object":
                columns.append([data[i] for i in idx.tolist()])
            elif column.kind == "none":
                columns.append([None] * len(idx))
            else:  # Python numbers come back from tolist() as bool, int, float
                picked = data.index_select(0, idx)
                columns.append(picked.unbind(0) if column.kind == "tensor" else picked.tolist())
        flat = self.layout.rest_spec == _tuple_spec(len(columns))
        items: list[Any] = []
        for k, feature in enumerate(features):
            values = [c[k] for c in columns]
            rest = tuple(values) if flat else tree.unflatten(self.layout.rest_spec, values)
            items.append([feature, *rest] if self.layout.item == "list" else (feature, *rest))
        return items

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Any]:
        """Batches as ``DataLoader(ds, batch_size, ...)`` would give them, with one ``index_select`` per column.

        The floor of feature lookup: no per-item work. Values and structure are those of a
        ``DataLoader`` with the default collate (``[features, *rest]`` for tuple or list items);
        the order is the items' order, or with ``shuffle=True`` ``torch.randperm(n, generator=...)``,
        the order ``RandomSampler(ds, generator=...)`` draws (a ``DataLoader`` draws its worker
        seed from the generator first, so its order differs for the same generator).

        Args:
            batch_size: items per batch.
            shuffle: a new random order every call.
            generator: the random generator of the order (``None``: the global one).
            drop_last: drop the last, smaller batch.

        Yields:
            One batch at a time.

        Raises:
            ArgumentTypeError: an argument of the wrong type.
            ArgumentError: ``batch_size < 1``.
        """
        require_positive_int(batch_size, "PrecomputedFeatures.batches", "batch_size", 64)
        require_bool(shuffle, "PrecomputedFeatures.batches", "shuffle")
        require_bool(drop_last, "PrecomputedFeatures.batches", "drop_last")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ArgumentTypeError(
                f"PrecomputedFeatures.batches(generator={short_repr(generator)}): expected a torch.Generator or "
                f"None, got {type(generator).__name__}. Fix: pass torch.Generator().manual_seed(0)."
            )
        return self._batches(batch_size, shuffle, generator, drop_last)

    def _batches(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None, drop_last: bool
    ) -> Iterator[Any]:
        n = self.layout.n
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        on_device = {t.device: order.to(t.device) for t in self._features}
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            feature = tree.unflatten(
                self.layout.out_spec,
                [t.index_select(0, on_device[t.device][start : start + batch_size]) for t in self._features],
            )
            if self.layout.item == "bare":
                yield feature
                continue
            values: list[Any] = []
            for column, data in zip(self.layout.rest, self._rest, strict=True):
                if column.kind == "object":
                    values.append([data[i] for i in idx.tolist()])
                elif column.kind == "none":
                    values.append([None] * len(idx))
                else:
                    values.append(data.index_select(0, idx))
            yield [feature, *tree.unflatten(self.layout.rest_spec, values)]
