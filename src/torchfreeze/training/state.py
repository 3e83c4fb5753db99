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

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

from torchfreeze._core.canonical import canonical_modules, canonical_parameter_names
from torchfreeze._core.checks import require_bool, require_module, short_repr
from torchfreeze._core.mode import get_pin, set_pin, unpin_modules
from torchfreeze._core.mode import pins as module_pins
from torchfreeze._core.uses import set_requires_grad
from torchfreeze._core.wrappers import unwrap
from torchfreeze.errors import ArgumentTypeError, FreezeStateError
from torchfreeze.nn import Frozen
from torchfreeze.nn.batchnorm import freeze_batchnorm, unconvert_batchnorm
from torchfreeze.nn.freezing import restore_full_precision
from torchfreeze.training._watch import is_frozen_batchnorm

__all__ = ["freeze_state", "load_freeze_state"]

STATE_FORMAT = "torchfreeze.freeze_state"
STATE_VERSION = 1
PIN_ORIGINS = ("freeze", "user", "Frozen")


def _module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical module name -> module, every path; for a hidden wrapper level, the wrapped module."""
    return {canon: m for _, canon, m in canonical_modules(model)}


def _canonical_of(model: nn.Module) -> dict[str, str]:
    """Module path (as ``named_modules`` gives it) -> canonical name."""
    return {raw: canon for raw, canon, _ in canonical_modules(model)}


def _frozen_use_paths(model: nn.Module) -> list[str]:
    return [canon for _, canon, m in canonical_modules(model) if isinstance(m, Frozen)]


def _parameters(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[str]]]:
    """Parameter id -> (parameter, canonical names), model order."""
    by_id = {id(p): p for p in model.parameters()}
    return {pid: (by_id[pid], names) for pid, names in canonical_parameter_names(model).items()}


def _shapes(model: nn.Module) -> dict[str, list[int] | None]:
    """Every parameter name (all paths) -> shape; converted BatchNorm affine buffers count as parameters."""
    out: dict[str, list[int] | None] = {}
    for _, canon, m in canonical_modules(model):
        prefix = f"{canon}." if canon else ""
        tensors: dict[str, Tensor | None] = dict(m._parameters)
        if is_frozen_batchnorm(m):
            tensors.update({k: m._buffers.get(k) for k in ("weight", "bias") if m._buffers.get(k) is not None})
        for name, t in tensors.items():
            if t is not None:
                out[prefix + name] = None if is_lazy(t) else list(t.shape)
    return out


def _converted_norms(model: nn.Module) -> list[str]:
    seen: set[int] = set()
    out = []
    for _, canon, m in canonical_modules(model):
        if is_frozen_batchnorm(m) and id(m) not in seen:
            seen.add(id(m))
            out.append(canon)
    return out


def _pins(model: nn.Module) -> dict[str, tuple[str, str]]:
    canon = _canonical_of(model)
    return {canon[name]: (pin.mode, pin.origin) for name, pin in module_pins(model).items()}


def freeze_state(model: nn.Module) -> dict[str, Any]:
    """What is frozen and what is pinned in ``model``, as a JSON-serialisable dict.

    The dict has ``format`` (``"torchfreeze.freeze_state"``), ``version`` (1), ``frozen`` (names of
    the parameters with ``requires_grad=False``, one name per parameter, model order),
    ``frozen_uses`` (paths of the ``Frozen`` wrappers) and ``pins`` (module name -> ``"train"`` /
    ``"eval"``), ``pin_origins`` (module name -> who set the pin: ``"freeze"``, ``"user"`` or
    ``"Frozen"``; ``unfreeze`` removes only ``"freeze"`` pins, so a resumed run needs it) and
    ``converted_norms`` (BatchNorm layers swapped for ``FrozenBatchNorm``) and ``parameters`` (every
    parameter name -> its shape, ``None`` for a lazy one; the affine tensors of converted BatchNorm
    layers count as parameters), so that a model with other parameters is refused.

    Names are those of ``state_dict``: a wrapper that hides its level from ``state_dict`` (the
    feature cache of ``cache_features``) does not appear in them, so a state saved with a cached
    backbone loads into the uncached model and back.

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
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    params = _parameters(model)
    pins = _pins(model)
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "frozen": [names[0] for p, names in params.values() if not p.requires_grad],
        "frozen_uses": _frozen_use_paths(model),
        "pins": {n: mode for n, (mode, _) in pins.items()},
        "pin_origins": {n: origin for n, (_, origin) in pins.items()},
        "converted_norms": _converted_norms(model),
        "parameters": _shapes(model),
    }


