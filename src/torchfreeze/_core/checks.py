"""Argument checks shared by every public verb: one message shape per kind of mistake."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

import torch
from torch import nn

from torchfreeze.errors import ArgumentError, ArgumentTypeError

__all__ = [
    "require_module",
    "require_bool",
    "require_choice",
    "require_positive_int",
    "short_repr",
    "bind_problem",
    "refuse_meta",
]

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
    """Return ``value`` if it is one of ``choices``.

    Raises:
        ArgumentTypeError: ``value`` has none of the choices' types (``mode=1`` where strings go).
        ArgumentError: the right type, but not one of the choices (``mode="frozen"``).

    >>> require_choice("eval", ("train", "eval"), "pin_mode", "mode")
    'eval'
    """
    options = tuple(choices)
    if any(value is c or (type(value) is type(c) and value == c) for c in options):
        return value
    listed = ", ".join(repr(c) for c in options)
    message = f"{verb}({argument}={short_repr(value)}): expected one of {listed}"
    if not any(isinstance(value, type(c)) for c in options):
        raise ArgumentTypeError(f"{message}, got {type(value).__name__}. Fix: pass one of them.")
    raise ArgumentError(f"{message}. Fix: pass one of them.")


def require_positive_int(value: Any, verb: str, argument: str, example: int) -> int:
    """Return ``value`` if it is an int >= 1; a non-int raises :class:`ArgumentTypeError`, others :class:`ArgumentError`.

    >>> require_positive_int(0, "digits_cnn", "num_classes", 5)
    Traceback (most recent call last):
    ...
    torchfreeze.errors.ArgumentError: digits_cnn(num_classes=0): expected an int >= 1. Fix: pass e.g. num_classes=5.
    """
    fix = f"Fix: pass e.g. {argument}={example}."
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"{verb}({argument}={short_repr(value)}): expected an int >= 1, got {type(value).__name__}. {fix}"
        )
    if value < 1:
        raise ArgumentError(f"{verb}({argument}={value}): expected an int >= 1. {fix}")
    return value


def bind_problem(func: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
    """Why ``func(*args, **kwargs)`` cannot take those arguments, or ``None`` if it can.

    Reads the signature only (``func`` is not called), so a verb can refuse a
    predicate of the wrong arity, or a forward missing its inputs, before it
    changes anything; a builder given a keyword it does not have is refused the same way.
    A callable whose signature cannot be read answers ``None``.

    >>> bind_problem(lambda name: True, "a", None)
    'too many positional arguments'
    >>> bind_problem(lambda name, module: True, "a", None) is None
    True
    """
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to read (some builtins): the call itself will tell
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        return str(error)
    return None


def refuse_meta(model: nn.Module, verb: str) -> None:
    """Raise :class:`ArgumentError` if ``model`` has tensors on the meta device (no values to read).

    >>> with torch.device("meta"):
    ...     layer = nn.Linear(2, 2)
    >>> refuse_meta(layer, "fold_batchnorm")
    Traceback (most recent call last):
    ...
    torchfreeze.errors.ArgumentError: fold_batchnorm(model=...): 2 tensor(s) are on the meta device ...
    """
    meta = [n for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise ArgumentError(
            f"{verb}(model=...): {len(meta)} tensor(s) are on the meta device and hold no values "
            f"({short_repr(meta[:5])}). Fix: materialise the model first (model.to_empty(device='cpu') "
            "and load its weights)."
        )
