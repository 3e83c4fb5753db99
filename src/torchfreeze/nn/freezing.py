"""Freeze state: ``requires_grad`` is the single source of truth, ``Frozen`` uses are structural."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from torchfreeze._core.checks import require_bool, require_module, short_repr
from torchfreeze._core.mode import Mode, check_mode, get_pin, set_pin, unpin_modules
from torchfreeze._core.select import Selection, Selector, resolve
from torchfreeze._core.uses import FrozenOnly, parameter_uses, set_requires_grad
from torchfreeze.errors import ArgumentError, ArgumentTypeError, SharedParameterError
from torchfreeze.nn._switches import pin_skipping_parents, release_skipping_parents, sync_gradient_switches
from torchfreeze.nn.batchnorm import is_converted_batchnorm, is_norm, unconvert_batchnorm
from torchfreeze.nn.groups import layer_groups

__all__ = [
    "freeze",
    "unfreeze",
    "is_frozen",
    "trainable_parameters",
    "frozen_parameters",
    "freeze_to",
    "layer_groups",
    "prepare_for_distributed",
    "restore_full_precision",
    "STORAGE_ATTR",
]

Shared = Literal["error", "freeze"]
_SHARED_POLICIES = ("error", "freeze")

#: Attribute a module stored in low precision carries (set by
#: ``torchfreeze.compose.store_frozen_backbone``): the dtype it is stored in.
STORAGE_ATTR = "_torchfreeze_storage_dtype"


def restore_full_precision(model: nn.Module, params: Sequence[nn.Parameter], modules: Sequence[nn.Module] = ()) -> None:
    """A module stored in fp16/bf16 goes back to float32 before any of its parameters trains (issue 10.3).

    ``params`` are the parameters about to train; ``modules`` are modules about to get trainable
    parameters back (converted BatchNorm layers, whose statistics are buffers until then).
    ``Module.to`` swaps ``.data``, so parameter identity (what optimizers hold) is kept.
    """
    ids = {id(p) for p in params}
    module_ids = {id(m) for m in modules}
    if not ids and not module_ids:
        return
    for module in model.modules():
        if module.__dict__.get(STORAGE_ATTR) is None:
            continue
        if any(id(p) in ids for p in module.parameters()) or any(id(m) in module_ids for m in module.modules()):
            module.to(torch.float32)
            del module.__dict__[STORAGE_ATTR]


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Iterate ``(name, parameter)`` over the parameters that training can change.

    A parameter is trainable when it requires grad and has at least one use
    outside ``Frozen``. Each parameter appears once, under its first trainable path.

    Args:
        model: any ``nn.Module``.

    Returns:
        An iterator of ``(qualified name, parameter)`` in model order.

    Example:
        >>> from torch import nn
        >>> from torchfreeze import Frozen
        >>> model = nn.Sequential(nn.Linear(2, 2), Frozen(nn.Linear(2, 2)))
        >>> [name for name, _ in trainable_parameters(model)]
        ['0.weight', '0.bias']
    """
    require_module(model, "trainable_parameters")  # checked at the call, not at the first next()
    return ((e.trainable_paths[0], e.parameter) for e in parameter_uses(model).values() if e.trainable)


