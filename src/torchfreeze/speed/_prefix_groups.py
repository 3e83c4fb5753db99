"""The layer groups of :mod:`torchfreeze.speed.prefix`: resolved, checked, and what lies outside them."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchfreeze._core.checks import short_repr
from torchfreeze._core.select import Selector, resolve
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.nn import layer_groups

__all__ = ["Groups", "resolve_groups", "loose_modules", "modes_only"]

_VERB = "cache_frozen_prefix"
_SHOWN = 4


@dataclass
class Groups:
    """Per layer group, front to back: the modules it names and the parameters it names directly."""

    modules: list[list[str]]
    parameters: list[list[str]]


def _split(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    module_names = {n for n, _ in model.named_modules()}
    return [n for n in names if n in module_names], [n for n in names if n not in module_names]


def resolve_groups(model: nn.Module, groups: Sequence[Sequence[Selector]] | None) -> Groups:
    """The groups (default :func:`torchfreeze.layer_groups`), checked: none empty, none overlapping,
    every parameter of the model in one (a parameter outside them could feed the prefix unseen)."""
    if groups is None:
        found = layer_groups(model)
    else:
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
            raise ArgumentTypeError(
                f"{_VERB}(groups={short_repr(groups)}): expected a list of layer groups (each a list "
                "of selectors), front to back. Fix: pass e.g. groups=[['embed'], ['blocks.0'], ['head']]."
            )
        found = []
        for g, group in enumerate(groups):
            selectors = [group] if isinstance(group, str) else list(group)
            if not selectors:
                raise ArgumentError(
                    f"{_VERB}(groups[{g}]=[]): expected a group naming at least one module or parameter. "
                    "Fix: drop the empty group, or name what belongs in it."
                )
            found.append(resolve(model, *selectors, verb=_VERB, argument=f"groups[{g}]").matched)
    if len(found) < 2:
        raise ArgumentError(
            f"{_VERB}(model={type(model).__name__}(...)): expected at least two layer groups (a prefix "
            f"to freeze and something after it), found {len(found)}. Fix: pass groups= front to back."
        )
    split = [_split(model, names) for names in found]
    owner: dict[int, int] = {}
    for g, (module_names, param_names) in enumerate(split):
        params = [p for n in module_names for p in model.get_submodule(n).parameters()]
        params += [model.get_parameter(n) for n in param_names]
        for p in {id(p): p for p in params}.values():
            if id(p) in owner and owner[id(p)] != g:
                name = next(n for n, q in model.named_parameters(remove_duplicate=False) if q is p)
                raise ArgumentError(
                    f"{_VERB}(groups=...): parameter '{name}' is in group {owner[id(p)]} and in group {g}; "
                    "expected each parameter in one group. Fix: name it in one group only."
                )
            owner[id(p)] = g
    missing = [n for n, p in model.named_parameters() if id(p) not in owner]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:_SHOWN]) + (
            f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        )
        raise ArgumentError(
            f"{_VERB}(groups=...): expected every parameter of the model in a group; {shown} "
            "in none (what is in no group could feed the prefix unseen). Fix: add them to the group they "
            "belong to, e.g. the embeddings' group for a position embedding."
        )
    return Groups([m for m, _ in split], [p for _, p in split])


def loose_modules(model: nn.Module, groups: list[list[str]]) -> list[nn.Module]:
    """Every module neither in nor under a group: parameter-free layers between groups, and the containers."""
    inside = {id(m) for names in groups for n in names for m in model.get_submodule(n).modules()}
    return [m for m in model.modules() if id(m) not in inside]


def modes_only(old: Any, new: Any) -> bool:
    """Whether two ``ModuleWatch`` tokens differ in train/eval flags only."""
    old_dicts, old_held, *old_rest = old
    new_dicts, new_held, *new_rest = new
    if len(old_dicts) != len(new_dicts) or len(old_held) != len(new_held) or old_rest != new_rest:
        return False
    if not all(map(operator.is_, old_held, new_held)):
        return False
    try:
        return all(
            {k: v for k, v in a.items() if k != "training"} == {k: v for k, v in b.items() if k != "training"}
            for a, b in zip(old_dicts, new_dicts, strict=True)
        )
    except (RuntimeError, TypeError, ValueError):  # a tensor attribute compared: not flags only
        return False
