"""When the feature cache refuses a module: trainable parameters, and random or statistics-changing layers.

Both come from the core's single answers: :func:`torchfreeze._core.uses.parameter_uses`
(a parameter trains when it requires grad and has a use outside ``Frozen``) and
:func:`torchfreeze._core.behaviour.nondeterministic_modules` (dropout and
``RReLU`` in train mode, BatchNorm using batch statistics, norm layers that
update running statistics), so ``explain``, ``check`` and the cache agree.
"""

from __future__ import annotations

from torch import nn

from torchfreeze._core.behaviour import nondeterministic_modules
from torchfreeze._core.uses import parameter_uses
from torchfreeze.errors import CacheRefusedError

__all__ = ["cache_refusal_reasons", "refusal_error"]

_SHOWN = 5


def cache_refusal_reasons(module: nn.Module, *, prefix: str = "") -> list[str]:
    """Why a module's outputs cannot be cached (an empty list when they can).

    Args:
        module: the module to check, in its current train/eval mode.
        prefix: prepended to the qualified names in the messages.

    Returns:
        One plain sentence per reason, each naming the parameter or layer:
        trainable parameters first, then layers in model order.

    >>> cache_refusal_reasons(nn.Sequential(nn.Linear(2, 2)).requires_grad_(False))
    []
    >>> cache_refusal_reasons(nn.Sequential(nn.Linear(2, 2)))[0]
    "parameter '0.weight' is trainable (requires_grad=True)"
    >>> cache_refusal_reasons(nn.Sequential(nn.Dropout(0.1)), prefix="head")
    ["layer 'head.0' (Dropout, p=0.1) is in train mode, so it is random"]
    """

    def qualified(name: str) -> str:
        return f"{prefix}.{name}" if prefix and name else (prefix or name or "<root>")

    reasons = [
        f"parameter '{qualified(uses.name)}' is trainable (requires_grad=True)"
        for uses in parameter_uses(module).values()
        if uses.trainable
    ]
    reasons += [found.sentence() for found in nondeterministic_modules(module, prefix=prefix)]
    return reasons


def refusal_error(reasons: list[str], what: str) -> CacheRefusedError:
    """The :class:`CacheRefusedError` for ``reasons`` (the first five shown), with the fix."""
    shown = "; ".join(reasons[:_SHOWN])
    if len(reasons) > _SHOWN:
        shown += f"; and {len(reasons) - _SHOWN} more"
    return CacheRefusedError(
        f"cache_features: cannot cache {what}: {shown}. Caching needs a frozen, deterministic module. "
        "Fix: freeze it and pin eval mode first, e.g. `freeze(model, 'backbone', mode='eval')` "
        "(or `module.requires_grad_(False).eval()`), then call cache_features again."
    )
