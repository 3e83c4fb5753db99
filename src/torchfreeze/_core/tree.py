"""Nested inputs and outputs: thin helpers over ``torch.utils._pytree`` (no hand-written walkers).

Tuples, lists, dicts, namedtuples and ``OrderedDict`` are containers (and any
type registered with pytree, such as Hugging Face ``ModelOutput``); everything
else is a leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["tensor_leaves", "map_tensors", "flatten", "unflatten", "TreeSpec"]

TreeSpec = pytree.TreeSpec


def flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """Leaves of ``tree`` in order, and the spec that rebuilds it.

    >>> leaves, spec = flatten({"a": 1, "b": (2, 3)})
    >>> leaves, unflatten(spec, [10, 20, 30])
    ([1, 2, 3], {'a': 10, 'b': (20, 30)})
    """
    leaves, spec = pytree.tree_flatten(tree)
    return list(leaves), spec


def unflatten(spec: TreeSpec, leaves: list[Any]) -> Any:
    """Rebuild a tree from :func:`flatten`'s spec and new leaves."""
    return pytree.tree_unflatten(leaves, spec)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure, in order.

    >>> [t.item() for t in tensor_leaves({"x": torch.tensor(1), "y": [torch.tensor(2), "text"]})]
    [1, 2]
    """
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor of a nested structure; other leaves stay as they are.

    >>> map_tensors(lambda t: t * 2, {"x": torch.tensor(1), "n": 3})
    {'x': tensor(2), 'n': 3}
    """
    return pytree.tree_map_only(torch.Tensor, fn, tree)
