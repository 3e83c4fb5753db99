"""The schedules of ``ProgressiveFreezing``: argument checks (schedule, groups, optimizer), FreezeOut milestones,
the gradient-norm rule.

Each check follows the error rule (docs/errors.md): a wrong type raises
:class:`~torchfreeze.errors.ArgumentTypeError`, a wrong value
:class:`~torchfreeze.errors.ArgumentError`, and the message reads
``ProgressiveFreezing(argument=<what was passed>): expected ... Fix: ...``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal

import torch
from torch import nn

from torchfreeze._core.checks import short_repr
from torchfreeze._core.select import Selection, Selector
from torchfreeze.errors import ArgumentError, ArgumentTypeError

__all__ = ["Plan", "ScheduleName", "plan_schedule", "freeze_more", "check_overlap", "check_optimizer_holds"]

ScheduleName = Literal["freezeout", "freezeout-cubic", "grad_norm"]
NAMES: tuple[str, ...] = ("freezeout", "freezeout-cubic", "grad_norm")
#: FreezeOut's defaults for t0 (github.com/ajbrock/FreezeOut README: linear with t_0=0.5; cubic with 0.8, pre-cubed)
T0_DEFAULT = {"freezeout": 0.5, "freezeout-cubic": 0.8}
THRESHOLD_DEFAULT = 0.1
_VERB = "ProgressiveFreezing"
_FIX_DICT = "Fix: e.g. schedule={2: 1, 4: 2} (from unit 2 on the first group is frozen, from unit 4 the first two)."
#: what each number option means, its bound, and an example value (one expectation per option, every message)
_OPTIONS = {
    "t0": ("a fraction of training in (0, 1] (when the first group freezes)", 0.5),
    "threshold": ("a relative change > 0 (a finite number)", THRESHOLD_DEFAULT),
    "total": ("the length of training in units, an int >= 1", 10),
}


@dataclass
class Plan:
    """A checked schedule: ``entries`` for a dict, ``milestones`` for FreezeOut, ``threshold`` for grad_norm."""

    kind: str  # "dict" or one of NAMES
    entries: dict[int, int] = field(default_factory=dict)
    milestones: list[float] = field(default_factory=list)
    threshold: float | None = None
    total: int | None = None
    t0: float | None = None

    def describe(self) -> dict[str, Any]:
        """Plain values identifying the schedule (saved in the state, compared on resume)."""
        return {
            "kind": self.kind,
            "entries": [[k, v] for k, v in sorted(self.entries.items())],
            "total": self.total,
            "t0": self.t0,
            "threshold": self.threshold,
        }

    def target(self, count: int) -> int:
        """How many leading groups a dict or FreezeOut schedule has frozen at unit ``count``."""
        if self.kind == "dict":
            return max((v for k, v in self.entries.items() if k <= count), default=0)
        return sum(1 for m in self.milestones if count >= m)


def _number(value: object, name: str) -> float:
    """``value`` as a float if it fits option ``name`` (``t0`` or ``threshold``); one message per option.

    Raises:
        ArgumentTypeError: not a real number (a string, a bool, a tensor).
        ArgumentError: a real number out of the option's range (``nan`` and ``inf`` included).

    >>> _number(0.25, "t0")
    0.25
    >>> _number(1.5, "t0")
    Traceback (most recent call last):
    ...
    torchfreeze.errors.ArgumentError: ProgressiveFreezing(t0=1.5): expected a fraction of training in (0, 1] (when the first group freezes). Fix: pass e.g. t0=0.5.
    """
    expected, example = _OPTIONS[name]
    head, fix = f"{_VERB}({name}={short_repr(value)})", f"Fix: pass e.g. {name}={example}."
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ArgumentTypeError(f"{head}: expected {expected}, got {type(value).__name__}. {fix}")
    number = float(value)
    upper = 1.0 if name == "t0" else math.inf
    if not (math.isfinite(number) and 0.0 < number <= upper):
        raise ArgumentError(f"{head}: expected {expected}. {fix}")
    return number


def _count(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (``total``), with the same wording as :func:`_number`."""
    expected, example = _OPTIONS[name]
    head, fix = f"{_VERB}({name}={short_repr(value)})", f"Fix: pass e.g. {name}={example}."
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{head}: expected {expected}, got {type(value).__name__}. {fix}")
    if value < 1:
        raise ArgumentError(f"{head}: expected {expected}. {fix}")
    return value


