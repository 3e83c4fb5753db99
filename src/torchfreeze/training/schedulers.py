"""LR schedulers that take a parameter group added mid-run (issue 10.1, 15.2, 15.3).

``torch.optim.lr_scheduler`` schedulers keep per-group state (``base_lrs``, ``max_lrs``,
``lr_lambdas``, ``min_lrs``, ``_last_lr``, and ``initial_lr``/``max_lr``/``min_lr`` in the
optimizer's groups) whose length is fixed when they are created; a group added later breaks
them inside torch (``KeyError: 'max_lr'``, ``zip() argument 2 is shorter``). :func:`join`
extends that state for a new group as a copy of a *reference* group's, scaled by the ratio of
the two groups' base learning rates, so the new group follows the same curve scaled to its own
base lr: the lr it has now and every later one are what the scheduler would give a group with
that base lr that had been there from the start. Schedulers of other classes (subclasses
included, whose state torchfreeze cannot know) are refused by :func:`check_scheduler` before
anything changes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.optim import lr_scheduler as L

from torchfreeze._core.checks import require_choice, short_repr
from torchfreeze.errors import ArgumentError, ArgumentTypeError

__all__ = [
    "SUPPORTED",
    "check_scheduler",
    "join",
    "joined_options",
    "lr_slots",
    "set_warm",
    "sync_last_lr",
    "warm_snapshot",
    "warmup_factor",
]

#: Scheduler classes whose per-group state :func:`join` extends (exact types; their children too).
SUPPORTED: tuple[type, ...] = (
    L.LambdaLR,
    L.MultiplicativeLR,
    L.StepLR,
    L.MultiStepLR,
    L.ConstantLR,
    L.LinearLR,
    L.ExponentialLR,
    L.SequentialLR,
    L.PolynomialLR,
    L.CosineAnnealingLR,
    L.ChainedScheduler,
    L.ReduceLROnPlateau,
    L.CyclicLR,
    L.CosineAnnealingWarmRestarts,
    L.OneCycleLR,
)
_SCALED_LISTS = ("base_lrs", "max_lrs", "min_lrs")  # learning rates: scaled
_COPIED_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")  # factors and momenta: copied
_SCALED_KEYS = ("initial_lr", "max_lr", "min_lr")  # OneCycleLR and every LRScheduler's initial_lr
_COPIED_KEYS = ("max_momentum", "base_momentum")


def _tree(scheduler: Any) -> Iterator[Any]:
    """The scheduler and its children (SequentialLR, ChainedScheduler), depth first."""
    yield scheduler
    for child in getattr(scheduler, "_schedulers", ()) or ():
        yield from _tree(child)


def check_scheduler(scheduler: object, optimizer: torch.optim.Optimizer, verb: str) -> None:
    """Refuse a scheduler that :func:`join` cannot extend exactly, before anything changes.

    A cosine floor (``eta_min > 0``) is placed exactly for a plain or ``SequentialLR``
    scheduler; inside a ``ChainedScheduler`` the new group's lr would only approximate the
    curve, so that combination is refused rather than silently off.

    Args:
        scheduler: the scheduler attached to ``optimizer`` (``None`` passes).
        optimizer: the optimizer the new groups go to.
        verb: the public call, for the message.

    Raises:
        ArgumentTypeError: ``scheduler`` is not a ``torch.optim.lr_scheduler`` scheduler.
        ArgumentError: it drives another optimizer, is of a class torchfreeze cannot extend, or
            its per-group state does not match the optimizer's groups.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> check_scheduler(torch.optim.lr_scheduler.StepLR(opt, 1), opt, "add_unfrozen")
    """
    if scheduler is None:
        return
    if not isinstance(scheduler, L.LRScheduler):
        raise ArgumentTypeError(
            f"{verb}(scheduler={short_repr(scheduler)}): expected a torch.optim.lr_scheduler scheduler, got "
            f"{type(scheduler).__name__}. Fix: pass the LR scheduler that drives the optimizer, or None."
        )
    n = len(optimizer.param_groups)
    for s in _tree(scheduler):
        if type(s) not in SUPPORTED:
            raise ArgumentError(
                f"{verb}(scheduler=<{type(s).__name__}>): torchfreeze cannot extend this scheduler's per-group "
                f"state to a new parameter group (it extends {', '.join(c.__name__ for c in SUPPORTED)}). "
                "Fix: create the scheduler after the last unfreeze, or unfreeze at the start and keep the "
                "parameters out of training with lr=0 until their turn."
            )
        if getattr(s, "optimizer", None) is not optimizer:
            raise ArgumentError(
                f"{verb}(scheduler=<{type(s).__name__}>): the scheduler drives another optimizer. "
                "Fix: pass the scheduler created over this optimizer."
            )
        floored = isinstance(s, (L.CosineAnnealingLR, L.CosineAnnealingWarmRestarts)) and float(s.eta_min) != 0.0
        if floored and isinstance(scheduler, L.ChainedScheduler):
            raise ArgumentError(
                f"{verb}(scheduler=<{type(s).__name__}>): a cosine floor eta_min={s.eta_min} inside a "
                "ChainedScheduler cannot be extended exactly to a new group. Fix: use eta_min=0, or "
                "SequentialLR instead of ChainedScheduler."
            )
        for attr in (*_SCALED_LISTS, *_COPIED_LISTS, "_last_lr"):
            value = getattr(s, attr, None)
            if isinstance(value, list) and len(value) != n:
                raise ArgumentError(
                    f"{verb}(scheduler=<{type(s).__name__}>): its {attr} has {len(value)} entries but the "
                    f"optimizer has {n} parameter groups (a group was added without the scheduler). "
                    "Fix: pass scheduler= at every add_unfrozen/GradualUnfreezing, or rebuild the scheduler."
                )


def _like(template: Any, value: Any) -> Any:
    """``value`` in the type of ``template`` (a tensor lr stays a tensor)."""
    if isinstance(template, torch.Tensor):
        return value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=template.dtype)
    return float(value)


def _floor(scheduler: Any) -> float:
    """The absolute floor the active scheduler pulls towards (``eta_min`` of the cosine ones), else 0."""
    s = scheduler
    while isinstance(s, L.SequentialLR):
        s = s._schedulers[bisect_right(s._milestones, s.last_epoch)]
    if isinstance(s, (L.CosineAnnealingLR, L.CosineAnnealingWarmRestarts)):
        return float(s.eta_min)
    return 0.0


def _base(group: dict[str, Any]) -> Any:
    return group.get("initial_lr", group["lr"])


def joined_options(optimizer: torch.optim.Optimizer, scheduler: Any, ref: int, scale: float) -> dict[str, Any]:
    """Options (lr and the scheduler's per-group keys) for a new group following group ``ref`` scaled.

    The lr is where the schedule is now for a group of base lr ``scale * base(ref)``:
    ``floor + (base_new - floor) * (lr_ref - floor) / (base_ref - floor)`` (``floor`` is the
    active cosine scheduler's ``eta_min``, else 0, where this is ``scale * lr_ref``).
    """
    rg = optimizer.param_groups[ref]
    out: dict[str, Any] = {}
    for key in _SCALED_KEYS:
        if key in rg:
            out[key] = _like(rg[key], rg[key] * scale)
    for key in _COPIED_KEYS:
        if key in rg:
            out[key] = rg[key]
    if scheduler is not None and any(getattr(s, "cycle_momentum", False) for s in _tree(scheduler)):
        for key in ("momentum", "betas"):
            if key in rg:
                out[key] = rg[key]
    floor = _floor(scheduler) if scheduler is not None else 0.0
    base_ref = float(_base(rg))
    lr_ref = rg["lr"]
    if floor and base_ref != floor:
        value = floor + (base_ref * scale - floor) * (float(lr_ref) - floor) / (base_ref - floor)
    else:
        value = lr_ref * scale
    out["lr"] = _like(lr_ref, value)
    return out


def join(optimizer: torch.optim.Optimizer, scheduler: Any, ref: int, scale: float) -> None:
    """Extend ``scheduler``'s per-group state for the optimizer's last group (just added).

    The last group follows group ``ref``'s curve scaled by ``scale``: learning-rate lists are
    scaled, lambdas and momenta copied, ``_last_lr`` takes the group's lr. The caller has run
    :func:`check_scheduler` and built the group with :func:`joined_options`.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(a.parameters(), lr=0.1)
        >>> s = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
        >>> opt.step(); s.step()
        >>> opt.add_param_group({"params": b.parameters(), **joined_options(opt, s, 0, 0.1)})
        >>> join(opt, s, 0, 0.1); opt.step(); s.step()
        >>> [round(lr, 6) for lr in s.get_last_lr()]
        [0.025, 0.0025]
    """
    if scheduler is None:
        return
    new = optimizer.param_groups[-1]
    for s in _tree(scheduler):
        for attr in _SCALED_LISTS:
            value = getattr(s, attr, None)
            if isinstance(value, list):
                value.append(_like(value[ref], value[ref] * scale))
        for attr in _COPIED_LISTS:
            value = getattr(s, attr, None)
            if isinstance(value, list):
                value.append(value[ref])
        last = getattr(s, "_last_lr", None)
        if isinstance(last, list) and len(last) == len(optimizer.param_groups) - 1:
            last.append(_like(new["lr"], new["lr"]))


def lr_slots(optimizer: torch.optim.Optimizer, scheduler: Any, index: int) -> list[tuple[Any, Any]]:
    """Every place holding a base/peak/floor learning rate of group ``index``: ``(container, key)``.

    A warm-up scales these (with the group's ``lr``) so that both chainable and closed-form
    schedulers carry the warm-up factor.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> s = torch.optim.lr_scheduler.StepLR(opt, 1)
        >>> [k for _, k in lr_slots(opt, s, 0)]
        ['initial_lr', 0]
    """
    group = optimizer.param_groups[index]
    out: list[tuple[Any, Any]] = [(group, k) for k in _SCALED_KEYS if k in group]
    if scheduler is not None:
        for s in _tree(scheduler):
            for attr in _SCALED_LISTS:
                value = getattr(s, attr, None)
                if isinstance(value, list):
                    out.append((value, index))
    return out


def sync_last_lr(optimizer: torch.optim.Optimizer, scheduler: Any, index: int) -> None:
    """Set ``get_last_lr()[index]`` of the scheduler and its children to the group's lr."""
    if scheduler is None:
        return
    lr = optimizer.param_groups[index]["lr"]
    for s in _tree(scheduler):
        last = getattr(s, "_last_lr", None)
        if isinstance(last, list) and index < len(last):
            last[index] = _like(lr, lr)


def warmup_factor(t: int, units: int, start: float, curve: str) -> float:
    """Warm-up factor ``t`` units after a group was unfrozen: ``start`` at 0, 1 from ``units`` on.

    ``"linear"``: ``start + (1 - start) * t / units``; ``"geometric"``: ``start ** (1 - t / units)``
    (the same factor every unit, like Lightning's ``BackboneFinetuning`` raising the backbone's lr
    by a constant factor each epoch).

    Example:
        >>> [round(warmup_factor(t, 3, 0.1, "linear"), 3) for t in range(5)]
        [0.1, 0.4, 0.7, 1.0, 1.0]
        >>> [round(warmup_factor(t, 2, 0.01, "geometric"), 3) for t in range(3)]
        [0.01, 0.1, 1.0]
    """
    if t >= units:
        return 1.0
    if curve == "linear":
        return start + (1.0 - start) * t / units
    return float(start ** (1.0 - t / units))


def warm_snapshot(optimizer: torch.optim.Optimizer, scheduler: Any, index: int) -> dict[str, Any]:
    """What a warm-up of group ``index`` scales from: its lr and base/peak/floor lrs before any factor.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> warm_snapshot(opt, None, 0)
        {'orig': [], 'lr0': 0.1}
    """
    return {
        "orig": [float(c[key]) for c, key in lr_slots(optimizer, scheduler, index)],
        "lr0": float(optimizer.param_groups[index]["lr"]),
    }


def set_warm(
    optimizer: torch.optim.Optimizer, scheduler: Any, entry: Mapping[str, Any], new: float, old: float
) -> None:
    """Move group ``entry["index"]`` from warm-up factor ``old`` to ``new``.

    The base/peak/floor lrs are set from the snapshot (:func:`warm_snapshot`) times ``new``, exact
    at the end of the warm-up; the lr itself is rescaled by ``new / old`` when a scheduler drives
    it (it evolves), else set to the snapshot's lr times ``new``. ``get_last_lr()`` follows.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> entry = {"index": 0, **warm_snapshot(opt, None, 0)}
        >>> set_warm(opt, None, entry, 0.5, 1.0); opt.param_groups[0]["lr"]
        0.05
    """
    index = int(entry["index"])
    group = optimizer.param_groups[index]
    for (container, key), orig in zip(lr_slots(optimizer, scheduler, index), entry["orig"]):
        container[key] = _like(container[key], orig * new)
    if scheduler is None:
        group["lr"] = _like(group["lr"], entry["lr0"] * new)
    else:
        group["lr"] = _like(group["lr"], group["lr"] * (new / old))
    sync_last_lr(optimizer, scheduler, index)


def check_warmup(warmup: object, start: object, curve: object, verb: str) -> None:
    """Validate warm-up options (``warmup`` units, ``warmup_start`` ratio, ``warmup_curve``).

    Raises:
        ArgumentTypeError: ``warmup`` is not an int, ``warmup_start`` not a number.
        ArgumentError: a negative ``warmup``, a ratio outside (0, 1], an unknown curve.

    Example:
        >>> check_warmup(3, 0.1, "linear", "GradualUnfreezing")
    """
    if not isinstance(warmup, int) or isinstance(warmup, bool):
        raise ArgumentTypeError(
            f"{verb}(warmup={short_repr(warmup)}): expected an int (units of step() to reach the full lr), got "
            f"{type(warmup).__name__}. Fix: warmup=3, or warmup=0 for none."
        )
    if warmup < 0:
        raise ArgumentError(f"{verb}(warmup={warmup}): expected an int >= 0. Fix: warmup=0 for no warm-up.")
    if not isinstance(start, (int, float)) or isinstance(start, bool):
        raise ArgumentTypeError(
            f"{verb}(warmup_start={short_repr(start)}): expected a number in (0, 1], got {type(start).__name__}. "
            "Fix: warmup_start=0.1 (Lightning's BackboneFinetuning)."
        )
    if not 0 < start <= 1:
        raise ArgumentError(
            f"{verb}(warmup_start={start!r}): expected a ratio in (0, 1]: the share of its lr a newly unfrozen "
            "group starts with. Fix: warmup_start=0.1 (Lightning's BackboneFinetuning)."
        )
    require_choice(curve, ("linear", "geometric"), verb, "warmup_curve")


def _copy_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A saved group entry of GradualUnfreezing as plain values (lists copied)."""
    out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in entry.items()}
    out["options"] = dict(entry["options"])
    return out


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    """Group options with tensors (a tensor lr) as floats, for a state dict."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
