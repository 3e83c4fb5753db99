"""``Frozen``: construction-time, per-use freezing."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.func import functional_call

from torchfreeze._core.checks import require_module
from torchfreeze._core.mode import Mode, check_mode, set_pin
from torchfreeze._core.uses import FrozenUse
from torchfreeze.errors import ArgumentError

__all__ = ["Frozen"]


class Frozen(FrozenUse):
    """Use a module as the constant function of its parameters at their current values.

    Gradients flow through this use to its inputs; the wrapped parameters get no
    gradient *from this use* (their ``.grad`` stays ``None``). If the same module
    is also used unwrapped elsewhere in the model, that use still trains it, so
    tied weights stay well defined. Buffers are used as they are (a BatchNorm in
    train mode still updates its statistics: pass ``mode="eval"`` to pin it).

    ``state_dict`` keys gain the ``module.`` segment of this wrapper
    (``"1.weight"`` becomes ``"1.module.weight"``); a checkpoint of the unwrapped
    model still loads with a plain ``model.load_state_dict(checkpoint)``: a load
    hook accepts the keys without ``module.``.

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
        self.register_load_state_dict_pre_hook(_accept_unwrapped_keys)  # type: ignore[no-untyped-call]

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


def _accept_unwrapped_keys(
    _module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Load hook: ``<prefix>weight`` from an unwrapped checkpoint goes to ``<prefix>module.weight``."""
    wrapped = prefix + "module."
    for key in list(state_dict.keys()):
        if key.startswith(prefix) and not key.startswith(wrapped):
            rest = key[len(prefix) :]
            if (wrapped + rest) not in state_dict:
                state_dict[wrapped + rest] = state_dict.pop(key)
