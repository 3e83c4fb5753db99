"""The exception hierarchy: one library base, each error also the matching builtin.

The rule (docs/errors.md has it as a table):

* a wrong **type** of argument (a list where a module goes, a string where a
  selector type goes) raises :class:`ArgumentTypeError`, also a ``TypeError``;
* a wrong **value** raises :class:`ArgumentError`, also a ``ValueError``, or one
  of its subclasses when callers need to tell the case apart
  (:class:`SelectorError`, :class:`SharedParameterError`,
  :class:`CheckpointError`, :class:`CacheRefusedError`);
* a frozen tensor that changed during training raises
  :class:`FrozenTensorChangedError`, also a ``RuntimeError`` (nothing was
  wrong with the arguments: the training loop moved something).

Every message names the argument, shows what was expected (bounded in length)
and suggests a fix. A verb that raises leaves the model, optimizer and files
exactly as they were.

Example:
    >>> import torchfreeze as tf
    >>> try:
    ...     tf.freeze([1, 2])
    ... except tf.errors.ArgumentTypeError as error:
    ...     print(isinstance(error, TypeError))
    True
"""

from __future__ import annotations

__all__ = [
    "TorchFreezeError",
    "ArgumentError",
    "ArgumentTypeError",
    "SelectorError",
    "SharedParameterError",
    "CheckpointError",
    "CacheRefusedError",
    "FrozenTensorChangedError",
    # aliases kept from 0.1
    "SelectorTypeError",
    "ModeError",
    "FreezeStateError",
    "WeightsError",
    "FrozenTensorChanged",
]


class TorchFreezeError(Exception):
    """Base class of every error raised by torchfreeze."""


class ArgumentError(TorchFreezeError, ValueError):
    """An argument with a wrong value (a mode that is not ``"train"``/``"eval"``, a negative count)."""


class ArgumentTypeError(TorchFreezeError, TypeError):
    """An argument of the wrong type (a non-module ``model``, a selector of an unknown kind)."""


class SelectorError(ArgumentError):
    """A selector that matched nothing; the message lists the closest names."""


class SharedParameterError(ArgumentError):
    """Freezing or unfreezing would silently change a parameter also used outside the selection."""


class CheckpointError(ArgumentError):
    """A freeze state, checkpoint or weights file that is missing, corrupted or made for another model."""


class CacheRefusedError(ArgumentError):
    """A module whose outputs cannot be cached: it trains, or it is random or updates statistics."""


class FrozenTensorChangedError(TorchFreezeError, RuntimeError):
    """A tensor that must stay fixed changed or was replaced during training (raised by ``guard``).

    Attributes:
        changes: each changed tensor's qualified name -> its largest absolute change.
    """

    def __init__(self, message: str, changes: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.changes: dict[str, float] = dict(changes or {})


# Aliases from 0.1: each was told apart from its target only by name.
SelectorTypeError = ArgumentTypeError
ModeError = ArgumentError
FreezeStateError = CheckpointError
WeightsError = CheckpointError
FrozenTensorChanged = FrozenTensorChangedError