def _names(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)


def _is_shape(value: Any) -> bool:
    return value is None or (
        isinstance(value, (list, tuple))
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    )


def _check_types(state: Any, arg: str, verb: str) -> None:
    """Raise for a state of the wrong shape (types, format, version).

    ``ArgumentTypeError`` when the argument itself (``arg == "state"``) is not a mapping;
    ``FreezeStateError`` for everything else (a state nested in another, a file's content).
    """
    where = f"{verb}(state=...): the state" if arg == "state" else f"{verb}: {arg}"
    fix = "Fix: pass the dict torchfreeze.freeze_state(model) returned, unmodified."
    if not isinstance(state, Mapping):
        expected = f"expected the dict returned by torchfreeze.freeze_state(model), got {type(state).__name__}"
        if arg == "state":
            raise ArgumentTypeError(f"{verb}(state={short_repr(state)}): {expected}. {fix}")
        raise FreezeStateError(f"{where}: {expected}. {fix}")
    if state.get("format") != STATE_FORMAT:
        raise FreezeStateError(
            f"{where}['format']={short_repr(state.get('format'))}; expected {STATE_FORMAT!r} (a freeze state). {fix}"
        )
    version = state.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FreezeStateError(f"{where}['version']={short_repr(version)}; expected a positive int. {fix}")
    if version > STATE_VERSION:
        raise FreezeStateError(
            f"{where}['version'] is {version}, newer than this torchfreeze understands ({STATE_VERSION}). "
            "Fix: upgrade torchfreeze."
        )
    for key in ("frozen", "frozen_uses"):
        if not _names(state.get(key)):
            raise FreezeStateError(
                f"{where}[{key!r}]={short_repr(state.get(key))}; expected a list of names (str). {fix}"
            )
    pins = state.get("pins")
    if not isinstance(pins, Mapping) or not all(isinstance(k, str) and v in ("train", "eval") for k, v in pins.items()):
        raise FreezeStateError(f"{where}['pins']={short_repr(pins)}; expected module names -> 'train' or 'eval'. {fix}")
    origins = state.get("pin_origins")
    if origins is not None and (
        not isinstance(origins, Mapping)
        or not all(isinstance(k, str) and k in pins and v in PIN_ORIGINS for k, v in origins.items())
    ):
        raise FreezeStateError(
            f"{where}['pin_origins']={short_repr(origins)}; expected pinned module names -> one of {PIN_ORIGINS}. {fix}"
        )
    if not _names(state.get("converted_norms", [])):
        raise FreezeStateError(
            f"{where}['converted_norms']={short_repr(state.get('converted_norms'))}; expected a list of module "
            f"names. {fix}"
        )
    shapes = state.get("parameters")
    if shapes is not None and (
        not isinstance(shapes, Mapping) or not all(isinstance(k, str) and _is_shape(v) for k, v in shapes.items())
    ):
        raise FreezeStateError(
            f"{where}['parameters']={short_repr(shapes)}; expected parameter names -> shapes (lists of ints) or "
            f"None. {fix}"
        )


