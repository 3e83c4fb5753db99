"""Pinned modes: a module whose train/eval flag does not follow its ancestors.

The primitive is :class:`_PinnedTrain`, stored as the module's *instance*
attribute ``train``. ``nn.Module.train`` recurses with ``child.train(mode)``, so
an ancestor's ``.train()`` / ``.eval()`` reaches the pin, which runs the
class's own ``train`` (so the ancestor's mode reaches the children unchanged,
and a class that overrides ``train`` keeps its extras), then sets the module's
own flag to the pinned value (a pin is per module; pinning a subtree pins each module in
it). No class is swapped, no parameter or buffer is touched, so parameter
identity and ``state_dict`` keys stay as they were; the pin is a plain picklable
object that ``copy.deepcopy`` re-binds to the copy, and ``torch.compile`` sees an
ordinary ``training`` attribute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from torch import nn

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.select import Selector, resolve
from torchfreeze._core.wrappers import unwrap
from torchfreeze.errors import ArgumentTypeError, ModeError

__all__ = [
    "pin_mode",
    "unpin_mode",
    "pinned_modes",
    "eval_mode",
    "train_mode",
    "get_pin",
    "set_pin",
    "remove_pin",
    "check_mode",
    "inherited_training",
    "Mode",
]

Mode = Literal["train", "eval"]
_MODES = ("train", "eval")


def check_mode(mode: Any, *, argument: str = "mode", allow_none: bool = False) -> None:
    """Raise unless ``mode`` is ``"train"``, ``"eval"`` (or ``None`` if allowed).

    A non-string is an :class:`ArgumentTypeError`, another string an :class:`ArgumentError` (``ModeError``).
    """
    if mode is None and allow_none:
        return
    if not isinstance(mode, str):
        allowed = "'train', 'eval'" + (" or None" if allow_none else "")
        raise ArgumentTypeError(
            f"{argument}={short_repr(mode)}: expected {allowed}, got {type(mode).__name__}. "
            f"Fix: pass {argument}='eval' (dropout off, BatchNorm statistics fixed) or {argument}='train'."
        )
    if mode not in _MODES:
        allowed = "'train', 'eval'" + (" or None" if allow_none else "")
        raise ModeError(
            f"{argument}={mode!r} is not a mode; expected {allowed}. "
            f"Fix: pass {argument}='eval' to keep dropout off and BatchNorm statistics fixed, "
            f"or {argument}='train' to keep them on."
        )


class _PinnedTrain:
    """Replacement for ``module.train`` that keeps the module's own flag pinned."""

    __slots__ = ("mode", "module", "origin")

    def __init__(self, module: nn.Module, mode: str, origin: str) -> None:
        self.module = module
        self.mode = mode
        self.origin = origin

    def __call__(self, mode: bool = True) -> nn.Module:
        module = self.module
        type(module).train(module, mode)  # the class's own train(): children, and any override's extras
        module.training = self.mode == "train"
        return module

    def __getstate__(self) -> tuple[nn.Module, str, str]:
        return (self.module, self.mode, self.origin)

    def __setstate__(self, state: tuple[nn.Module, str, str]) -> None:
        self.module, self.mode, self.origin = state

    def __repr__(self) -> str:
        return f"<pinned {self.mode} mode ({self.origin})>"


def get_pin(module: nn.Module) -> _PinnedTrain | None:
    """The pin object of ``module``, or ``None`` if its mode follows its ancestors."""
    pin = module.__dict__.get("train")
    return pin if isinstance(pin, _PinnedTrain) else None


def set_pin(module: nn.Module, mode: str, origin: str) -> None:
    """Pin ``module``'s own flag to ``mode`` now and across every later ``train()``/``eval()``."""
    module.__dict__["train"] = _PinnedTrain(module, mode, origin)
    module.training = mode == "train"


def remove_pin(module: nn.Module, follow: bool | None) -> None:
    """Remove the pin; ``follow`` is the flag to take now (``None`` keeps the current one)."""
    module.__dict__.pop("train", None)
    if follow is not None:
        module.training = follow


def inherited_training(model: nn.Module, name: str, default: bool | None = None) -> bool | None:
    """The flag an unpinned module at ``name`` gets from its ancestors' last ``train()``/``eval()``.

    A pinned module passes the mode it receives on to its children, so this is
    the flag of the nearest *unpinned* ancestor; ``default`` when there is none
    (``name`` is the root, or every ancestor is pinned).
    """
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        if get_pin(ancestor) is None:
            return ancestor.training
    return default


