"""Argument checks with the standard message shape."""

from __future__ import annotations

import pytest
from torch import nn

from torchfreeze._core.checks import require_bool, require_choice, require_module, short_repr
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
