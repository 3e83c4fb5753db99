"""Parameter uses: who uses each parameter, and is it trainable here. The one primitive.

A parameter may be reached by several paths (tied weights) and a path may run
through a ``Frozen`` wrapper (a *frozen use*: no gradient reaches the
parameter from it). A parameter is *trainable* in a model when it requires
grad and has at least one use outside ``Frozen``. Every verb, ``check``,
``guard``, ``explain``, the feature cache and the state code ask this module.

``requires_grad`` is also set in one place only, :func:`set_requires_grad`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from torchfreeze._core.wrappers import guard_requires_grad_change, unwrap

__all__ = [
    "FrozenUse",
    "FrozenOnly",
    "ParameterUses",
    "parameter_uses",
    "trainable_ids",
    "trainable_map",
    "frozen_map",
    "set_requires_grad",
]


class FrozenUse(nn.Module):
    """Marker base class of a module whose use of its parameters is frozen (``torchfreeze.Frozen``).

    Lives here so that the core can tell frozen uses apart without importing the
    ``nn`` layer above it.
    """


class FrozenOnly(nn.Module):
    """Marker base class of a wrapper whose wrapped module must stay frozen (``torchfreeze.speed.FeatureCache``).

    It serves stored outputs of the wrapped module, so a parameter inside it can never train;
    ``unfreeze`` refuses such parameters before anything changes.
    """


@dataclass
class ParameterUses:
    """Every path of one parameter, split by whether the path runs through a frozen use."""

    parameter: nn.Parameter
    trainable_paths: list[str] = field(default_factory=list)
    frozen_use_paths: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        """Every path, trainable uses first."""
        return self.trainable_paths + self.frozen_use_paths

    @property
    def name(self) -> str:
        """The parameter's primary name: its first trainable path, else its first path."""
        return self.paths[0]

    @property
    def trainable(self) -> bool:
        """Requires grad and has at least one use outside ``Frozen``."""
        return self.parameter.requires_grad and bool(self.trainable_paths)


def parameter_uses(model: nn.Module) -> dict[int, ParameterUses]:
    """``id(parameter) -> ParameterUses`` for every parameter of ``model``, in model order.

    Args:
        model: any ``nn.Module``.

    Returns:
        One entry per distinct parameter (ties collapse), keyed by ``id``.

    Example:
        >>> from torchfreeze import Frozen
        >>> lin = nn.Linear(2, 2)
        >>> uses = parameter_uses(nn.Sequential(lin, Frozen(lin)))[id(lin.weight)]
        >>> uses.trainable_paths, uses.frozen_use_paths
        (['0.weight'], ['1.module.weight'])
    """
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    inside_frozen: dict[str, bool] = {}  # module path -> lies in (or is) a frozen use
    for name, module in model.named_modules(remove_duplicate=False):
        parent_inside = bool(name) and inside_frozen[name.rpartition(".")[0]]
        inside_frozen[name] = parent_inside or isinstance(module, FrozenUse)
    uses: dict[int, ParameterUses] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        entry = uses.setdefault(id(param), ParameterUses(param))
        if inside_frozen.get(owner, False):
            entry.frozen_use_paths.append(name)
        else:
            entry.trainable_paths.append(name)
    return uses


def trainable_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that train in ``model``.

    >>> model = nn.Linear(2, 2).requires_grad_(False)
    >>> trainable_ids(model)
    set()
    """
    return {key for key, entry in parameter_uses(model).items() if entry.trainable}


def trainable_map(model: nn.Module) -> dict[str, nn.Parameter]:
    """Primary name -> parameter for every trainable parameter, in model order.

    >>> list(trainable_map(nn.Linear(2, 2)))
    ['weight', 'bias']
    """
    return {e.name: e.parameter for e in parameter_uses(model).values() if e.trainable}


def frozen_map(model: nn.Module) -> dict[str, nn.Parameter]:
    """Primary name -> parameter for every parameter that does not train, in model order.

    >>> list(frozen_map(nn.Linear(2, 2).requires_grad_(False)))
    ['weight', 'bias']
    """
    return {e.name: e.parameter for e in parameter_uses(model).values() if not e.trainable}


def set_requires_grad(parameters: Iterable[nn.Parameter], flag: bool) -> None:
    """Set ``requires_grad`` on each parameter; freezing also drops ``.grad``.

    The one place the flag is written. An attribute assignment, not
    ``requires_grad_()``: it also works on lazy (uninitialised) and meta
    parameters, and survives a lazy parameter's materialisation.

    Under a live ``DistributedDataParallel`` the change is refused (an
    ``ArgumentError`` naming the supported path) unless a
    ``torchfreeze.distributed.wrap`` handle owns the DDP; the handle then
    re-wraps after the change (see ``_core.wrappers``).

    Args:
        parameters: the parameters to change.
        flag: ``True`` makes them trainable, ``False`` freezes them (``.grad = None``).

    >>> lazy = nn.LazyLinear(2)
    >>> set_requires_grad(lazy.parameters(), False)
    >>> lazy.weight.requires_grad
    False
    """
    params = list(parameters)
    rewraps = guard_requires_grad_change(params, flag)  # refuses a change under a live raw DDP
    for param in params:
        param.requires_grad = flag
        if not flag:
            param.grad = None
    for rewrap in rewraps:  # a torchfreeze.distributed.wrap handle re-wraps its DDP
        rewrap()