def _warn_decreasing(schedule: Mapping[Any, Any], entries: dict[int, int]) -> None:
    """Warn about an entry that asks for fewer frozen groups than an earlier one: it changes nothing."""
    most, at = 0, 0
    for key in sorted(entries):
        if entries[key] < most:
            warnings.warn(
                f"{_VERB}(schedule={short_repr(schedule)}): schedule[{key}]={entries[key]} asks for fewer frozen "
                f"groups than schedule[{at}]={most}, but groups never unfreeze, so it changes nothing (from unit "
                f"{at} on at least {most} groups stay frozen). Fix: drop the entry, or use GradualUnfreezing to "
                "unfreeze.",
                UserWarning,
                stacklevel=5,  # _warn_decreasing <- _dict_entries <- plan_schedule <- __init__ <- the caller
            )
            return
        if entries[key] > most:
            most, at = entries[key], key


def _only_for(name: str, value: object, kinds: str, kind: str) -> None:
    if value is not None:
        raise ArgumentError(
            f"{_VERB}({name}={short_repr(value)}): {name}= applies only to schedule={kinds}, not to a "
            f"{kind} schedule. Fix: leave {name} out, or use a schedule it applies to."
        )


def _dict_entries(schedule: Mapping[Any, Any], n: int, limit: int) -> dict[int, int]:
    head = f"{_VERB}(schedule={short_repr(schedule)})"
    if not schedule:
        raise ArgumentError(f"{head}: the dict is empty; expected {{count: groups frozen from then on}}. {_FIX_DICT}")
    out: dict[int, int] = {}
    for key, value in schedule.items():
        for what, item in (("key", key), ("value", value)):
            if isinstance(item, bool) or not isinstance(item, int):
                raise ArgumentTypeError(
                    f"{head}: the {what} {short_repr(item)} is a {type(item).__name__}; expected int keys (an "
                    f"epoch or step count) and int values (how many leading layer groups are frozen). {_FIX_DICT}"
                )
        if key < 0:
            raise ArgumentError(f"{head}: the key {key} is negative; expected counts >= 0. Fix: count from 0.")
        if value < 0:
            raise ArgumentError(
                f"{head}: schedule[{key}]={value} is negative; expected a group count >= 0. {_FIX_DICT}"
            )
        if value == n and limit < n:
            raise ArgumentError(
                f"{head}: schedule[{key}]={value} would freeze every layer group, the last one (the head) "
                f"included. Fix: freeze at most {n - 1} of the {n} groups, or pass freeze_last=True to freeze "
                "everything on purpose."
            )
        if value > n:
            raise ArgumentError(
                f"{head}: schedule[{key}]={value} asks for {value} frozen layer groups but there are {n}. "
                f"Fix: use a count between 0 and {limit}, or pass groups=[...]."
            )
        out[key] = value
    _warn_decreasing(schedule, out)
    return out


def freezeout_milestones(total: int, t0: float, n: int, limit: int, cubic: bool) -> list[float]:
    """The unit count from which each of the first ``limit`` groups is frozen (FreezeOut).

    Group ``i`` of ``n`` freezes at ``t_i * total`` with ``t_i = t0 + (1 - t0) * i / (n - 1)``
    (``t_i ** 3`` when ``cubic``), Brock et al. 2017, arXiv:1706.04983, section 2.

    >>> freezeout_milestones(10, 0.5, 3, 2, False)
    [5.0, 7.5]
    >>> [round(m, 3) for m in freezeout_milestones(10, 0.8, 3, 2, True)]
    [5.12, 7.29]
    """
    out = []
    for i in range(limit):
        t = t0 + (1.0 - t0) * i / (n - 1) if n > 1 else 1.0
        out.append((t**3 if cubic else t) * total)
    return out


