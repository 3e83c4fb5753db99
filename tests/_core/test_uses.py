"""The one 'who uses this parameter, is it trainable here' primitive and the one requires_grad writer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchfreeze import Frozen, freeze
from torchfreeze._core.uses import (
    FrozenUse,
    frozen_map,
    parameter_uses,
    set_requires_grad,
    trainable_ids,
    trainable_map,
)


def test_tied_parameter_has_every_path_split_by_frozen_use() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, Frozen(shared), nn.Linear(2, 2))
    entry = parameter_uses(model)[id(shared.weight)]
    assert entry.trainable_paths == ["0.weight"]
    assert entry.frozen_use_paths == ["1.module.weight"]
    assert entry.name == "0.weight" and entry.trainable


def test_parameter_used_only_through_frozen_is_not_trainable_even_with_requires_grad() -> None:
    inner = nn.Linear(2, 2)
    model = nn.Sequential(nn.Linear(2, 2), Frozen(inner))
    assert inner.weight.requires_grad
    assert id(inner.weight) not in trainable_ids(model)
    assert list(frozen_map(model)) == ["1.module.weight", "1.module.bias"]
    assert list(trainable_map(model)) == ["0.weight", "0.bias"]


def test_maps_partition_the_parameters_exactly_once() -> None:
    block = nn.Linear(3, 3)
    model = freeze(nn.Sequential(nn.Linear(3, 3), block, nn.Sequential(block), Frozen(nn.Linear(3, 3))), "0")
    trainable, frozen = trainable_map(model), frozen_map(model)
    ids = [id(p) for p in [*trainable.values(), *frozen.values()]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})


def test_frozen_is_recognised_through_the_core_marker() -> None:
    assert issubclass(Frozen, FrozenUse)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: nn.LazyLinear(2), id="lazy"),
        pytest.param(lambda: nn.Linear(2, 2, device="meta"), id="meta"),
        pytest.param(lambda: nn.Linear(2, 2), id="dense"),
    ],
)
def test_set_requires_grad_works_on_lazy_meta_and_dense_parameters(make) -> None:
    module = make()
    set_requires_grad(module.parameters(), False)
    assert not any(p.requires_grad for p in module.parameters())
    set_requires_grad(module.parameters(), True)
    assert all(p.requires_grad for p in module.parameters())


def test_freezing_drops_grad_and_unfreezing_keeps_it() -> None:
    layer = nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    set_requires_grad([layer.weight], True)
    assert layer.weight.grad is not None
    set_requires_grad([layer.weight], False)
    assert layer.weight.grad is None


def test_lazy_flag_survives_materialisation() -> None:
    lazy = nn.LazyLinear(2)
    set_requires_grad(lazy.parameters(), False)
    lazy(torch.ones(1, 3))
    assert not lazy.weight.requires_grad and lazy.weight.shape == (2, 3)
