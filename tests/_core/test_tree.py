"""Nested structures go through torch.utils._pytree."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import torch

from torchfreeze._core.tree import flatten, map_tensors, tensor_leaves, unflatten

Pair = namedtuple("Pair", "left right")


def test_round_trip_keeps_container_types() -> None:
    tree = {"x": [torch.ones(1), (torch.zeros(2), "tag")], "p": Pair(torch.ones(3), 7), "o": OrderedDict(k=1)}
    leaves, spec = flatten(tree)
    rebuilt = unflatten(spec, leaves)
    assert type(rebuilt["p"]) is Pair and type(rebuilt["o"]) is OrderedDict
    assert isinstance(rebuilt["x"][1], tuple) and rebuilt["x"][1][1] == "tag"


def test_tensor_leaves_in_order_and_map_only_touches_tensors() -> None:
    tree = [torch.tensor(1), {"b": torch.tensor(2), "s": "text", "n": 3}]
    assert [t.item() for t in tensor_leaves(tree)] == [1, 2]
    doubled = map_tensors(lambda t: t * 2, tree)
    assert doubled[0].item() == 2 and doubled[1]["b"].item() == 4
    assert doubled[1]["s"] == "text" and doubled[1]["n"] == 3
