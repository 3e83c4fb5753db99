"""Freeze state: what is frozen and what is pinned, as a small JSON-able dict, and back.

``freeze_state`` / ``load_freeze_state`` turn "which parameters are frozen, which ``Frozen``
wrappers exist, which modules are pinned and which BatchNorm layers were converted" into a dict
that ``json.dumps`` accepts, and restore it exactly on a fresh model. Trainable-only checkpoints
(:mod:`torchfreeze.training.checkpoint`) carry this dict in their metadata.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchfreeze._core.checks import require_bool, require_module
from torchfreeze._core.mode import get_pin, pinned_modes, set_pin, unpin_modules
from torchfreeze._core.mode import pins as module_pins
from torchfreeze._core.uses import parameter_uses, set_requires_grad
from torchfreeze.errors import FreezeStateError
from torchfreeze.nn import Frozen
from torchfreeze.nn.batchnorm import freeze_batchnorm, unconvert_batchnorm
from torchfreeze.training._watch import is_frozen_batchnorm

__all__ = ["freeze_state", "load_freeze_state"]

STATE_FORMAT = "torchfreeze.freeze_state"
STATE_VERSION = 1


def _frozen_use_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, Frozen)]


def freeze_state(model: nn.Module) -> dict[str, Any]:
    """What is frozen and what is pinned in ``model``, as a JSON-serialisable dict.

    The dict has ``format`` (``"torchfreeze.freeze_state"``), ``version`` (1), ``frozen`` (names of
    the parameters with ``requires_grad=False``, one name per parameter, model order),
    ``frozen_uses`` (paths of the ``Frozen`` wrappers) and ``pins`` (module name -> ``"train"`` /
    ``"eval"``), ``pin_origins`` (module name -> who set the pin: ``"freeze"``, ``"user"`` or
    ``"Frozen"``; ``unfreeze`` removes only ``"freeze"`` pins, so a resumed run needs it) and
    ``converted_norms`` (BatchNorm layers swapped for ``FrozenBatchNorm``).

    Args:
        model: any module.

    Returns:
        The freeze state; ``json.dumps`` accepts it.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> freeze_state(torchfreeze.freeze(m, "0"))["frozen"]
        ['0.weight', '0.bias']
    """
    require_module(model, "freeze_state")
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "frozen_uses": _frozen_use_paths(model),
        "pins": dict(pinned_modes(model)),
    }
    state["pin_origins"] = _pin_origins(model)
    state["converted_norms"] = _converted_norms(model)
    return state


def _pin_origins(model: nn.Module) -> dict[str, str]:
    """Who set each pin: ``"freeze"`` (removed by ``unfreeze``), ``"user"`` (``pin_mode``), ``"Frozen"``."""
    return {name: pin.origin for name, pin in module_pins(model).items()}


def _converted_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_frozen_batchnorm(m)]


def _validate_freeze_state(model: nn.Module, state: Any, *, strict: bool, arg: str = "state") -> list[str]:
    """Check ``state`` against ``model`` without changing anything.

    Raises FreezeStateError for a malformed state, or (strict) for any mismatch, listing every
    mismatch. Returns the list of mismatches that were tolerated (non-strict).
    """
    if not isinstance(state, Mapping):
        raise FreezeStateError(
            f"{arg} must be the dict returned by torchfreeze.freeze_state(model), got {type(state).__name__}."
        )
    if state.get("format") != STATE_FORMAT:
        raise FreezeStateError(
            f"{arg}['format'] must be {STATE_FORMAT!r}, got {state.get('format')!r}; "
            "pass the dict returned by torchfreeze.freeze_state(model)."
        )
    version = state.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FreezeStateError(f"{arg}['version'] must be a positive int, got {version!r}.")
    if version > STATE_VERSION:
        raise FreezeStateError(
            f"{arg}['version'] is {version}, newer than this torchfreeze understands ({STATE_VERSION}); "
            "upgrade torchfreeze."
        )
    problems: list[str] = []
    for key in ("frozen", "frozen_uses"):
        v = state.get(key)
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise FreezeStateError(f"{arg}[{key!r}] must be a list of names (str), got {v!r}.")
    pins = state.get("pins")
    if not isinstance(pins, Mapping) or not all(isinstance(k, str) and v in ("train", "eval") for k, v in pins.items()):
        raise FreezeStateError(f"{arg}['pins'] must map module names to 'train' or 'eval', got {pins!r}.")
    origins = state.get("pin_origins")
    if origins is not None and (
        not isinstance(origins, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in origins.items())
    ):
        raise FreezeStateError(f"{arg}['pin_origins'] must map module names to str, got {origins!r}.")

    converted = state.get("converted_norms", [])
    if not isinstance(converted, (list, tuple)) or not all(isinstance(x, str) for x in converted):
        raise FreezeStateError(f"{arg}['converted_norms'] must be a list of module names, got {converted!r}.")

    table = dict(model.named_modules(remove_duplicate=False))
    module_names = set(table)
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for n in converted:
        m = table.get(n)
        if m is None:
            problems.append(f"converted BatchNorm {n!r} does not exist in the model")
        elif not (isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)):
            problems.append(f"converted BatchNorm {n!r} is a {type(m).__name__} in the model, not a BatchNorm")
        elif isinstance(m, _BatchNorm) and not m.track_running_stats:
            problems.append(f"converted BatchNorm {n!r} has no running statistics in the model")
        else:  # its weight/bias become buffers once converted
            param_names.update(f"{n}.{p}" for p, _ in m.named_parameters())
    for n in state["frozen"]:
        if n not in param_names:
            problems.append(f"frozen parameter {n!r} does not exist in the model")
    have_uses = set(_frozen_use_paths(model))
    want_uses = set(state["frozen_uses"])
    for n in sorted(want_uses - have_uses):
        problems.append(f"Frozen use {n!r} is not a Frozen wrapper in the model")
    for n in sorted(have_uses - want_uses):
        problems.append(f"the model has a Frozen use at {n!r} that the state does not list")
    for n in pins:
        if n not in module_names:
            problems.append(f"pinned module {n!r} does not exist in the model")
    if problems and strict:
        listing = "\n  - ".join(problems)
        raise FreezeStateError(
            f"{arg} does not fit this model ({len(problems)} mismatch(es)); nothing was changed:\n  - {listing}\n"
            "Load it into a model of the same architecture, or pass strict=False to apply what fits."
        )
    return problems


def _apply_pins(model: nn.Module, pins: Mapping[str, str], origins: Mapping[str, str] | None) -> None:
    """Make the pins of ``model`` exactly ``pins`` (module by module, origins kept)."""
    table = dict(model.named_modules())
    origins = origins or {}
    stale = [m for n, m in table.items() if get_pin(m) is not None and n not in pins]
    unpin_modules(model, stale, origins=None)
    for name, mode in pins.items():
        module = table[name]
        pin = get_pin(module)
        origin = origins.get(name, "user")
        if pin is None or pin.mode != mode or pin.origin != origin:
            set_pin(module, mode, origin)


def load_freeze_state(model: nn.Module, state: Mapping[str, Any], *, strict: bool = True) -> nn.Module:
    """Restore what is frozen and pinned, exactly, from a :func:`freeze_state` dict.

    Every parameter listed in ``state["frozen"]`` gets ``requires_grad=False`` (and ``.grad=None``),
    every other parameter ``requires_grad=True``; pins become exactly ``state["pins"]``. The
    state is validated completely first: on any mismatch nothing changes.

    Args:
        model: a model of the same architecture (typically a fresh instance).
        state: the dict from :func:`freeze_state` (possibly through JSON).
        strict: if True (default) every name must exist and the ``Frozen`` uses must match; if
            False, names that do not exist are skipped with a warning.

    Returns:
        The model.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module`` or ``strict`` not a bool.
        FreezeStateError: the state is malformed or (strict) does not fit the model; the message
            lists every mismatch.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> s = freeze_state(torchfreeze.freeze(m, "0"))
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> [p.requires_grad for p in load_freeze_state(fresh, s).parameters()]
        [False, False, True, True]
    """
    require_module(model, "load_freeze_state")
    strict = require_bool(strict, "load_freeze_state", "strict")
    skipped = _validate_freeze_state(model, state, strict=strict)
    if skipped:
        warnings.warn("load_freeze_state(strict=False) skipped: " + "; ".join(skipped), stacklevel=2)
    table = dict(model.named_modules(remove_duplicate=False))
    want_converted = [n for n in state.get("converted_norms", []) if n in table]
    # (strict=False) names that are not convertible BatchNorm layers were reported above and are skipped
    to_convert = [n for n in want_converted if isinstance(table[n], _BatchNorm) and table[n].track_running_stats]
    to_unconvert = [n for n in _converted_norms(model) if n not in set(want_converted)]
    if to_unconvert:
        unconvert_batchnorm(model, to_unconvert)
    if to_convert:
        freeze_batchnorm(model, to_convert, convert=True)
    module_names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    frozen_names = set(state["frozen"])
    uses = list(parameter_uses(model).values())
    frozen = [e.parameter for e in uses if frozen_names.intersection(e.paths)]
    set_requires_grad(frozen, False)
    set_requires_grad([e.parameter for e in uses if not frozen_names.intersection(e.paths)], True)
    pins = {k: v for k, v in state["pins"].items() if k in module_names}
    origins = state.get("pin_origins")
    _apply_pins(model, pins, origins)
    return model
