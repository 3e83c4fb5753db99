"""Argument checks shared by every public verb: one message shape per kind of mistake."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeGuard

from torch import nn

from torchfreeze.errors import ArgumentError, ArgumentTypeError

__all__ = ["require_module", "require_bool", "require_choice", "short_repr"]

_REPR_LIMIT = 80


def short_repr(value: Any, limit: int = _REPR_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, so messages stay bounded.

    >>> short_repr("x" * 200)[-5:]
    "x...'"
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 4] + "..." + text[-1]


def require_module(model: Any, verb: str, argument: str = "model") -> TypeGuard[nn.Module]:
    """Raise :class:`ArgumentTypeError` unless ``model`` is an ``nn.Module``.

    Every public verb calls this first, so a non-module ``model`` gives the same
    error class and message shape everywhere.

    Args:
        model: what the caller passed.
        verb: the public function's name, for the message (``"freeze"``).
        argument: the argument's name.

    Returns:
        ``True`` (a type guard for the checker).

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.

    >>> require_module([1, 2], "freeze")
    Traceback (most recent call last):
    ...
    torchfreeze.errors.ArgumentTypeError: freeze(model=[1, 2]): expected a torch.nn.Module, got list. ...
    """
    if isinstance(model, nn.Module):
        return True
    raise ArgumentTypeError(
        f"{verb}({argument}={short_repr(model)}): expected a torch.nn.Module, got {type(model).__name__}. "
        "Fix: pass the model itself (not its state_dict(), parameters() or a list of modules)."
    )


def require_bool(value: Any, verb: str, argument: str) -> bool:
    """Return ``value`` if it is a ``bool``; else raise :class:`ArgumentTypeError`.

    >>> require_bool(True, "freeze", "train_bn")
    True
    """
    if isinstance(value, bool):
        return value
    raise ArgumentTypeError(
        f"{verb}({argument}={short_repr(value)}): expected True or False, got {type(value).__name__}. "
        f"Fix: pass {argument}=True or {argument}=False."
    )


def require_choice(value: Any, choices: Iterable[Any], verb: str, argument: str) -> Any:
    """Return ``value`` if it is one of ``choices``; else raise :class:`ArgumentError`.

    >>> require_choice("eval", ("train", "eval"), "pin_mode", "mode")
    'eval'
    """
    options = tuple(choices)
    if any(value is c or (type(value) is type(c) and value == c) for c in options):
        return value
    listed = ", ".join(repr(c) for c in options)
    raise ArgumentError(f"{verb}({argument}={short_repr(value)}): expected one of {listed}. Fix: pass one of them.")
