"""Optimizer parameter groups that hold only what trains, and keeping them in sync."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim import lr_scheduler as L

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.select import Selector, resolve
from torchfreeze._core.uses import frozen_map, trainable_map
from torchfreeze._core.wrappers import unwrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.nn import is_norm, layer_groups
from torchfreeze.training._args import layer_group_list, positive
from torchfreeze.training.schedulers import _like, check_scheduler, join, joined_options

__all__ = ["param_groups", "add_unfrozen", "drop_frozen"]

#: Key of the optimizer-group entry where param_groups records its ladder.
LADDER = "torchfreeze_ladder"


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Parameters that get no weight decay: biases and the parameters of normalisation layers."""
    out: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        norm = is_norm(module)
        for pname, p in module.named_parameters(recurse=False):
            if norm or pname == "bias" or pname.endswith("_bias"):
                out.add(id(p))
    return out


def _group_lrs(lr: float, lr_mult: Any, n: int) -> list[float]:
    """Learning rate of each of ``n`` groups (input side first); ``lr_mult`` is validated even for one group."""
    if lr_mult is None:
        return [lr] * n
    if isinstance(lr_mult, (tuple, list)):
        if len(lr_mult) != 2:
            raise ArgumentError(
                f"param_groups(lr_mult={short_repr(lr_mult)}): expected a float ratio or a (low, high) pair of "
                "multipliers. Fix: pass e.g. lr_mult=2.6 or lr_mult=(0.01, 1.0)."
            )
        low = positive(lr_mult[0], "lr_mult", "param_groups", shown=lr_mult)
        high = positive(lr_mult[1], "lr_mult", "param_groups", shown=lr_mult)
        if n == 1:
            return [lr]
        return [lr * low * (high / low) ** (i / (n - 1)) for i in range(n)]
    ratio = positive(lr_mult, "lr_mult", "param_groups")
    return [lr * ratio ** -(n - 1 - i) for i in range(n)]  # n == 1: [lr]


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    lr_mult: float | tuple[float, float] | None = None,
    groups: Sequence[Selector] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups holding only the trainable parameters of ``model``.

    Frozen parameters (``requires_grad=False``, or used only through ``Frozen``) are left out,
    so no optimizer can move them. With ``weight_decay > 0`` each layer group is split in two:
    biases and normalisation-layer parameters get ``weight_decay=0``. With ``lr_mult`` the layer
    groups get discriminative learning rates: the last group (the head side) gets ``lr``.

    Args:
        model: any module.
        lr: learning rate of the last layer group.
        weight_decay: weight decay of the weight matrices (never applied to biases and norms).
        lr_mult: ``None`` (one learning rate); a float ``r``: each group's rate is ``r`` times
            the previous one (ULMFiT uses 2.6); or a ``(low, high)`` pair of multipliers of ``lr``
            spread geometrically from the first group to the last (like fastai's ``slice``).
        groups: layer groups as a list of selectors (input side first). Default: one group,
            or :func:`torchfreeze.layer_groups` when ``lr_mult`` is given. A parameter belongs to
            the first group that selects it; trainable parameters no group selects join the last.

    Returns:
        A list of dicts for any ``torch.optim`` optimizer. Each has ``params``, ``lr``,
        ``weight_decay``, ``name`` (``"group<i>"``, with ``"/no_decay"`` for the split half) and
        ``"torchfreeze_ladder"`` (its layer group, the lr of every layer group and the weight
        decay: what :func:`add_unfrozen` gives a group unfrozen later); empty groups are left out.
        Layer groups after the last trainable one (a frozen EMA copy registered after the head)
        take no rung of the ladder: the last *trainable* group gets ``lr``.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        ArgumentError: a bad ``lr``, ``weight_decay`` or ``lr_mult``; no trainable parameter.
        SelectorError: a group selector matches nothing.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> gs = param_groups(torchfreeze.freeze(m, "0"), 0.1, weight_decay=0.01)
        >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in gs]
        [('group0', 1, 0.01), ('group0/no_decay', 1, 0.0)]
        >>> opt = torch.optim.AdamW(gs)
    """
    require_module(model, "param_groups")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    lr = positive(lr, "lr", "param_groups")
    weight_decay = positive(weight_decay, "weight_decay", "param_groups", allow_zero=True)
    selectors = layer_group_list(groups, "param_groups")
    if selectors is None and lr_mult is not None:
        selectors = list(layer_groups(model))
    trainable = trainable_map(model)
    if not trainable:
        raise ArgumentError(
            "param_groups(model=...): found no trainable parameter in the model (everything is frozen); "
            "expected at least one. Fix: unfreeze something first, e.g. torchfreeze.unfreeze(model, 'head')."
        )
    # resolve every group before building anything (bad selectors raise, nothing changes)
    if selectors is None:
        members: list[list[tuple[str, nn.Parameter]]] = [list(trainable.items())]
    else:
        taken: set[int] = set()
        members = []
        for sel in selectors:
            sel_params = resolve(model, sel, verb="param_groups", argument="groups").unique_parameters()
            row = []
            for name, p in trainable.items():
                if id(p) in sel_params and id(p) not in taken:
                    row.append((name, p))
                    taken.add(id(p))
            members.append(row)
        rest = [(n, p) for n, p in trainable.items() if id(p) not in taken]
        order = {n: i for i, n in enumerate(trainable)}
        members[-1].extend(rest)
        members[-1].sort(key=lambda item: order[item[0]])
    # frozen groups after the last trainable one take no rung (issue 10.2): the last trainable group
    # gets ``lr``; a group behind it, if unfrozen later, gets ``lr`` too
    slots = max(i for i, row in enumerate(members) if row) + 1
    lrs = _group_lrs(lr, lr_mult, slots) + [lr] * (len(members) - slots)
    no_decay = _no_decay_ids(model) if weight_decay > 0 else set()
    out: list[dict[str, Any]] = []
    for i, (row, group_lr) in enumerate(zip(members, lrs)):
        decay = [p for _, p in row if id(p) not in no_decay]
        plain = [p for _, p in row if id(p) in no_decay]
        meta = {"layer_group": i, "ladder": list(lrs), "weight_decay": weight_decay}
        if decay:
            out.append(
                {"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": f"group{i}", LADDER: meta}
            )
        if plain:
            out.append(
                {"params": plain, "lr": group_lr, "weight_decay": 0.0, "name": f"group{i}/no_decay", LADDER: dict(meta)}
            )
    return out


def _held_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


class Planned(NamedTuple):
    """A group ``add_unfrozen`` will add: parameter names, options, reference group, lr scale."""

    names: list[str]
    options: dict[str, Any]
    ref: int
    scale: float
    base: float | None  # lr= as passed: set exactly where the schedule has not moved


def _reference(optimizer: torch.optim.Optimizer, exclude: set[int]) -> int:
    """The group a new one is scaled from: the last ladder group not warming up, else the last group."""
    candidates = [i for i in range(len(optimizer.param_groups)) if i not in exclude] or [
        len(optimizer.param_groups) - 1
    ]
    with_ladder = [i for i in candidates if isinstance(optimizer.param_groups[i].get(LADDER), dict)]
    return (with_ladder or candidates)[-1]


def _new_groups(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    lr: float | None,
    *,
    groups: Sequence[Selector] | None = None,
    exclude: set[int] | None = None,
) -> list[Planned]:
    """The groups ``add_unfrozen`` would add, computed without changing anything.

    The callers have checked ``model`` and ``optimizer``.
    """
    if lr is not None:
        lr = positive(lr, "lr", "add_unfrozen")
    held = _held_ids(optimizer)
    new = [(n, p) for n, p in trainable_map(model).items() if id(p) not in held]
    if not new:
        return []
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ArgumentError(
            "add_unfrozen cannot extend an LBFGS optimizer (it supports one parameter group and keeps "
            "a flat history of the parameters it started with). Fix: build a new LBFGS over "
            "[p for _, p in torchfreeze.trainable_parameters(model)] after unfreezing."
        )
    ref = _reference(optimizer, exclude or set())
    rg = optimizer.param_groups[ref]
    meta = rg.get(LADDER)
    ladder: list[float] = [float(x) for x in meta["ladder"]] if isinstance(meta, dict) else [1.0]
    ref_rung = ladder[int(meta["layer_group"])] if isinstance(meta, dict) else 1.0
    if isinstance(meta, dict):
        wd = float(meta["weight_decay"])
    else:  # not built by param_groups: the weight decay of the existing groups, never the defaults
        wds = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]
        wd = max((float(w) for w in wds if isinstance(w, (int, float))), default=0.0)
    layer_of = _layer_of(model, new, ladder, groups)
    no_decay = _no_decay_ids(model) if wd > 0 else set()
    base_ref = float(rg.get("initial_lr", rg["lr"]))
    tags = {str(g.get("name", "")).split("/")[0] for g in optimizer.param_groups}
    tag = f"unfrozen{sum(1 for t in tags if t.startswith('unfrozen'))}"
    layers = sorted(set(layer_of.values()))
    out: list[Planned] = []
    for j in layers:
        name = tag if len(layers) == 1 else f"{tag}/group{j}"
        for plain in (False, True):
            names = [n for n, p in new if layer_of[n] == j and (id(p) in no_decay) == plain]
            if not names:
                continue
            options: dict[str, Any] = {
                "name": f"{name}/no_decay" if plain else name,
                "weight_decay": 0.0 if plain else wd,
            }
            if isinstance(meta, dict):
                options[LADDER] = {"layer_group": j, "ladder": list(ladder), "weight_decay": wd}
            # lr= is in the ladder's units (what param_groups would have been given), so that a
            # scheduler that rewrote the lrs (OneCycleLR starts at max_lr / 25) scales it too
            scale = lr / (ref_rung if isinstance(meta, dict) else base_ref) if lr is not None else ladder[j] / ref_rung
            out.append(Planned(names, options, ref, scale, lr))
    return out


def _layer_of(
    model: nn.Module,
    new: list[tuple[str, nn.Parameter]],
    ladder: list[float],
    groups: Sequence[Selector] | None,
) -> dict[str, int]:
    """The layer group (rung of the ladder) of each new parameter: the first group selecting it, else the last."""
    if len(ladder) == 1:
        return {n: 0 for n, _ in new}
    selectors: list[Selector] = list(layer_groups(model) if groups is None else groups)
    if len(selectors) != len(ladder):
        raise ArgumentError(
            f"the optimizer's groups come from param_groups over {len(ladder)} layer groups but "
            f"{'groups=' if groups is not None else 'layer_groups(model)'} gives {len(selectors)}. Fix: pass "
            "groups=[...] as given to param_groups (or lr= to set the new group's learning rate)."
        )
    out: dict[str, int] = {}
    resolved = [resolve(model, sel).unique_parameters() for sel in selectors]
    for n, p in new:
        out[n] = next((j for j, ids in enumerate(resolved) if id(p) in ids), len(selectors) - 1)
    return out


def _add_groups(
    optimizer: torch.optim.Optimizer, model: nn.Module, planned: list[Planned], scheduler: Any = None
) -> list[dict[str, Any]]:
    """Add the planned groups (lr where the schedule is now, joined to ``scheduler``); return their options."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for item in planned:
        options = {**item.options, **joined_options(optimizer, scheduler, item.ref, item.scale)}
        if item.base is not None:  # exactly lr=, not lr_ref * (lr / lr_ref) one ulp away
            for key in ("lr", "initial_lr"):
                if key in options and math.isclose(float(options[key]), item.base, rel_tol=1e-12):
                    options[key] = _like(options[key], item.base)
        optimizer.add_param_group({"params": [by_name[n] for n in item.names], **options})
        join(optimizer, scheduler, item.ref, item.scale)
        out.append(options)
    return out


