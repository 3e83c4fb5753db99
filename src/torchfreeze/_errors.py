"""The exception hierarchy: one library base, each error also a matching builtin.

Every message names the argument that was wrong, shows what was expected and
suggests the fix. A verb that raises leaves the model (and optimizer, files)
exactly as it was.
"""

from __future__ import annotations

__all__ = [
    "TorchFreezeError",
    "SelectorError",
    "SelectorTypeError",
    "SharedParameterError",
    "ModeError",
    "ArgumentError",
    "ArgumentTypeError",
    "FreezeStateError",
    "CheckpointError",
    "WeightsError",
    "FrozenTensorChanged",
    "CacheRefusedError",
]


class TorchFreezeError(Exception):
    """Base class of every error raised by torchfreeze."""


class SelectorError(TorchFreezeError, ValueError):
    """A selector matched nothing (or matched something it may not)."""


class SelectorTypeError(TorchFreezeError, TypeError):
    """A selector of a kind torchfreeze does not understand."""


class SharedParameterError(TorchFreezeError, ValueError):
    """Freezing would silently change a parameter also used outside the selection."""


class ModeError(TorchFreezeError, ValueError):
    """A mode argument that is not ``"train"``, ``"eval"`` (or ``None`` where allowed)."""


class ArgumentError(TorchFreezeError, ValueError):
    """Any other argument with a wrong value."""


class ArgumentTypeError(TorchFreezeError, TypeError):
    """An argument of the wrong type (for example ``Frozen`` around something that is not a module)."""


class FreezeStateError(TorchFreezeError, ValueError):
    """A freeze state that does not fit the model it is loaded into."""


class CheckpointError(TorchFreezeError, ValueError):
    """A checkpoint file that is missing, corrupted, or made for another base."""


class WeightsError(TorchFreezeError, ValueError):
    """Pretrained weights that cannot be loaded (missing file, sha256 or key mismatch)."""


class FrozenTensorChanged(TorchFreezeError, RuntimeError):
    """A tensor that must stay fixed changed during training (raised by ``guard``)."""


class CacheRefusedError(TorchFreezeError, ValueError):
    """A module whose outputs cannot be cached (it trains or is stochastic)."""