def _unfit_parameters(model: nn.Module, state: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """Mismatches between the parameters the state records and the model's, and the names involved."""
    want = state.get("parameters")
    if want is None:  # a state written before torchfreeze recorded shapes
        return [], set()
    have = _shapes(model)
    problems = [f"parameter {n!r} of the saved model is missing from the model" for n in want if n not in have]
    problems += [f"the model has a parameter {n!r} that the state never saw" for n in have if n not in want]
    for n, shape in have.items():
        saved = want.get(n)
        if n in want and shape is not None and saved is not None and list(saved) != shape:
            problems.append(f"parameter {n!r} has shape {tuple(shape)} in the model, {tuple(saved)} in the state")
    unfit = {n for n in have if n not in want} | {
        n for n, s in have.items() if s is not None and want.get(n) is not None and list(want[n]) != s
    }
    return problems, unfit


def _validate_freeze_state(
    model: nn.Module, state: Any, *, strict: bool, arg: str = "state", verb: str = "load_freeze_state"
) -> list[str]:
    """Check ``state`` against ``model`` without changing anything.

    Raises FreezeStateError for a malformed state, or (strict) for any mismatch, listing every
    mismatch. Returns the list of mismatches that were tolerated (non-strict).
    """
    _check_types(state, arg, verb)
    problems: list[str] = []
    table = _module_table(model)
    param_names = {n for names in canonical_parameter_names(model).values() for n in names}
    for n in state.get("converted_norms", []):
        m = table.get(n)
        if m is None:
            problems.append(f"converted BatchNorm {n!r} does not exist in the model")
        elif not (isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)):
            problems.append(f"converted BatchNorm {n!r} is a {type(m).__name__} in the model, not a BatchNorm")
        elif isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            problems.append(f"converted BatchNorm {n!r} is not initialised yet (lazy): run one forward pass first")
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
    for n in state["pins"]:
        if n not in table:
            problems.append(f"pinned module {n!r} does not exist in the model")
    problems += _unfit_parameters(model, state)[0]
    if problems and strict:
        listing = "\n  - ".join(problems[:20]) + (
            f"\n  - ... ({len(problems) - 20} more)" if len(problems) > 20 else ""
        )
        where = f"{verb}(state=...): the state" if arg == "state" else f"{verb}: {arg}"
        tolerant = " or pass strict=False to apply what fits" if verb == "load_freeze_state" else ""
        raise FreezeStateError(
            f"{where} does not fit this model ({len(problems)} mismatch(es)); nothing was changed:\n  - {listing}\n"
            f"Fix: load it into a model of the same architecture{tolerant}."
        )
    return problems


def _apply_pins(model: nn.Module, pins: Mapping[str, str], origins: Mapping[str, str] | None) -> None:
    """Make the pins of ``model`` exactly ``pins`` (module by module, origins kept)."""
    table = _module_table(model)
    origins = origins or {}
    wanted = {id(table[n]) for n in pins}
    stale = [m for m in model.modules() if get_pin(m) is not None and id(m) not in wanted]
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
        strict: if True (default) every name must exist, the ``Frozen`` uses must match and the
            model must have exactly the parameters (names and shapes) the state was saved from;
            if False, what fits is loaded and what does not (unknown names, parameters of another
            shape, parameters the state never saw, which keep their flag) is skipped with one
            warning listing each.

    Returns:
        The model.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``, ``state`` not a mapping, or ``strict``
            not a bool (``None`` too).
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
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    strict = require_bool(strict, "load_freeze_state", "strict")
    skipped = _validate_freeze_state(model, state, strict=strict)
    if skipped:
        warnings.warn("load_freeze_state(strict=False) skipped: " + "; ".join(skipped), stacklevel=2)
    _, unfit = _unfit_parameters(model, state)
    table = _module_table(model)
    want_converted = {n for n in state.get("converted_norms", []) if n in table}
    # (strict=False) names that are not convertible BatchNorm layers were reported above and are skipped
    to_convert = [
        m
        for n in sorted(want_converted)
        if isinstance(m := table[n], _BatchNorm)
        and m.track_running_stats
        and not (isinstance(m, LazyModuleMixin) and m.has_uninitialized_params())
    ]
    converted = {id(table[n]) for n in _converted_norms(model) if n in want_converted}
    to_unconvert = [raw for raw, _, m in canonical_modules(model) if is_frozen_batchnorm(m) and id(m) not in converted]
    if to_unconvert:
        unconvert_batchnorm(model, list(dict.fromkeys(to_unconvert)))
    if to_convert:
        freeze_batchnorm(model, to_convert, convert=True)
    frozen_names = set(state["frozen"])
    frozen: list[nn.Parameter] = []
    trainable: list[nn.Parameter] = []
    for p, names in _parameters(model).values():
        if frozen_names.intersection(n for n in names if n not in unfit):
            frozen.append(p)
        elif strict or not all(n in unfit for n in names):
            trainable.append(p)
    set_requires_grad(frozen, False)
    restore_full_precision(model, [p for p in trainable if not p.requires_grad])  # fp16/bf16 storage (issue 10.3)
    set_requires_grad(trainable, True)
    table = _module_table(model)
    pins = {k: v for k, v in state["pins"].items() if k in table}
    _apply_pins(model, pins, state.get("pin_origins"))
    return model
