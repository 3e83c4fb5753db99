"""Canonical names: the one place that decides the names checkpoints, freeze states and summaries use.

Two kinds of wrapper are seen through. *Outer* wrappers (DDP, DataParallel,
``torch.compile``, wrap handles) are removed by :func:`torchfreeze._core.wrappers.unwrap`.
*Transparent* wrappers inside the model (``Frozen``, ``FeatureCache``) keep their level in
module and parameter names (selectors say ``"1.module"``) but hide it from ``state_dict``:
their class names the wrapped child in ``state_dict_transparent_child``,
:func:`make_state_dict_transparent` installs the state-dict hooks from it, and
:func:`canonical_modules` leaves the level out of canonical names, so a model saves and
loads the same with or without them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from torchfreeze._core.wrappers import unwrap
from torchfreeze.errors import ArgumentError

__all__ = ["TRANSPARENT_CHILD", "make_state_dict_transparent", "canonical_modules", "canonical_parameter_names"]

#: the class attribute naming the child of a wrapper whose ``state_dict`` keys do not show the wrapper's
#: level (``Frozen`` and ``FeatureCache`` set it to ``"module"``): checkpoints and freeze states use the
#: names ``state_dict`` gives, so a model saves and loads the same with or without the wrapper
TRANSPARENT_CHILD = "state_dict_transparent_child"


def make_state_dict_transparent(module: nn.Module) -> None:
    """Hide ``module``'s level in ``state_dict``: keys of its child (the class's ``TRANSPARENT_CHILD``) appear as its own.

    Saving strips ``<prefix><child>.``; loading accepts keys with or without it (strict
    loading still reports what is really missing or unexpected). The same class attribute
    tells :func:`canonical_modules` to leave the level out of canonical names.

    Args:
        module: the wrapper, whose class sets ``state_dict_transparent_child`` to the
            attribute name of the wrapped module and whose only state is that child.

    Raises:
        ArgumentError: the class does not set ``state_dict_transparent_child``.

    Example:
        >>> class Wrapper(nn.Module):
        ...     state_dict_transparent_child = "inner"
        >>> wrapper = Wrapper()
        >>> wrapper.inner = nn.Linear(1, 1)
        >>> make_state_dict_transparent(wrapper)
        >>> sorted(wrapper.state_dict())
        ['bias', 'weight']
    """
    child = getattr(type(module), TRANSPARENT_CHILD, None)
    if not isinstance(child, str) or not child:
        raise ArgumentError(
            f"make_state_dict_transparent(module=<{type(module).__name__} object>): its class sets no "
            f"{TRANSPARENT_CHILD!r}. Fix: set the class attribute to the name of the wrapped child."
        )
    post = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook  # torch < 2.5
    post(partial(_strip_child, child + "."))
    module.register_load_state_dict_pre_hook(partial(_add_child, child + "."))  # type: ignore[no-untyped-call]


def _strip_child(segment: str, _module: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """State-dict hook: ``<prefix><child>.x`` is saved as ``<prefix>x``."""
    inner = prefix + segment
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == inner[:-1] or k.startswith(inner)]:
            meta[prefix + key[len(inner) :]] = meta.pop(key)


def _add_child(segment: str, _module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    """Load pre-hook: ``<prefix>x`` loads into ``<prefix><child>.x`` (keys with the child segment load as they are)."""
    inner = prefix + segment
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        if inner + key[len(prefix) :] not in state_dict:
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k.startswith(prefix) and k != prefix[:-1] and not k.startswith(inner)]:
            if inner + key[len(prefix) :] not in meta:
                meta[inner + key[len(prefix) :]] = meta.pop(key)


def canonical_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(path, canonical path, module)`` for every module of ``unwrap(model)`` at every path (model order).

    The canonical path is the one ``state_dict`` keys use: outer wrappers (DDP, DataParallel,
    ``torch.compile``) are removed by :func:`unwrap`, and the level of a wrapper that hides itself
    from ``state_dict`` (:func:`make_state_dict_transparent`) is left out, so ``backbone.module.0``
    of a cached backbone is ``backbone.0``, as in the uncached model.

    >>> class Wrapper(nn.Module):
    ...     state_dict_transparent_child = "module"
    >>> w = Wrapper(); w.module = nn.Linear(1, 1)
    >>> [(raw, canon) for raw, canon, _ in canonical_modules(nn.Sequential(w))]
    [('', ''), ('0', '0'), ('0.module', '0')]
    """
    out: list[tuple[str, str, nn.Module]] = []
    stack: list[tuple[str, str, nn.Module]] = [("", "", unwrap(model))]
    while stack:
        raw, canon, module = stack.pop()
        out.append((raw, canon, module))
        hidden = getattr(type(module), TRANSPARENT_CHILD, None)
        children = []
        for name, child in module._modules.items():
            if child is None:
                continue
            child_raw = f"{raw}.{name}" if raw else name
            child_canon = canon if name == hidden else (f"{canon}.{name}" if canon else name)
            children.append((child_raw, child_canon, child))
        stack.extend(reversed(children))
    return out


def canonical_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> its canonical names (every path, model order; see :func:`canonical_modules`).

    >>> lin = nn.Linear(1, 1)
    >>> canonical_parameter_names(nn.DataParallel(nn.Sequential(lin)))[id(lin.weight)]
    ['0.weight']
    """
    names: dict[int, list[str]] = {}
    for _, canon, module in canonical_modules(model):
        prefix = f"{canon}." if canon else ""
        for pname, p in module._parameters.items():
            if p is not None:
                names.setdefault(id(p), []).append(prefix + pname)
    return names