def plan_schedule(
    schedule: object, n: int, limit: int, *, total: Any, t0: Any, threshold: Any, freeze_last: bool
) -> Plan:
    """Check ``schedule`` and its options against ``n`` layer groups, ``limit`` of which may freeze.

    Raises:
        ArgumentTypeError: a schedule, key, value, ``total``, ``t0`` or ``threshold`` of the wrong type.
        ArgumentError: an unknown schedule name, a negative key or count, a count that would freeze the
            last group without ``freeze_last=True``, ``total`` missing for FreezeOut, an option given to a
            schedule it does not apply to, a value out of range.

    Warns:
        UserWarning: a dict entry below an earlier one (groups never unfreeze: it changes nothing).

    >>> plan_schedule("freezeout", 3, 2, total=10, t0=None, threshold=None, freeze_last=False).milestones
    [5.0, 7.5]
    """
    names = ", ".join(repr(k) for k in NAMES)
    if isinstance(schedule, str):
        if schedule not in NAMES:
            raise ArgumentError(
                f"{_VERB}(schedule={short_repr(schedule)}): not a schedule name; expected one of {names} or a "
                "dict {count: groups frozen}. Fix: pass one of them, e.g. schedule='freezeout', total=10."
            )
    elif isinstance(schedule, bool) or not isinstance(schedule, Mapping):
        raise ArgumentTypeError(
            f"{_VERB}(schedule={short_repr(schedule)}): expected a dict {{count: groups frozen}} or one of {names}, "
            f"got {type(schedule).__name__}. {_FIX_DICT}"
        )
    if isinstance(schedule, Mapping):
        _only_for("total", total, "'freezeout'", "dict")
        _only_for("t0", t0, "'freezeout'", "dict")
        _only_for("threshold", threshold, "'grad_norm'", "dict")
        return Plan("dict", entries=_dict_entries(schedule, n, limit))
    if limit < 1:
        raise ArgumentError(
            f"{_VERB}(schedule={schedule!r}): the model has {n} layer group, the head, and nothing before it to "
            "freeze. Fix: pass groups=[...] with the blocks before the head, or freeze_last=True."
        )
    if schedule == "grad_norm":
        _only_for("total", total, "'freezeout'", "grad_norm")
        _only_for("t0", t0, "'freezeout'", "grad_norm")
        value = THRESHOLD_DEFAULT if threshold is None else _number(threshold, "threshold")
        return Plan("grad_norm", threshold=value)
    _only_for("threshold", threshold, "'grad_norm'", "FreezeOut")
    if total is None:
        raise ArgumentError(
            f"{_VERB}(schedule={schedule!r}, total=None): FreezeOut needs the length of training. "
            "Fix: pass total=<epochs> (interval='epoch') or total=<optimizer steps> (interval='step')."
        )
    total = _count(total, "total")
    start = T0_DEFAULT[schedule] if t0 is None else _number(t0, "t0")
    miles = freezeout_milestones(total, start, n, limit, schedule == "freezeout-cubic")
    return Plan(schedule, milestones=miles, total=total, t0=start)


def freeze_more(
    first: int, limit: int, previous: Sequence[float | None], current: Sequence[float], threshold: float
) -> int:
    """How many leading groups to freeze after the gradient-norm test (AutoFreeze, arXiv:2102.01386).

    Starting at the frontmost trainable group ``first``, each group whose mean gradient norm
    changed by less than ``threshold`` (relative to the previous interval) freezes, and the test
    moves on to the next one; it stops at the first group that changed more, that has no previous
    interval, or that received no gradient.

    >>> freeze_more(1, 3, [None, 2.0, 1.0], [0.0, 2.1, 2.0], 0.1)
    2
    """
    k = first
    while k < limit:
        prev, cur = previous[k], current[k]
        if prev is None or not prev > 0.0 or not math.isfinite(cur) or abs(cur - prev) / prev >= threshold:
            break
        k += 1
    return k


def check_overlap(groups: Sequence[Selector], members: Sequence[Selection], verb: str = _VERB) -> None:
    """Refuse groups that share a parameter path: "the first k groups" must be a prefix of the model.

    Raises:
        ArgumentError: a parameter in two groups (the message names it and both groups).
    """
    owner: dict[str, int] = {}
    for i, sel in enumerate(members):
        for path in sel.parameters:
            j = owner.setdefault(path, i)
            if j != i:
                raise ArgumentError(
                    f"{verb}(groups={short_repr(list(groups), 120)}): the parameter {path!r} is in group {j} "
                    f"({short_repr(groups[j])}) and in group {i} ({short_repr(groups[i])}); expected groups that "
                    "do not overlap (each parameter in one group). Nothing was changed. Fix: name each block "
                    "once, e.g. groups=['layers.0', 'layers.1', 'head']."
                )


def check_optimizer_holds(model: nn.Module, optimizer: torch.optim.Optimizer, verb: str = _VERB) -> None:
    """Refuse an optimizer that holds none of ``model``'s parameters (by identity): it trains another model.

    Raises:
        ArgumentError: no parameter the optimizer holds is one of ``model``'s.
    """
    mine = {id(p) for p in model.parameters()}
    if any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
        return
    held = sum(len(g["params"]) for g in optimizer.param_groups)
    raise ArgumentError(
        f"{verb}(optimizer={type(optimizer).__name__}): it holds {held} parameter(s), none of them the model's; "
        "expected an optimizer that holds parameters of `model` (frozen ones leave it). Nothing was changed. "
        "Fix: pass the optimizer built from this model, e.g. torch.optim.AdamW(model.parameters())."
    )
