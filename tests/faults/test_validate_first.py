"""Validate first, then change: integer parameters, a string where groups go (issue 11, items 13 and 16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfreeze as tf
from torchfreeze.errors import ArgumentTypeError


def test_unfreeze_with_an_integer_parameter_finishes_and_leaves_it_frozen() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model.register_parameter("steps", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
    tf.freeze(model)
    tf.unfreeze(model)  # torch refuses requires_grad on integer tensors: it is skipped, not half-done
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "steps": False,
        "0.weight": True,
        "0.bias": True,
        "1.weight": True,
        "1.bias": True,
    }


def test_freeze_to_with_an_integer_parameter_in_the_trainable_part() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].register_parameter("count", nn.Parameter(torch.zeros(1, dtype=torch.int32), requires_grad=False))
    tf.freeze(model)
    tf.freeze_to(model, 1, groups=["0", "1"])
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert not model[1].count.requires_grad


def test_freeze_to_refuses_a_string_of_groups_before_changing_anything() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with pytest.raises(ArgumentTypeError, match="groups='01'"):
        tf.freeze_to(model, 1, groups="01")  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())
