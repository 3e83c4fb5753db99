"""Which tensors training must leave alone: shared by ``guard``, ``check`` and the checkpoint split.

Built on the one primitive (:mod:`torchfreeze._core.uses`): a parameter is frozen when it does not
train. A module is *frozen* when it has parameters of its own and none of them trains. Normalisation
layers need more than their parameters: their running statistics are buffers, fixed only when the
layer is a ``FrozenBatchNorm``, is pinned to eval, or has no statistics to update.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from torchfreeze._core.behaviour import is_normalization, tracks_running_stats
from torchfreeze._core.mode import pins
from torchfreeze._core.uses import frozen_map
from torchfreeze.nn import FROZEN_BATCHNORM_TYPES

__all__ = [
    "frozen_ids",
    "eval_pinned_ids",
    "owns_only_frozen",
    "is_frozen_batchnorm",
    "stats_update_while_frozen",
    "watched_norms",
    "materialised",
]


def frozen_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that do not train (``requires_grad=False`` or used only through ``Frozen``)."""
    return {id(p) for p in frozen_map(model).values()}


def eval_pinned_ids(model: nn.Module) -> set[int]:
    """Ids of the modules pinned to eval mode."""
    return {id(model.get_submodule(name)) for name, pin in pins(model).items() if pin.mode == "eval"}


def owns_only_frozen(module: nn.Module, frozen: set[int]) -> bool:
    """A module with at least one parameter of its own, all of them frozen."""
    own = list(module.parameters(recurse=False))
    return bool(own) and all(id(p) in frozen for p in own)


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm converted to ``FrozenBatchNorm`` (every tensor a buffer)."""
    return isinstance(module, FROZEN_BATCHNORM_TYPES)


def stats_update_while_frozen(module: nn.Module, frozen: set[int], eval_ids: set[int]) -> bool:
    """A normalisation layer whose affine weights are frozen but whose running statistics still update."""
    return (
        is_normalization(module)
        and tracks_running_stats(module)
        and id(module) not in eval_ids
        and owns_only_frozen(module, frozen)
    )


def watched_norms(model: nn.Module, frozen: set[int]) -> list[tuple[str, nn.Module]]:
    """Normalisation layers whose buffers must stay fixed: frozen, pinned eval, or ``FrozenBatchNorm``."""
    eval_ids = eval_pinned_ids(model)
    out = []
    for name, module in model.named_modules():
        fixed = is_frozen_batchnorm(module) or (
            is_normalization(module) and (id(module) in eval_ids or owns_only_frozen(module, frozen))
        )
        if fixed and any(True for _ in module.buffers(recurse=False)):
            out.append((name, module))
    return out


def materialised(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors that hold values: lazy (uninitialised) parameters and buffers left out."""
    return {name: t for name, t in tensors.items() if not is_lazy(t)}
