"""``wrap``: a DistributedDataParallel handle that follows changes of ``requires_grad``.

DDP decides which parameters it all-reduces when it is built (those that
require grad). Changing ``requires_grad`` afterwards is silent in torch: an
unfrozen block is never reduced and the replicas drift apart; a frozen one is
still expected and DDP fails later with "Expected to have finished reduction".
A :class:`DDPHandle` is the supported path: every torchfreeze verb that changes
``requires_grad`` under it (``unfreeze``, ``freeze``, ``freeze_to``,
``GradualUnfreezing``, ``load_freeze_state``) makes it re-wrap the model, so
the reduced set always equals the trainable set. Any other change under a live
DDP that torchfreeze has seen raises ``ArgumentError`` (``_core.wrappers``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.uses import parameter_uses
from torchfreeze._core.wrappers import TransparentWrapper, ddp_reduced_ids, register_ddp, release_ddp, unwrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError

__all__ = ["DDPHandle", "wrap", "release"]

_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"  # DDP's own per-module ignore list


class DDPHandle(TransparentWrapper):
    """A live DDP around ``model`` that re-wraps itself after each change of ``requires_grad``.

    A module: call it as you would call the DDP (``handle(x)``), and pass it (or
    the model, or ``handle.ddp``) to any torchfreeze verb, which sees the model
    with its canonical names. ``handle.ddp`` is the current
    ``DistributedDataParallel`` (a new object after each re-wrap; an old one
    refuses to run). Built by :func:`wrap`.

    Attributes:
        module: the wrapped model (as given to :func:`wrap`).
        rewraps: how many times the handle re-built its DDP since :func:`wrap`.
    """

    def __init__(
        self,
        model: nn.Module,
        ddp_kwargs: dict[str, Any],
        on_wrap: Callable[[DistributedDataParallel], None] | None,
    ) -> None:
        super().__init__()
        self.module = model
        self._kwargs = ddp_kwargs
        self._on_wrap = on_wrap
        self._user_ignore = list(getattr(model, _IGNORE_ATTR, []))
        self._set_ddp(None)
        self.rewraps = 0
        self._build()

    def inner_module(self) -> nn.Module:
        """The wrapped model."""
        return self.module

    @property
    def ddp(self) -> DistributedDataParallel | None:
        """The current DDP; ``None`` while nothing trains (the model then runs unwrapped)."""
        ddp: DistributedDataParallel | None = self.__dict__["_ddp"]
        return ddp

    def _set_ddp(self, ddp: DistributedDataParallel | None) -> None:
        self.__dict__["_ddp"] = ddp  # not a submodule: parameters and names stay the model's

    def train(self, mode: bool = True) -> DDPHandle:
        """``model.train(mode)`` (pins respected), and the DDP's own flag; returns the handle."""
        super().train(mode)
        if self.ddp is not None:
            self.ddp.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the current DDP (or the model itself while nothing trains)."""
        target: nn.Module = self.ddp if self.ddp is not None else self.module
        return target(*args, **kwargs)

    def reduced_names(self) -> list[str]:
        """Canonical names of the parameters the current DDP all-reduces, in model order.

        Returns:
            The names (empty while nothing trains).
        """
        if self.ddp is None:
            return []
        reduced = ddp_reduced_ids(self.ddp)
        if reduced is None:  # pragma: no cover - torch without the reducer introspection
            reduced = {id(p) for p in self.ddp.parameters() if p.requires_grad}
        return [e.name for key, e in parameter_uses(self.module).items() if key in reduced]

    def rewrap(self) -> DistributedDataParallel | None:
        """Build a new DDP over the current trainable set (collective: every rank must call it).

        torchfreeze verbs call it for you; call it yourself only after changing
        requires_grad with torchfreeze verbs while the handle was released.

        Returns:
            The new DDP (``None`` while nothing trains).
        """
        self._retire()
        self._build()
        self.rewraps += 1
        return self.ddp

    def release(self) -> nn.Module:
        """Drop the DDP (the model no longer guards changes); returns the model.

        Returns:
            The wrapped model.
        """
        self._retire()
        return self.module

    def _retire(self) -> None:
        old = self.ddp
        if old is None:
            return
        release_ddp(old)
        old.register_forward_pre_hook(_refuse_stale)
        self._set_ddp(None)

    def _build(self) -> None:
        inner = unwrap(self.module)
        uses = parameter_uses(inner)
        if not any(e.trainable for e in uses.values()):
            self._set_ddp(None)  # nothing to reduce: DDP itself refuses such a model
            return
        # requires grad but used only through Frozen: never gets a gradient, DDP must not wait for it
        # (names as DDP sees them: relative to the module it wraps, "_orig_mod." included)
        idle = {key for key, e in uses.items() if e.parameter.requires_grad and not e.trainable}
        idle_names = {n for n, p in self.module.named_parameters(remove_duplicate=False) if id(p) in idle}
        setattr(self.module, _IGNORE_ATTR, sorted(set(self._user_ignore) | idle_names))
        ddp = DistributedDataParallel(self.module, **self._kwargs)
        handle = weakref.ref(self)  # the registry must not keep the handle (and its DDP) alive

        def rewrap_if_alive() -> None:
            alive = handle()
            if alive is not None:
                alive.rewrap()

        register_ddp(ddp, rewrap_if_alive)
        ddp.training = self.module.training  # the flag only: the model's modes stay as they are
        self._set_ddp(ddp)
        if self._on_wrap is not None:
            self._on_wrap(ddp)

    def __repr__(self) -> str:
        return f"DDPHandle({type(self.module).__name__}, rewraps={self.rewraps}, reduced={len(self.reduced_names())})"


def _refuse_stale(module: nn.Module, args: Any) -> None:
    raise ArgumentError(
        "this DistributedDataParallel was replaced when requires_grad changed (its reducer no longer matches the "
        "trainable parameters). Fix: call the handle (handle(x)) or use handle.ddp, not a saved reference to an "
        "older DDP."
    )


def wrap(
    model: nn.Module,
    *,
    on_wrap: Callable[[DistributedDataParallel], None] | None = None,
    **ddp_kwargs: Any,
) -> DDPHandle:
    """Wrap ``model`` in DistributedDataParallel through a handle that follows freezing changes.

    Freeze first, then wrap. Parameters that require grad but are used only
    through ``Frozen`` are left out of the reduction (no
    ``prepare_for_distributed`` needed). When a torchfreeze verb later changes
    ``requires_grad`` (``unfreeze``, ``GradualUnfreezing``, ...), the handle
    builds a new DDP over the new trainable set, so DDP all-reduces exactly the
    trainable bytes and the replicas stay identical. Every rank must make the
    same changes at the same step (DDP construction is collective).

    Args:
        model: the model, frozen as it should start (not a DDP; a ``torch.compile``
            model is fine).
        on_wrap: called with each new DDP (the first and every re-wrap), for
            example to register a communication hook.
        **ddp_kwargs: passed to ``DistributedDataParallel`` (``device_ids``,
            ``bucket_cap_mb``, ``static_graph``, ...).

    Returns:
        The :class:`DDPHandle`.

    Raises:
        ArgumentTypeError: ``model`` is not a module, ``on_wrap`` not callable.
        ArgumentError: ``model`` is already a DistributedDataParallel, or
            ``ddp_kwargs`` passes ``module``.

    Example:
        >>> import torch, torchfreeze
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # torchrun: no args
        >>> model = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> handle = wrap(model)
        >>> handle.reduced_names()
        ['1.weight', '1.bias']
        >>> _ = torchfreeze.unfreeze(model, "0")  # the handle re-wraps DDP
        >>> handle.rewraps, handle.reduced_names()
        (1, ['0.weight', '0.bias', '1.weight', '1.bias'])
        >>> _ = handle.release()
        >>> dist.destroy_process_group()
    """
    require_module(model, "wrap")
    if isinstance(model, (DistributedDataParallel, DDPHandle)):
        raise ArgumentError(
            f"wrap(model=<{type(model).__name__}>): expected the model itself, got a DDP that is already built. "
            "Fix: pass its .module (and drop the old DDP)."
        )
    if on_wrap is not None and not callable(on_wrap):
        raise ArgumentTypeError(
            f"wrap(on_wrap={short_repr(on_wrap)}): expected a callable taking the new DDP, or None. "
            "Fix: pass a function such as lambda ddp: ddp.register_comm_hook(None, hook)."
        )
    if "module" in ddp_kwargs:
        raise ArgumentError("wrap(module=...): the model is the first argument. Fix: wrap(model, **ddp_kwargs).")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ArgumentError(
            "wrap(model=...): torch.distributed has no default process group. "
            "Fix: call torch.distributed.init_process_group(...) first (torchrun sets the environment)."
        )
    return DDPHandle(model, dict(ddp_kwargs), on_wrap)


def release(ddp: DistributedDataParallel) -> nn.Module:
    """Tell torchfreeze a raw DDP is no longer used, so its model may change ``requires_grad`` again.

    Args:
        ddp: a ``DistributedDataParallel`` you built yourself.

    Returns:
        ``ddp.module``.

    Raises:
        ArgumentTypeError: ``ddp`` is not a DistributedDataParallel.

    Example:
        >>> release(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        torchfreeze.errors.ArgumentTypeError: release(ddp=Linear(...)): expected a DistributedDataParallel, ...
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise ArgumentTypeError(
            f"release(ddp={type(ddp).__name__}(...)): expected a DistributedDataParallel, got "
            f"{type(ddp).__name__}. Fix: pass the DDP object you built (not its module)."
        )
    release_ddp(ddp)
    module: nn.Module = ddp.module
    return module