def _warn_unjoined(optimizer: torch.optim.Optimizer, scheduler: Any, verb: str) -> None:
    if scheduler is None and any("initial_lr" in g for g in optimizer.param_groups):
        warnings.warn(
            f"{verb}: the optimizer's groups carry 'initial_lr', so an LR scheduler drives them, but no "
            "scheduler= was passed: the new group starts at the current lr and the scheduler's per-group "
            "state does not know it (OneCycleLR, LambdaLR, CyclicLR, CosineAnnealingWarmRestarts fail at their "
            "next step). Fix: pass scheduler=<the scheduler>.",
            UserWarning,
            stacklevel=3,
        )


def add_unfrozen(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lr: float | None = None,
    scheduler: L.LRScheduler | None = None,
    groups: Sequence[Selector] | None = None,
) -> list[str]:
    """Add every trainable parameter the optimizer does not hold yet, as new parameter groups.

    Parameters are matched by identity, never by value. Learning rate and weight decay follow
    the optimizer's groups, never the optimizer constructor's defaults (issue 10.2):

    - over :func:`param_groups`: each new parameter takes the rung of the ladder of its layer
      group (the ``lr_mult`` spread kept) and the weight-decay rule (none on biases and norms);
      one new group per layer group touched (and its ``/no_decay`` half);
    - otherwise: the lr of the optimizer's last group and the largest weight decay of its groups
      (biases and norms split off with ``weight_decay=0`` when that is positive).

    The lr is where the schedule is *now* (issue 15.2): a backbone unfrozen after a StepLR
    decayed the head to ``0.0343`` starts at ``0.0343`` times its rung's ratio to the head's,
    not at the rate the optimizer was built with. With ``scheduler=``, the scheduler's
    per-group state is extended so the new group follows the same curve scaled to its own base
    lr (``torchfreeze.training.schedulers``). ``lr=`` sets the new groups' base lr instead (with
    a scheduler, the lr they have at its start). Groups are named ``"unfrozen<k>"``.

    Args:
        model: the model whose trainable parameters the optimizer should hold.
        optimizer: any ``torch.optim`` optimizer except LBFGS.
        lr: base learning rate of the new groups; default the ladder (above).
        scheduler: the ``torch.optim.lr_scheduler`` scheduler driving ``optimizer``, if any.
        groups: the layer groups given to :func:`param_groups` (default
            :func:`torchfreeze.layer_groups`), to find the rung of a new parameter.

    Returns:
        The names of the parameters added (empty if nothing was missing).

    Raises:
        ArgumentTypeError: ``model`` is not a module, ``optimizer`` not an optimizer (the order was
            ``(optimizer, model)`` before 0.2), ``scheduler`` not a scheduler.
        ArgumentError: bad ``lr``; LBFGS (it cannot take new groups); a scheduler that drives
            another optimizer or that torchfreeze cannot extend (the message says what to do);
            ``groups`` that do not match the ladder.

    Warns:
        UserWarning: the groups carry ``initial_lr`` (a scheduler exists) but no ``scheduler=``.

    Example:
        >>> import torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> opt = torch.optim.SGD(param_groups(m, 0.1, lr_mult=10.0), lr=0.1)
        >>> add_unfrozen(torchfreeze.unfreeze(m, "0"), opt)
        ['0.weight', '0.bias']
        >>> [round(g["lr"], 6) for g in opt.param_groups]
        [0.1, 0.01]
    """
    if isinstance(model, torch.optim.Optimizer) and isinstance(optimizer, nn.Module):
        raise ArgumentTypeError(
            "add_unfrozen(model=<optimizer>, optimizer=<module>): the arguments are swapped. "
            "Fix: add_unfrozen(model, optimizer) (model first, as in every torchfreeze verb since 0.2)."
        )
    require_module(model, "add_unfrozen")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"add_unfrozen(optimizer={short_repr(optimizer)}): expected a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}. Fix: pass the optimizer that trains the model."
        )
    check_scheduler(scheduler, optimizer, "add_unfrozen")
    planned = _new_groups(optimizer, model, lr, groups=layer_group_list(groups, "add_unfrozen"))
    if planned:
        _warn_unjoined(optimizer, scheduler, "add_unfrozen")
    _add_groups(optimizer, model, planned, scheduler)
    return [n for item in planned for n in item.names]


