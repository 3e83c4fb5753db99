"""Wrappers: the one place that sees through DDP, DataParallel and ``torch.compile`` to the inner model.

Every verb calls :func:`unwrap` on the model it is given, so selectors, freeze
states, summaries and checkpoints use the *canonical* names (those of the
inner model: ``"blocks.0"``, never ``"module.blocks.0"`` or
``"_orig_mod.blocks.0"``). FSDP2 (``fully_shard``) changes the module in place
and keeps its names, so it needs no unwrapping; its parameters are DTensors
(:func:`local_tensor` gives the local shard).

This module also keeps the registry of *live* ``DistributedDataParallel``
wrappers that torchfreeze has seen. DDP reduces the parameters that required
grad when it was built; changing ``requires_grad`` of one of them afterwards
desynchronises the replicas without an error from torch. :func:`guard_requires_grad_change`
(called by ``_core.uses.set_requires_grad``, the one place the flag is written)
refuses such a change unless the DDP belongs to a wrap handle
(``torchfreeze.distributed.wrap``), which re-wraps after the change.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from torchfreeze.errors import ArgumentError

__all__ = [
    "TransparentWrapper",
    "unwrap",
    "live_ddp",
    "register_ddp",
    "release_ddp",
    "ddp_reduced_ids",
    "guard_requires_grad_change",
    "require_no_raw_ddp",
    "local_tensor",
    "is_dtensor",
    "full_tensors",
    "copy_full_into",
    "sharded",
]

#: Live DDP wrappers seen by torchfreeze -> the re-wrap callback of their handle (None: a raw DDP).
_LIVE: weakref.WeakKeyDictionary[DistributedDataParallel, Callable[[], None] | None] = weakref.WeakKeyDictionary()

#: FSDP2 (``fully_shard``) models seen by torchfreeze: their non-DTensor parameters were left out of sharding.
_SHARDED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

_SUPPORTED_PATH = (
    "freeze before wrapping (build the DDP after the last change), or wrap with "
    "handle = torchfreeze.distributed.wrap(model, **ddp_kwargs) and change it through torchfreeze verbs "
    "(the handle re-wraps DDP after each change); to drop an old DDP call torchfreeze.distributed.release(ddp)"
)


def _compiled_inner(module: nn.Module) -> nn.Module | None:
    """The original module of a ``torch.compile`` wrapper, else None (dynamo is not imported for this)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        inner = module._orig_mod
        return inner if isinstance(inner, nn.Module) else None
    return None


class TransparentWrapper(nn.Module):
    """Base class of torchfreeze's own wrappers (``torchfreeze.distributed.DDPHandle``): verbs see ``inner_module()``.

    Lives here so that the core can see through them without importing the layers above it.
    """

    def inner_module(self) -> nn.Module:
        """The wrapped model."""
        raise NotImplementedError


def _is_fsdp2(module: nn.Module) -> bool:
    fully_shard = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")  # not imported: no FSDP2
    fsdp_module = getattr(fully_shard, "FSDPModule", None)
    return fsdp_module is not None and isinstance(module, fsdp_module)


def unwrap(model: nn.Module) -> nn.Module:
    """The inner model under any number of DDP / DataParallel / ``torch.compile`` / wrap-handle wrappers.

    A DDP met on the way is recorded as live (see :func:`live_ddp`), so a later
    change of ``requires_grad`` under it is refused.

    Args:
        model: a module, possibly wrapped.

    Returns:
        The innermost module; ``model`` itself when it is not a wrapper (FSDP2
        modules are their own inner model).

    Example:
        >>> inner = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(inner)) is inner
        True
    """
    current = model
    while True:
        if isinstance(current, DistributedDataParallel):
            if current not in _LIVE:
                _LIVE[current] = None
            current = current.module
        elif isinstance(current, DataParallel):
            current = current.module
        elif isinstance(current, TransparentWrapper):
            current = current.inner_module()
        else:
            inner = _compiled_inner(current)
            if inner is None:
                if _is_fsdp2(current):
                    _SHARDED.add(current)
                return current
            current = inner


def register_ddp(ddp: DistributedDataParallel, rewrap: Callable[[], None] | None) -> None:
    """Record ``ddp`` as live; ``rewrap`` (a wrap handle's) runs after each change of ``requires_grad`` under it.

    Used by ``torchfreeze.distributed.wrap``; a DDP that :func:`unwrap` meets is
    registered without a callback (a *raw* DDP: changes under it are refused).
    """
    _LIVE[ddp] = rewrap


def release_ddp(ddp: DistributedDataParallel) -> None:
    """Forget ``ddp``: it no longer guards its parameters (it was replaced or is done).

    Releasing a DDP that was never registered does nothing.
    """
    _LIVE.pop(ddp, None)


def live_ddp(model: nn.Module) -> list[DistributedDataParallel]:
    """The live DDP wrappers seen by torchfreeze whose inner model is ``unwrap(model)``.

    >>> live_ddp(nn.Linear(2, 2))
    []
    """
    inner = unwrap(model)  # registers ``model`` itself when it is a DDP
    return [ddp for ddp in list(_LIVE) if unwrap(ddp.module) is inner]


