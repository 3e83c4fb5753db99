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
from torchfreeze._core.checks import refuse_meta  # re-exported: guard and the checkpoint split use it here
from torchfreeze._core.mode import pins
from torchfreeze._core.uses import frozen_map
from torchfreeze.nn.batchnorm import is_converted_batchnorm

__all__ = [
    "frozen_ids",
    "eval_pinned_ids",
    "owns_only_frozen",
    "is_frozen_batchnorm",
    "stats_update_while_frozen",
    "watched_norms",
    "materialised",
    "mutating_buffers",
    "buffers_mutated_while_frozen",
    "refuse_meta",
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
    """A BatchNorm converted by ``freeze_batchnorm(convert=True)`` (every tensor a buffer), either form."""
    return is_converted_batchnorm(module)


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


def mutating_buffers(module: nn.Module) -> list[str]:
    """Names of ``module``'s own buffers that its forward pass rewrites in train mode, besides BatchNorm.

    The power-iteration vectors of spectral normalisation: the legacy
    ``torch.nn.utils.spectral_norm`` hook (``<name>_u``, ``<name>_v``) and the
    ``torch.nn.utils.parametrizations.spectral_norm`` parametrisation (``_u``, ``_v``). Their module's
    parameters may all be frozen, yet the buffers change on every training forward pass.

    >>> lin = torch.nn.utils.spectral_norm(torch.nn.Linear(2, 2))
    >>> mutating_buffers(lin)
    ['weight_u', 'weight_v']
    """
    found: list[str] = []
    for hook in module._forward_pre_hooks.values():
        if type(hook).__name__ == "SpectralNorm" and type(hook).__module__.startswith("torch.nn.utils"):
            name = getattr(hook, "name", "weight")
            found += [f"{name}_u", f"{name}_v"]
    if type(module).__name__ == "_SpectralNorm" and type(module).__module__.startswith("torch.nn.utils"):
        found += ["_u", "_v"]
    return [n for n in found if module._buffers.get(n) is not None]


def buffers_mutated_while_frozen(model: nn.Module, frozen: set[int], eval_ids: set[int]) -> list[str]:
    """Qualified names of buffers that a frozen module rewrites in train mode (not pinned eval).

    A frozen legacy ``spectral_norm`` layer (its ``weight_orig`` frozen) still runs its power
    iteration on ``weight_u``/``weight_v``; so does the ``_SpectralNorm`` parametrisation of a
    frozen ``parametrizations.<name>.original``.
    """
    table = dict(model.named_modules())
    found: list[str] = []
    for name, module in table.items():
        names = mutating_buffers(module)
        if not names or id(module) in eval_ids:
            continue
        owner = module
        if type(module).__name__ == "_SpectralNorm":  # <parametrized>.parametrizations.<tensor>.<index>
            owner = table.get(name.rpartition(".")[0], module)
        if owns_only_frozen(owner, frozen):
            prefix = f"{name}." if name else ""
            found += [prefix + b for b in names]
    return found
