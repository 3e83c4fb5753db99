"""Optimizer parameter groups that hold only what trains, and keeping them in sync."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.select import Selector, resolve
from torchfreeze._core.uses import trainable_map
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.nn import is_norm, layer_groups

__all__ = ["param_groups", "add_unfrozen"]


def _positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ArgumentError(f"{name}={value!r} must be a finite number {bound}; for example {name}=1e-3.")
    return float(value)


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
                f"lr_mult={lr_mult!r} must be a float ratio or a (low, high) pair of multipliers, "
                "e.g. lr_mult=2.6 or lr_mult=(0.01, 1.0)."
            )
        low = _positive(lr_mult[0], "lr_mult[0]")
        high = _positive(lr_mult[1], "lr_mult[1]")
        if n == 1:
            return [lr]
        return [lr * low * (high / low) ** (i / (n - 1)) for i in range(n)]
    ratio = _positive(lr_mult, "lr_mult")
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
        ``weight_decay`` and ``name`` (``"group<i>"``, with ``"/no_decay"`` for the split half);
        empty groups are left out.

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
    lr = _positive(lr, "lr")
    weight_decay = _positive(weight_decay, "weight_decay", allow_zero=True)
    if groups is None:
        selectors: list[Selector] | None = list(layer_groups(model)) if lr_mult is not None else None
    else:
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
            raise ArgumentError(
                f"groups={groups!r} must be a list of selectors, one per layer group (input side first), "
                "e.g. groups=['encoder.layer.0', 'encoder.layer.1', 'head']."
            )
        if len(groups) == 0:
            raise ArgumentError("groups=[] names no layer group; pass None for one group or a list of selectors.")
        selectors = list(groups)
    trainable = trainable_map(model)
    if not trainable:
        raise ArgumentError(
            "param_groups found no trainable parameter in the model (everything is frozen); "
            "unfreeze something first, e.g. torchfreeze.unfreeze(model, 'head')."
        )
    # resolve every group before building anything (bad selectors raise, nothing changes)
    if selectors is None:
        members: list[list[tuple[str, nn.Parameter]]] = [list(trainable.items())]
    else:
        taken: set[int] = set()
        members = []
        for sel in selectors:
            sel_params = resolve(model, sel).unique_parameters()
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
    lrs = _group_lrs(lr, lr_mult, len(members))
    no_decay = _no_decay_ids(model) if weight_decay > 0 else set()
    out: list[dict[str, Any]] = []
    for i, (row, group_lr) in enumerate(zip(members, lrs)):
        decay = [p for _, p in row if id(p) not in no_decay]
        plain = [p for _, p in row if id(p) in no_decay]
        if decay:
            out.append({"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": f"group{i}"})
        if plain:
            out.append({"params": plain, "lr": group_lr, "weight_decay": 0.0, "name": f"group{i}/no_decay"})
    return out


def _held_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _new_groups(
    optimizer: torch.optim.Optimizer, model: nn.Module, lr: float | None
) -> list[tuple[list[str], dict[str, Any]]]:
    """The groups ``add_unfrozen`` would add: (parameter names, group options without params).

    The callers have checked ``model`` and ``optimizer``.
    """
    group_lr = _positive(lr, "lr") if lr is not None else optimizer.defaults.get("lr")
    if isinstance(group_lr, torch.Tensor):
        group_lr = group_lr.clone()
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
    wd = optimizer.defaults.get("weight_decay", 0.0)
    no_decay = _no_decay_ids(model) if isinstance(wd, (int, float)) and wd > 0 else set()
    tags = {str(g.get("name", "")).split("/")[0] for g in optimizer.param_groups}
    tag = f"unfrozen{sum(1 for t in tags if t.startswith('unfrozen'))}"
    has_initial = all("initial_lr" in g for g in optimizer.param_groups)
    out: list[tuple[list[str], dict[str, Any]]] = []
    split: tuple[tuple[list[str], dict[str, Any]], ...] = (
        ([n for n, p in new if id(p) not in no_decay], {"name": tag}),
        ([n for n, p in new if id(p) in no_decay], {"name": f"{tag}/no_decay", "weight_decay": 0.0}),
    )
    for names, options in split:
        if names:
            if group_lr is not None:
                options["lr"] = group_lr
                if has_initial:
                    options["initial_lr"] = group_lr
            out.append((names, options))
    return out


def _add_groups(
    optimizer: torch.optim.Optimizer, model: nn.Module, planned: list[tuple[list[str], dict[str, Any]]]
) -> None:
    by_name = dict(model.named_parameters(remove_duplicate=False))
    for names, options in planned:
        optimizer.add_param_group({"params": [by_name[n] for n in names], **options})


def add_unfrozen(model: nn.Module, optimizer: torch.optim.Optimizer, *, lr: float | None = None) -> list[str]:
    """Add every trainable parameter the optimizer does not hold yet, as a new parameter group.

    Parameters are matched by identity, never by value. The new group takes ``lr`` (default: the
    optimizer's default ``lr``) and the optimizer's default options; when the optimizer's default
    ``weight_decay`` is positive, biases and normalisation parameters go to a second group with
    ``weight_decay=0``. Groups are named ``"unfrozen<k>"``. If the groups carry ``initial_lr``
    (an LR scheduler was created), the new group gets one too; schedulers created earlier do not
    know the new group, so create the LR scheduler after the last unfreeze or rebuild it.

    Args:
        model: the model whose trainable parameters the optimizer should hold.
        optimizer: any ``torch.optim`` optimizer except LBFGS.
        lr: learning rate of the new group.

    Returns:
        The names of the parameters added (empty if nothing was missing).

    Raises:
        ArgumentTypeError: ``model`` is not a module or ``optimizer`` not an optimizer (the
            order was ``(optimizer, model)`` before 0.2).
        ArgumentError: bad ``lr``; LBFGS (it cannot take new groups).

    Example:
        >>> import torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> opt = torch.optim.SGD(param_groups(m, 0.1), lr=0.1)
        >>> add_unfrozen(torchfreeze.unfreeze(m, "0"), opt, lr=0.01)
        ['0.weight', '0.bias']
        >>> len(opt.param_groups)
        2
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
    planned = _new_groups(optimizer, model, lr)
    _add_groups(optimizer, model, planned)
    return [n for names, _ in planned for n in names]