def ddp_reduced_ids(ddp: DistributedDataParallel) -> set[int] | None:
    """Ids of the parameters ``ddp`` all-reduces (its reducer's buckets); None if torch does not say.

    Reads the reducer's bucket layout (``Reducer._get_zeros_like_grad_buckets``,
    a private torch API, checked for); no communication happens.

    >>> ddp_reduced_ids.__name__
    'ddp_reduced_ids'
    """
    reducer = getattr(ddp, "reducer", None)
    buckets_of = getattr(reducer, "_get_zeros_like_grad_buckets", None)
    if buckets_of is None:
        return None
    return {id(p) for bucket in buckets_of() for p in bucket.parameters()}


def _shown(names: list[str], k: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _ddp_names(ddp: DistributedDataParallel) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in unwrap(ddp.module).named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def guard_requires_grad_change(parameters: Iterable[nn.Parameter], flag: bool) -> list[Callable[[], None]]:
    """Refuse a change of ``requires_grad`` under a live raw DDP; return the re-wrap callbacks to run after.

    Called before any flag is written, so a refusal leaves the model as it was.

    Args:
        parameters: the parameters about to change.
        flag: the new value of ``requires_grad``.

    Returns:
        The re-wrap callbacks of the wrap handles whose DDP covers a changing
        parameter (run them after the change).

    Raises:
        ArgumentError: a changing parameter lies under a live DDP that no wrap handle owns.

    >>> guard_requires_grad_change(nn.Linear(2, 2).parameters(), False)
    []
    """
    params = list(parameters)
    if flag and _SHARDED:
        _refuse_unsharded(params)
    if not _LIVE:
        return []
    changing = {id(p) for p in params if p.requires_grad != flag}
    callbacks: list[Callable[[], None]] = []
    for ddp, rewrap in list(_LIVE.items()):
        names = _ddp_names(ddp)
        hit = [names[i] for i in changing if i in names]
        if not hit:
            continue
        if rewrap is None:
            verb = "unfreezing" if flag else "freezing"
            shown = _shown(sorted(hit))
            raise ArgumentError(
                f"{verb} {shown} under a live DistributedDataParallel: DDP all-reduces only the parameters that "
                "required grad when it was built, so the replicas would silently drift apart. Nothing was "
                f"changed. Fix: {_SUPPORTED_PATH}."
            )
        if rewrap not in callbacks:
            callbacks.append(rewrap)
    return callbacks


def _refuse_unsharded(params: list[nn.Parameter]) -> None:
    """Refuse to unfreeze a parameter that FSDP2 left out of sharding (``ignored_params``)."""
    changing = {id(p) for p in params if not p.requires_grad}
    for root in list(_SHARDED):
        left_out = [n for n, p in root.named_parameters() if id(p) in changing and not is_dtensor(p)]
        if left_out:
            shown = _shown(left_out)
            raise ArgumentError(
                f"unfreezing {shown}, which fully_shard left out of sharding (ignored_params): FSDP2 never reduces "
                "its gradient, so every rank would train its own copy. Nothing was changed. Fix: shard it "
                "(fully_shard without ignored_params for it) before training, or keep it frozen."
            )


def require_no_raw_ddp(model: nn.Module, verb: str) -> None:
    """Raise :class:`ArgumentError` when a live DDP without a wrap handle wraps ``model``.

    For objects that will change ``requires_grad`` later (``GradualUnfreezing``):
    the error comes at construction, not mid-run.

    >>> require_no_raw_ddp(nn.Linear(2, 2), "GradualUnfreezing")
    """
    raw = [ddp for ddp in live_ddp(model) if _LIVE.get(ddp) is None]
    if raw:
        raise ArgumentError(
            f"{verb}(model=...): the model is wrapped by a live DistributedDataParallel that cannot follow "
            f"changes of requires_grad. Fix: {_SUPPORTED_PATH}."
        )


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (an FSDP2 / tensor-parallel shard), without importing DTensor eagerly.

    >>> is_dtensor(torch.zeros(1))
    False
    """
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's local shard of a DTensor (a plain tensor); any other tensor as it is.

    >>> local_tensor(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    if is_dtensor(tensor):
        local: torch.Tensor = tensor.to_local()  # type: ignore[attr-defined]
        return local.detach()
    return tensor


def sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """True when any tensor is a DTensor: the verb is then collective (every rank must call it).

    >>> sharded([torch.zeros(1)])
    False
    """
    return any(is_dtensor(t) for t in tensors)


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name -> whole tensor: DTensors are all-gathered (collective, same order on every rank), others kept.

    >>> list(full_tensors({"w": torch.ones(2)}))
    ['w']
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            whole: torch.Tensor = tensor.detach().full_tensor()  # type: ignore[attr-defined]
            out[name] = whole
        else:
            out[name] = tensor
    return out


def copy_full_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into ``target``; into a DTensor, this rank's part of it (no communication).

    >>> t = torch.zeros(2)
    >>> copy_full_into(t, torch.ones(2)); t.tolist()
    [1.0, 1.0]
    """
    with torch.no_grad():
        if is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            # every rank holds ``whole``: take the local part without a scatter
            part = distribute_tensor(whole.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)  # type: ignore[attr-defined]
            target.copy_(part)
        else:
            target.copy_(whole)
