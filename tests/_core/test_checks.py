"""Argument checks with the standard message shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchfreeze._core.checks import (
    bind_problem,
    refuse_meta,
    require_bool,
    require_choice,
    require_module,
    short_repr,
)
from torchfreeze.errors import ArgumentError, ArgumentTypeError


@pytest.mark.parametrize("bad", [[1, 2], {"w": 1}, None, "model", nn.Linear], ids=repr)
def test_require_module_names_verb_argument_and_fix(bad) -> None:
    with pytest.raises(ArgumentTypeError, match=r"^freeze\(model=.*expected a torch\.nn\.Module.*Fix:") as info:
        require_module(bad, "freeze")
    assert isinstance(info.value, TypeError)


def test_messages_stay_bounded_for_huge_inputs() -> None:
    huge = list(range(100_000))
    with pytest.raises(ArgumentTypeError) as info:
        require_module(huge, "summary")
    assert len(str(info.value)) < 300
    assert len(short_repr("x" * 10_000)) <= 80


def test_require_bool_and_choice() -> None:
    assert require_bool(False, "freeze", "train_bn") is False
    with pytest.raises(ArgumentTypeError, match="train_bn=1"):
        require_bool(1, "freeze", "train_bn")
    assert require_choice("eval", ("train", "eval"), "pin_mode", "mode") == "eval"
    with pytest.raises(ArgumentError, match="'train', 'eval'"):
        require_choice("frozen", ("train", "eval"), "pin_mode", "mode")
    with pytest.raises(ArgumentError):
        require_choice(True, (1, 0), "f", "x")  # True == 1, but it is not the option


BIND_CASES = [
    pytest.param(lambda name: True, ("a", None), "too many positional arguments", id="predicate-one-argument"),
    pytest.param(lambda name, module: True, ("a", None), None, id="predicate-two-arguments"),
    pytest.param(lambda *args: True, ("a", None), None, id="varargs"),
    pytest.param(nn.Linear(2, 2).forward, (), "missing a required argument", id="forward-without-input"),
    pytest.param(print, ("a", None), None, id="builtin"),
]


@pytest.mark.parametrize(("func", "args", "problem"), BIND_CASES)
def test_bind_problem_reads_the_signature_only(func, args, problem) -> None:
    found = bind_problem(func, *args)
    assert found == problem if problem is None else problem in found


def test_refuse_meta_names_the_tensors_and_the_fix() -> None:
    refuse_meta(nn.Linear(2, 2), "fold_batchnorm")  # a materialised model passes
    with torch.device("meta"):
        layer = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(
        ArgumentError, match=r"^fold_batchnorm\(model=\.\.\.\): 7 tensor\(s\) are on the meta device.*Fix:"
    ):
        refuse_meta(layer, "fold_batchnorm")