def pin_mode(model: nn.Module, *selectors: Selector, mode: Mode = "eval") -> nn.Module:
    """Pin the train/eval flag of every selected module, whatever its ancestors do.

    Args:
        model: any ``nn.Module``.
        *selectors: what to pin (see :func:`torchfreeze.select`); none means the whole model.
            A module name pins every module of its subtree.
        mode: ``"eval"`` (dropout off, BatchNorm statistics fixed) or ``"train"``
            (for example Monte-Carlo dropout at test time).

    Returns:
        The model, changed in place.

    Raises:
        ModeError: ``mode`` is not ``"train"`` or ``"eval"``.
        SelectorError: a selector matched nothing.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = pin_mode(model, nn.BatchNorm1d, mode="eval")
        >>> model.train()[1].training
        False
    """
    require_module(model, "pin_mode")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    check_mode(mode)
    selection = resolve(model, *selectors, verb="pin_mode")
    for module in selection.unique_modules().values():
        set_pin(module, mode, "user")
    return model


def unpin_mode(model: nn.Module, *selectors: Selector) -> nn.Module:
    """Remove every pin in the selection; each module then takes its parent's flag.

    Args:
        model: any ``nn.Module``.
        *selectors: where to remove pins; none means the whole model.

    Returns:
        The model, changed in place.

    Raises:
        SelectorError: a selector matched nothing.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Dropout(0.1))
        >>> _ = pin_mode(model, "0", mode="eval")
        >>> _ = unpin_mode(model)
        >>> model.train()[0].training
        True
    """
    require_module(model, "unpin_mode")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    selection = resolve(model, *selectors, verb="unpin_mode")
    unpin_modules(model, selection.unique_modules().values(), origins=None)
    return model


def unpin_modules(model: nn.Module, modules: Any, *, origins: set[str] | None) -> None:
    """Remove pins (only those whose origin is in ``origins``; all if ``None``).

    Each unpinned module then takes the flag the ancestors' last
    ``train()``/``eval()`` passed down (:func:`inherited_training`), as if that
    call had reached it unpinned; a root module keeps its current flag.
    """
    targets = {
        id(m): m for m in modules if (pin := get_pin(m)) is not None and (origins is None or pin.origin in origins)
    }
    for name, module in model.named_modules():  # model order: ancestors settle before descendants
        if id(module) in targets:
            remove_pin(module, inherited_training(model, name))


def pins(model: nn.Module) -> dict[str, _PinnedTrain]:
    """Map each pinned module's qualified name to its pin (mode and origin), in model order."""
    found: dict[str, _PinnedTrain] = {}
    for name, module in model.named_modules():
        pin = get_pin(module)
        if pin is not None:
            found[name] = pin
    return found


def pinned_modes(model: nn.Module) -> dict[str, str]:
    """Map each pinned module's qualified name to its pinned mode.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``{qualified name: "train" or "eval"}`` in model order (a shared module once,
        under its first name); empty when nothing is pinned.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        >>> pinned_modes(pin_mode(model, nn.Dropout, mode="train"))
        {'1': 'train'}
    """
    require_module(model, "pinned_modes")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    return {name: pin.mode for name, pin in pins(model).items()}


@contextlib.contextmanager
def _mode_context(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in saved:
            module.training = flag


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: ``model.eval()`` inside (pins respected), every exact flag restored on exit.

    Args:
        model: any ``nn.Module``.

    Returns:
        A context manager that yields ``model``; on exit (an exception included)
        every module's ``training`` flag is what it was before.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
        >>> model[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with eval_mode(model):
        ...     model[0].training
        False
        >>> [m.training for m in model]
        [True, False]
    """
    require_module(model, "eval_mode")  # at the call, not at ``with``
    return _mode_context(model, False)


def train_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: ``model.train()`` inside (pins respected), every exact flag restored on exit.

    Args:
        model: any ``nn.Module``.

    Returns:
        A context manager that yields ``model``; on exit (an exception included)
        every module's ``training`` flag is what it was before.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Dropout(0.5)).eval()
        >>> with train_mode(model):
        ...     model[0].training
        True
        >>> model[0].training
        False
    """
    require_module(model, "train_mode")  # at the call, not at ``with``
    return _mode_context(model, True)