def frozen_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Iterate ``(name, parameter)`` over the parameters that no optimizer step may change.

    That is every parameter that is not trainable: ``requires_grad=False``, or
    used only through ``Frozen``. Each appears once, under its first path.

    Args:
        model: any ``nn.Module``.

    Returns:
        An iterator of ``(qualified name, parameter)`` in model order.

    Example:
        >>> from torch import nn
        >>> model = freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0")
        >>> [name for name, _ in frozen_parameters(model)]
        ['0.weight', '0.bias']
    """
    require_module(model, "frozen_parameters")  # checked at the call, not at the first next()
    return ((e.paths[0], e.parameter) for e in parameter_uses(model).values() if not e.trainable)


def _plan(
    model: nn.Module,
    selection: Selection,
    *,
    requires_grad: bool,
    train_bn: bool,
    shared: Shared,
    verb: str,
) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """Validate and list what a (un)freeze would change, changing nothing."""
    if shared not in _SHARED_POLICIES:
        raise ArgumentError(
            f"shared={shared!r} is not a policy; expected 'error' or 'freeze'. Fix: pass "
            "shared='freeze' to change every use of a shared parameter, or leave the default 'error'."
        )
    require_bool(train_bn, verb, "train_bn")
    modules = dict(model.named_modules(remove_duplicate=False))
    skip_norm_params: set[int] = set()
    if train_bn:
        for name, param in selection.parameters.items():
            if is_norm(modules[name.rpartition(".")[0]]):
                skip_norm_params.add(id(param))
    targets: dict[int, nn.Parameter] = {}
    for param in selection.parameters.values():
        if id(param) not in skip_norm_params and param.requires_grad != requires_grad:
            targets[id(param)] = param
    if requires_grad and targets:
        _refuse_inside_frozen_only(modules, selection, targets, verb)
    if shared == "error" and targets:
        uses = parameter_uses(model)
        selected_paths = set(selection.parameters)
        for key in targets:
            outside = [p for p in uses[key].trainable_paths if p not in selected_paths]
            if outside:
                inside = next(p for p in uses[key].paths if p in selected_paths)
                raise SharedParameterError(
                    f"cannot {verb} {inside!r}: the same parameter is also used as {outside[0]!r}, "
                    f"outside the selection, and the call would silently {verb} that use too. "
                    f"Fix: add {outside[0].rpartition('.')[0] or outside[0]!r} to the selection, or pass "
                    f"shared='freeze' to {verb} every use on purpose."
                )
    pin_targets = [m for m in selection.unique_modules().values() if not (train_bn and is_norm(m))]
    return list(targets.values()), pin_targets


def freeze(
    model: nn.Module,
    *selectors: Selector,
    mode: Mode | None = None,
    train_bn: bool = False,
    shared: Shared = "error",
) -> nn.Module:
    """Freeze the selected parameters: ``requires_grad=False`` and ``.grad=None``.

    Freezing never changes a ``training`` flag unless ``mode`` asks for it.

    Args:
        model: any ``nn.Module``.
        *selectors: what to freeze (see :func:`torchfreeze.select`); none means the whole model.
        mode: ``None`` leaves train/eval behaviour alone; ``"eval"`` or ``"train"`` also
            pins that mode on every selected module (:func:`torchfreeze.unfreeze` removes it).
            A module already pinned by :func:`pin_mode` or ``Frozen(mode=...)`` keeps that
            pin (say, Monte-Carlo dropout inside a frozen eval backbone).
        train_bn: keep normalisation layers inside the selection trainable and unpinned.
        shared: ``"error"`` refuses to freeze a parameter also used (trainably) outside the
            selection; ``"freeze"`` freezes it for every use.

    Returns:
        The model, changed in place.

    Raises:
        SelectorError: a selector matched nothing (the message lists the closest names).
        SelectorTypeError: a selector of an unsupported kind.
        SharedParameterError: ``shared="error"`` and a selected parameter is tied to one outside.
        ModeError: ``mode`` is not ``None``, ``"train"`` or ``"eval"``.
        ArgumentError: ``shared`` is not a known policy, or ``train_bn`` is not a bool.

    Nothing changes when it raises: every check runs before the first change.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Linear(2, 1))
        >>> _ = freeze(model, "0", mode="eval")
        >>> model[0].weight.requires_grad, model.train()[0].training, model[1].training
        (False, False, True)
    """
    require_module(model, "freeze")
    check_mode(mode, allow_none=True)
    selection = resolve(model, *selectors, verb="freeze")
    params, pin_targets = _plan(model, selection, requires_grad=False, train_bn=train_bn, shared=shared, verb="freeze")
    set_requires_grad(params, False)
    if mode is not None:
        for module in pin_targets:
            pin = get_pin(module)
            if pin is None or pin.origin == "freeze":  # pins from pin_mode / Frozen(mode=...) stay theirs
                set_pin(module, mode, "freeze")
    sync_gradient_switches(selection.unique_modules().values())  # the model's own switch agrees (nn/_switches.py)
    if mode == "eval":
        pin_skipping_parents(model)  # LayerDrop over layers now frozen and eval: the parent's coin stops too
    return model


def _can_train(p: nn.Parameter) -> bool:
    """Only floating-point and complex tensors can require grad (an integer parameter stays frozen)."""
    return bool(p.is_floating_point() or p.is_complex())


def unfreeze(model: nn.Module, *selectors: Selector, shared: Shared = "error") -> nn.Module:
    """Make the selected parameters trainable again and remove the pins ``freeze`` set.

    Pins set by :func:`pin_mode` or ``Frozen(mode=...)`` stay. ``FrozenBatchNorm``
    modules in the selection are swapped back to trainable BatchNorm layers.

    Args:
        model: any ``nn.Module``.
        *selectors: what to unfreeze; none means the whole model.
        shared: ``"error"`` refuses to unfreeze a parameter also used (frozen) outside the
            selection; ``"freeze"`` unfreezes every use.

    Returns:
        The model, changed in place.

    Raises:
        SelectorError: a selector matched nothing.
        SharedParameterError: ``shared="error"`` and a selected parameter is tied to one outside.
        ArgumentError: ``shared`` is not a known policy.

    Example:
        >>> from torch import nn
        >>> model = freeze(nn.Sequential(nn.Linear(2, 2)), mode="eval")
        >>> _ = unfreeze(model)
        >>> model[0].weight.requires_grad, model.train()[0].training
        (True, True)
    """
    require_module(model, "unfreeze")
    selection = resolve(model, *selectors, verb="unfreeze")
    params, _ = _plan(model, selection, requires_grad=True, train_bn=False, shared=shared, verb="unfreeze")
    _warn_if_only_frozen_uses(model, selection)
    params = [p for p in params if _can_train(p)]  # integer parameters cannot require grad: left as they are
    restore_full_precision(model, params)
    set_requires_grad(params, True)
    _release(model, selection)
    return model


def _refuse_inside_frozen_only(
    modules: dict[str, nn.Module], selection: Selection, targets: dict[int, nn.Parameter], verb: str
) -> None:
    """A parameter inside a feature cache (a FrozenOnly wrapper) can never train: refuse before any change."""
    wrappers = [name for name, m in modules.items() if isinstance(m, FrozenOnly)]
    for path, param in selection.parameters.items():
        inside = next((w for w in wrappers if w == "" or path.startswith(w + ".")), None)
        if inside is not None and id(param) in targets:
            attr = f"model.{inside}" if inside else "model"
            raise ArgumentError(
                f"cannot {verb} {path!r}: it lies inside the feature cache {inside or '<model>'!r}, which serves "
                f"stored outputs of a frozen module. Fix: unwrap the cache first ({attr} = {attr}.module), "
                f"then {verb}."
            )


def _warn_if_only_frozen_uses(model: nn.Module, selection: Selection) -> None:
    """Warn when every selected parameter is used only through ``Frozen``: unfreezing cannot make it train."""
    uses = parameter_uses(model)
    selected = [uses[id(p)] for p in selection.parameters.values() if id(p) in uses]
    if selected and not any(entry.trainable_paths for entry in selected):
        names = short_repr([entry.name for entry in selected], 120)
        warnings.warn(
            f"unfreeze: the selected parameters {names} are used only through Frozen, so they stay frozen "
            "(a Frozen use never trains). Fix: replace the wrapper by its module (parent.x = parent.x.module) "
            "to train them.",
            UserWarning,
            stacklevel=3,
        )


def _release(model: nn.Module, selection: Selection) -> None:
    """Undo what freezing did besides the flag: pins set by ``freeze``, converted BatchNorm layers."""
    unpin_modules(model, selection.unique_modules().values(), origins={"freeze"})
    converted = [n for n, m in selection.modules.items() if is_converted_batchnorm(m)]
    restore_full_precision(model, [], [selection.modules[n] for n in converted])
    unconvert_batchnorm(model, converted)
    sync_gradient_switches(model.modules())
    release_skipping_parents(model)


def is_frozen(model: nn.Module, *selectors: Selector) -> bool:
    """True when no parameter in the selection is trainable (vacuously true without parameters).

    Trainable is structural, as in :func:`trainable_parameters`: a parameter
    used only through ``Frozen`` counts as frozen.

    Args:
        model: any ``nn.Module``.
        *selectors: what to ask about; none means the whole model.

    Returns:
        ``True`` when every selected parameter is frozen.

    Raises:
        SelectorError: a selector matched nothing.
        SelectorTypeError: a selector of an unsupported kind.

    Example:
        >>> from torch import nn
        >>> model = freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0")
        >>> is_frozen(model, "0"), is_frozen(model)
        (True, False)
    """
    require_module(model, "is_frozen")
    selection = resolve(model, *selectors, verb="is_frozen")
    uses = parameter_uses(model)
    return not any(uses[id(p)].trainable for p in selection.parameters.values())


def prepare_for_distributed(model: nn.Module) -> nn.Module:
    """Turn off ``requires_grad`` on every parameter that has no trainable use in ``model``.

    DDP and FSDP fail on a parameter that requires grad but never receives one.
    A module wrapped in ``Frozen`` keeps ``requires_grad=True`` (it may be used
    unwrapped elsewhere: a tie), and only the whole model can tell. Call this
    once on the complete model, before wrapping it in DDP/FSDP; undo it with
    :func:`unfreeze` on the wrapped modules.

    Args:
        model: the complete model, every use of every module included.

    Returns:
        The model, changed in place.

    Example:
        >>> from torch import nn
        >>> from torchfreeze import Frozen
        >>> inner = nn.Linear(2, 2)
        >>> model = prepare_for_distributed(nn.Sequential(nn.Linear(2, 2), Frozen(inner)))
        >>> inner.weight.requires_grad, model[0].weight.requires_grad
        (False, True)
    """
    require_module(model, "prepare_for_distributed")
    uses = parameter_uses(model).values()
    unused = [e.parameter for e in uses if e.parameter.requires_grad and not e.trainable_paths]
    set_requires_grad(unused, False)
    return model


def freeze_to(
    model: nn.Module,
    n: int,
    groups: Sequence[Selector] | None = None,
    *,
    train_bn: bool = False,
    shared: Shared = "error",
) -> nn.Module:
    """Freeze the first ``n`` layer groups and unfreeze the rest (fastai's ``freeze_to``).

    Unfreezing the rest is :func:`unfreeze` on those groups: their ``freeze`` pins
    are removed and converted BatchNorm layers swapped back.

    Args:
        model: any ``nn.Module``.
        n: how many groups, from the input side, to freeze; negative counts from the end
            (``-1`` freezes all but the last group).
        groups: selectors, one per group; default :func:`layer_groups`.
        train_bn: make the normalisation layers of the frozen groups trainable too (fastai's
            ``train_bn=True``; converted BatchNorm layers there are converted back). The default,
            ``False``, is :func:`freeze`'s: everything in a frozen group is frozen (docs/core.md).
        shared: as for :func:`freeze`: ``"error"`` refuses to change a parameter tied to one in
            a group on the other side of ``n``; ``"freeze"`` changes it for every use (the
            frozen side wins for a tie between the two sides).

    Returns:
        The model, changed in place.

    Raises:
        ArgumentError: ``n`` is not an int within ``[-len(groups), len(groups)]``.
        SelectorError, SharedParameterError: as for :func:`freeze`; nothing changes then.

    Example:
        >>> from torch import nn
        >>> model = freeze_to(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)), 2)
        >>> [p.requires_grad for p in model.parameters()]
        [False, False, False, False, True, True]
    """
    require_module(model, "freeze_to")
    if isinstance(groups, (str, bytes)) or (groups is not None and not isinstance(groups, Sequence)):
        raise ArgumentTypeError(
            f"freeze_to(groups={short_repr(groups)}): expected a list of selectors, one per layer group, got "
            f"{type(groups).__name__}. Fix: pass e.g. groups=['embed', 'blocks', 'head'] (a string is one selector)."
        )
    groups = list(layer_groups(model) if groups is None else groups)
    if isinstance(n, bool) or not isinstance(n, int):
        raise ArgumentTypeError(
            f"freeze_to(n={short_repr(n)}): expected an int (a layer-group count), got {type(n).__name__}. "
            "Fix: pass e.g. n=1 to freeze the first layer group."
        )
    if not -len(groups) <= n <= len(groups):
        raise ArgumentError(
            f"freeze_to(n={n}): expected an int between {-len(groups)} and {len(groups)} for a model with "
            f"{len(groups)} layer groups {short_repr(groups, 120)}. Fix: pass a group count, or groups=... explicitly."
        )
    if n < 0:
        n += len(groups)
    frozen_part, trainable_part = list(groups[:n]), list(groups[n:])
    norm_ids: set[int] = set()
    if require_bool(train_bn, "freeze_to", "train_bn") and frozen_part:  # fastai: their norms train
        frozen_sel = resolve(model, frozen_part, verb="freeze_to", argument="groups")
        norms = {k: m for k, m in frozen_sel.modules.items() if k and is_norm(m)}
        trainable_part += list(norms)
        norm_ids = {id(p) for m in norms.values() for p in m.parameters(recurse=False)}
    selections: dict[bool, Selection] = {}
    for part, requires_grad, verb in ((frozen_part, False, "freeze"), (trainable_part, True, "unfreeze")):
        if part:
            selections[requires_grad] = resolve(model, list(part), verb="freeze_to", argument="groups")
            _plan(
                model,
                selections[requires_grad],
                requires_grad=requires_grad,
                train_bn=train_bn and not requires_grad,
                shared=shared,
                verb=verb,
            )
    # unfreeze first, then freeze: with shared="freeze" a parameter tied across the two sides stays frozen
    if True in selections:
        restore_full_precision(model, [p for p in selections[True].parameters.values() if not p.requires_grad])
    for requires_grad in (True, False):
        if requires_grad in selections:
            params = selections[requires_grad].parameters.values()
            chosen = [
                p for p in params if (requires_grad and _can_train(p)) or (not requires_grad and id(p) not in norm_ids)
            ]
            set_requires_grad(chosen, requires_grad)
    if True in selections:
        _release(model, selections[True])
    sync_gradient_switches(model.modules())
    return model