def drop_frozen(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Remove every frozen parameter of ``model`` from ``optimizer``, with its state (momentum, moments).

    The inverse of :func:`add_unfrozen`: parameters are matched by identity and dropped from
    their group's ``params``; the groups themselves stay, emptied if need be, so an LR
    scheduler's per-group lists stay aligned. Parameters of other models are left alone.

    Args:
        model: the model (frozen: no trainable use, as for :func:`torchfreeze.frozen_parameters`).
        optimizer: its optimizer.

    Returns:
        The names of the parameters removed (empty if the optimizer held none).

    Raises:
        ArgumentTypeError: ``model`` is not a module or ``optimizer`` not an optimizer.
        ArgumentError: LBFGS (its history is one flat vector over the parameters it started with).

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        >>> drop_frozen(torchfreeze.freeze(m, "0"), opt)
        ['0.weight', '0.bias']
        >>> [len(g["params"]) for g in opt.param_groups]
        [2]
    """
    require_module(model, "drop_frozen")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"drop_frozen(optimizer={short_repr(optimizer)}): expected a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}. Fix: pass the optimizer that trains the model."
        )
    frozen = {id(p): n for n, p in frozen_map(unwrap(model)).items()}
    held = _held_ids(optimizer)
    if isinstance(optimizer, torch.optim.LBFGS) and frozen.keys() & held:
        raise ArgumentError(
            "drop_frozen(optimizer=LBFGS): LBFGS keeps a flat history over the parameters it started with, so "
            "none can be removed. Fix: build a new LBFGS over [p for _, p in torchfreeze.trainable_parameters(model)]."
        )
    removed: list[str] = []
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in frozen]
        for p in group["params"]:
            if id(p) in frozen:
                optimizer.state.pop(p, None)
                removed.append(frozen[id(p)])
        group["params"][:] = kept  # in place: the group (and its index) stays
    return removed
