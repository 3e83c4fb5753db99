"""``Frozen``: construction-time, per-use freezing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from torchfreeze._core.canonical import make_state_dict_transparent
from torchfreeze._core.checks import require_module
from torchfreeze._core.mode import Mode, check_mode, set_pin
from torchfreeze._core.uses import FrozenUse
from torchfreeze.errors import ArgumentError

__all__ = ["Frozen"]

#: methods of the wrapped module that compute with its weights: reached through ``Frozen`` they
#: run with the weights detached, like ``forward`` (the backbone protocol's ``forward_features``)
_FROZEN_METHODS = ("forward_features",)


class Frozen(FrozenUse):
    """Use a module as the constant function of its parameters at their current values.

    Gradients flow through this use to its inputs; the wrapped parameters get no
    gradient *from this use* (their ``.grad`` stays ``None``). If the same module
    is also used unwrapped elsewhere in the model, that use still trains it, so
    tied weights stay well defined. Buffers are used as they are (a BatchNorm in
    train mode still updates its statistics: pass ``mode="eval"`` to pin it).

    ``state_dict`` keys are those of the wrapped module, without a ``module.``
    segment (``"1.weight"``, not ``"1.module.weight"``): a checkpoint saved
    with ``Frozen`` loads into the plain model and the reverse, strict or not.
    A checkpoint from torchfreeze 0.2 (``module.`` keys) still loads.
    Parameter names (``named_parameters``, selectors) keep the ``module``
    level: ``freeze(model, "1.module")``.

    The wrapper behaves like the module it wraps: an attribute that ``Frozen``
    does not have is the wrapped module's (Hugging Face's
    ``model.freeze_feature_encoder()`` works on a wrapped feature encoder),
    and indexing, ``len`` and iteration reach the wrapped container. Those are
    the wrapped module's own objects and methods, *not* a frozen use, except
    ``forward_features``, which runs with the weights detached like ``forward``.

    Args:
        module: the module to use frozen.
        mode: ``None`` leaves its train/eval behaviour alone; ``"eval"`` or
            ``"train"`` pins that mode on every module of its subtree.

    Wrapping a ``Frozen`` again wraps its inner module (no nesting).

    Raises:
        ArgumentTypeError: ``module`` is not an ``nn.Module`` (also a ``TypeError``).
        ModeError: ``mode`` is not ``None``, ``"train"`` or ``"eval"``.
        ArgumentError: at the forward, when the module still has uninitialised
            (lazy) parameters: their first forward would train them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> inner = nn.Linear(2, 2)
        >>> model = nn.Sequential(nn.Linear(2, 2), Frozen(inner))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> inner.weight.grad is None, model[0].weight.grad is not None
        (True, True)
    """

    module: nn.Module
    #: ``state_dict`` keys do not show the ``module`` level (see ``torchfreeze._core.canonical``)
    state_dict_transparent_child = "module"

    def __init__(self, module: nn.Module, *, mode: Mode | None = None) -> None:
        require_module(module, "Frozen", "module")
        if isinstance(module, Frozen):
            module = module.module
        check_mode(mode, allow_none=True)
        super().__init__()
        self.module = module
        self.mode = mode
        if mode is not None:
            for sub in module.modules():
                set_pin(sub, mode, "Frozen")
        make_state_dict_transparent(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module with its parameters detached (buffers as they are)."""
        params = dict(self.module.named_parameters())
        if not params:
            return self.module(*args, **kwargs)
        lazy = [name for name, p in params.items() if nn.parameter.is_lazy(p)]
        if lazy:
            raise ArgumentError(
                f"Frozen(module) has uninitialised lazy parameters {lazy}; expected initialised ones, since "
                "the forward that materialises them would also give them a gradient. Fix: run one forward "
                "of the unwrapped module, or load its weights, before using it through Frozen."
            )
        detached = {name: p.detach() for name, p in params.items()}
        return functional_call(self.module, detached, args, kwargs, tie_weights=True, strict=False)

    def extra_repr(self) -> str:
        return "" if self.mode is None else f"mode={self.mode!r}"

    # -- behave like the wrapped module ------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None or name.startswith("__"):
                raise
            attr = getattr(inner, name)  # raises the wrapped module's own AttributeError
            if name in _FROZEN_METHODS and callable(attr):
                return lambda *args, **kwargs: self._frozen_call(attr, args, kwargs)
            return attr

    def _frozen_call(self, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        detached = {name: p.detach() for name, p in self.module.named_parameters()}
        with _reparametrize_module(self.module, detached, tie_weights=True, strict=False):
            return method(*args, **kwargs)

    def __getitem__(self, index: Any) -> Any:
        return self.module[index]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.module)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        items: Iterator[Any] = iter(self.module)  # type: ignore[call-overload]
        return items

    def __bool__(self) -> bool:  # a module is truthy, whether or not the wrapped one has a length
        return True
