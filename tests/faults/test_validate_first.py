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


def _gradual() -> tuple[nn.Module, torch.optim.Optimizer, tf.GradualUnfreezing]:
    torch.manual_seed(0)
    model = tf.freeze_to(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)), -1)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    return model, opt, tf.GradualUnfreezing(model, opt, {1: "1", 2: "0"})


def _saved() -> dict:
    _, _, sched = _gradual()
    sched.step()
    sched.step()
    return sched.state_dict()


def _edit_group(index: int, **options: object) -> dict:
    state = _saved()
    state["added_groups"][index]["options"].update(options)
    return state


def _one_parameter_twice() -> dict:
    state = _saved()
    state["added_groups"][1]["params"].append(state["added_groups"][0]["params"][0])
    return state


@pytest.mark.parametrize(
    "make, match",
    [
        pytest.param(lambda: _edit_group(0, params="xyz"), "'params' is not an option", id="params-in-options"),
        pytest.param(_one_parameter_twice, "in groups 0 and 1", id="parameter-in-two-groups"),
        pytest.param(lambda: _edit_group(0, lr=-5.0), "lr.*>= 0", id="negative-lr"),
        pytest.param(lambda: _edit_group(1, lr="fast"), "expected a number", id="lr-string"),
        pytest.param(lambda: _edit_group(0, lr=float("nan")), "finite", id="lr-nan"),
        pytest.param(lambda: {**_saved(), "version": 999}, "version", id="version-999"),
    ],
)
def test_gradual_unfreezing_refuses_a_bad_state_before_changing_anything(make: object, match: str) -> None:
    from torchfreeze.errors import ArgumentError

    state = make()  # type: ignore[operator]
    model, opt, sched = _gradual()
    before = ({n: p.requires_grad for n, p in model.named_parameters()}, len(opt.param_groups))
    with pytest.raises(ArgumentError, match=match):
        sched.load_state_dict(state)
    assert ({n: p.requires_grad for n, p in model.named_parameters()}, len(opt.param_groups)) == before


def test_gradual_unfreezing_refuses_an_unknown_shared_policy() -> None:
    from torchfreeze.errors import ArgumentError

    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ArgumentError, match="shared"):
        tf.GradualUnfreezing(model, torch.optim.SGD(model.parameters(), lr=0.1), {1: "0"}, shared="bogus")  # type: ignore[arg-type]
