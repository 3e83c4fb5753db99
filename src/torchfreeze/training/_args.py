"""Argument checks of ``param_groups``, ``add_unfrozen`` and ``GradualUnfreezing`` (and its saved state).

Each follows the error rule (docs/errors.md): a wrong type raises
:class:`~torchfreeze.errors.ArgumentTypeError`, a wrong value
:class:`~torchfreeze.errors.ArgumentError`, and the message reads
``verb(argument=<what was passed>): expected ... Fix: ...``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from torchfreeze._core.checks import short_repr
from torchfreeze._core.select import Selector
from torchfreeze.errors import ArgumentError, ArgumentTypeError

__all__ = ["positive", "layer_group_list", "schedule_kind", "saved_groups"]

_EXAMPLE_GROUPS = "groups=['encoder.layer.0', 'encoder.layer.1', 'head']"


def positive(value: Any, name: str, verb: str, *, allow_zero: bool = False, shown: Any = None) -> float:
    """``value`` as a float if it is a finite real number ``> 0`` (``>= 0`` with ``allow_zero``).

    Args:
        value: what the caller passed.
        name: the argument's name in the message.
        verb: the public function's name.
        allow_zero: accept 0.
        shown: what the message shows as passed (default ``value``): the whole pair for ``lr_mult``.

    Raises:
        ArgumentTypeError: not a real number (a string, a list, a tensor, a bool).
        ArgumentError: a real number that is not finite, or out of bounds.

    >>> positive(1e-3, "lr", "param_groups")
    0.001
    >>> positive("0.1", "lr", "param_groups")
    Traceback (most recent call last):
    ...
    torchfreeze.errors.ArgumentTypeError: param_groups(lr='0.1'): expected a finite number > 0, got str. ...
    """
    bound = ">= 0" if allow_zero else "> 0"
    head = f"{verb}({name}={short_repr(value if shown is None else shown)})"
    fix = f"Fix: pass a plain float, e.g. {name}=1e-3." if name != "lr_mult" else "Fix: e.g. lr_mult=2.6."
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ArgumentTypeError(f"{head}: expected a finite number {bound}, got {type(value).__name__}. {fix}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ArgumentError(f"{head}: expected a finite number {bound}. {fix}")
    return number


def layer_group_list(groups: Any, verb: str) -> list[Selector] | None:
    """``groups`` as a list (``None`` stays ``None``): a non-empty sequence of selectors.

    Raises:
        ArgumentTypeError: ``groups`` is a string or not a sequence.
        ArgumentError: ``groups`` is empty.

    >>> layer_group_list(("0", "1"), "param_groups")
    ['0', '1']
    """
    if groups is None:
        return None
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ArgumentTypeError(
            f"{verb}(groups={short_repr(groups)}): expected a list of selectors, one per layer group (input "
            f"side first), got {type(groups).__name__}. Fix: pass e.g. {_EXAMPLE_GROUPS}."
        )
    if len(groups) == 0:
        raise ArgumentError(
            f"{verb}(groups=[]): names no layer group; expected at least one selector. "
            f"Fix: leave groups out for the default layer groups, or pass e.g. {_EXAMPLE_GROUPS}."
        )
    return list(groups)


def schedule_kind(schedule: Any, presets: Sequence[str], verb: str) -> None:
    """Refuse a ``schedule`` that is neither a dict, a preset name nor an int period (type), or an empty dict.

    Raises:
        ArgumentTypeError: ``schedule`` has another type, or a key that is not an int.
        ArgumentError: an empty dict.

    >>> schedule_kind(None, ["one_group_per_epoch"], "GradualUnfreezing")
    Traceback (most recent call last):
    ...
    torchfreeze.errors.ArgumentTypeError: GradualUnfreezing(schedule=None): expected a dict ...
    """
    expected = (
        f"expected a dict {{count: selector or group count}}, a preset name ({', '.join(map(repr, presets))}) "
        "or an int period"
    )
    fix = "Fix: e.g. schedule={0: 'head', 2: 'encoder.layer.11'}, schedule='one_group_per_epoch' or schedule=1."
    head = f"{verb}(schedule={short_repr(schedule)})"
    if isinstance(schedule, bool) or not isinstance(schedule, (Mapping, str, int)):
        raise ArgumentTypeError(f"{head}: {expected}, got {type(schedule).__name__}. {fix}")
    if isinstance(schedule, Mapping):
        if not schedule:
            raise ArgumentError(f"{head}: the dict is empty; {expected}. {fix}")
        for key in schedule:
            if isinstance(key, bool) or not isinstance(key, int):
                raise ArgumentTypeError(
                    f"{head}: the key {short_repr(key)} is a {type(key).__name__}; expected int keys "
                    f"(an epoch or step count). {fix}"
                )


#: options that must be finite numbers >= 0 when they are numbers in the optimizer's defaults
_NON_NEGATIVE = ("lr", "weight_decay", "momentum", "dampening", "eps", "initial_lr", "max_lr", "min_lr")


def saved_groups(added: Any, optimizer: torch.optim.Optimizer, where: str) -> list[Mapping[str, Any]]:
    """``GradualUnfreezing`` state's ``added_groups``, checked: refuse what ``state_dict`` cannot have written.

    Raises:
        ArgumentError: not a list of ``{'params': [names], 'options': {...}}`` dicts, a parameter in
            two groups, an option of the wrong type or out of range.
    """
    fix = "Fix: pass the dict GradualUnfreezing.state_dict() returned, unmodified."
    if not isinstance(added, (list, tuple)) or not all(
        isinstance(g, Mapping)
        and isinstance(g.get("params"), (list, tuple))
        and all(isinstance(n, str) for n in g["params"])
        and isinstance(g.get("options"), Mapping)
        for g in added
    ):
        raise ArgumentError(
            f"{where}(state=...): state['added_groups'] must be a list of {{'params': [names], 'options': "
            f"{{...}}}} dicts, as GradualUnfreezing.state_dict() writes them. {fix}"
        )
    seen: dict[str, int] = {}
    for k, g in enumerate(added):
        for n in g["params"]:
            if n in seen:
                raise ArgumentError(
                    f"{where}(state=...): state['added_groups'] lists parameter {short_repr(n)} in groups {seen[n]} "
                    f"and {k}; a parameter belongs to one optimizer group. {fix}"
                )
            seen[n] = k
        for key, value in g["options"].items():
            default = optimizer.defaults.get(key)
            numeric = isinstance(default, (int, float, torch.Tensor)) and not isinstance(default, bool)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            problem = None
            if key == "params":
                problem = "'params' is not an option (the group's parameters are listed in 'params' beside it)"
            elif numeric and not is_number:
                problem = f"expected a number like the optimizer's default {short_repr(default)}"
            elif isinstance(default, bool) and not isinstance(value, bool):
                problem = "expected True or False"
            elif is_number and (value != value or value in (float("inf"), float("-inf"))):
                problem = "expected a finite number"
            elif is_number and key in _NON_NEGATIVE and value < 0:
                problem = "expected a number >= 0"
            if problem:
                raise ArgumentError(
                    f"{where}(state=...): state['added_groups'][{k}]['options'][{short_repr(key)}]="
                    f"{short_repr(value)}: {problem}. Nothing was changed. {fix}"
                )
    return list(added)
