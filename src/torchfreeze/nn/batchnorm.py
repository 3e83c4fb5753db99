"""BatchNorm that really stays frozen: pinned eval, or converted to all-buffer modules."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchfreeze._core.behaviour import is_normalization
from torchfreeze._core.checks import require_bool, require_module
from torchfreeze._core.mode import get_pin, inherited_training, set_pin
from torchfreeze._core.select import Selector, resolve
from torchfreeze._core.uses import set_requires_grad
from torchfreeze.errors import ArgumentError
from torchfreeze.nn.bn_convert import (
    computes_as_batchnorm,
    convert_in_place,
    drop_freeze_pin,
    is_converted_in_place,
    restore_in_place,
)

__all__ = [
    "is_norm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FROZEN_BATCHNORM_TYPES",
    "freeze_batchnorm",
    "is_converted_batchnorm",
    "computes_as_batchnorm",
]


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm).

    Example:
        >>> from torch import nn
        >>> is_norm(nn.BatchNorm2d(3)), is_norm(nn.Linear(2, 2))
        (True, False)
    """
    return is_normalization(module) or isinstance(module, _FrozenBatchNorm)


def frozen_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Inference BatchNorm with constant statistics and affine weights (the forward of ``FrozenBatchNorm*d``).

    Without a gradient to compute, this is the native inference kernel; when ``x``
    needs a gradient, one multiply-add per element, whose backward is a single
    multiply (BatchNorm's own backward would also compute the constant weight's and
    bias's gradients). It is registered with ``torch.fx.wrap``, so symbolic tracing
    records it as one call instead of branching on the traced input.

    >>> x = torch.randn(2, 3)
    >>> y = frozen_batch_norm(x, torch.zeros(3), torch.ones(3), None, None, 0.0)
    >>> torch.allclose(y, x)
    True
    """
    if x.dim() < 2:
        raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}D")
    if not (x.requires_grad and torch.is_grad_enabled()):
        return nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))


torch.fx.wrap("frozen_batch_norm")


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with every tensor a buffer: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``state_dict`` keys are those of the BatchNorm it replaces; a state dict in
    torchvision's or detectron2's ``FrozenBatchNorm2d`` format (no
    ``num_batches_tracked``) loads too, and the ``repr`` is torchvision's, so it
    is a drop-in replacement. The forward is :func:`frozen_batch_norm`, which
    ``torch.fx`` records as one call.

    Args:
        num_features: the channel count ``C``.
        eps: added to the variance, as in BatchNorm.
        affine: hold ``weight`` and ``bias`` buffers (``False``: none, as in BatchNorm).
        momentum: not used by the forward; kept so that :meth:`to_batchnorm` (and
            :func:`torchfreeze.unfreeze`) gives back the same BatchNorm.

    Build one from a trained layer with :meth:`from_batchnorm`.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    _original: _BatchNorm | None

    def __init__(
        self, num_features: int, eps: float = 1e-5, *, affine: bool = True, momentum: float | None = 0.1
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.momentum = momentum  # unused here; kept so that unfreeze restores the BatchNorm exactly
        if affine:
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
        else:
            self.weight = None
            self.bias = None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._source: type[nn.Module] = _BATCHNORM_BY_DIM[type(self)]
        self.__dict__["_original"] = None  # the layer from_batchnorm() was given (not a submodule)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> _FrozenBatchNorm:
        """A frozen copy of ``bn``'s tensors (same dtype and device, same ``state_dict`` keys).

        ``bn`` itself is kept (outside the module tree) for :meth:`to_batchnorm`.
        """
        if not isinstance(bn, _BatchNorm):
            raise ArgumentError(
                "bn must be a BatchNorm layer (BatchNorm1d/2d/3d or SyncBatchNorm), "
                f"got {type(bn).__name__}. "
                "Fix: convert only BatchNorm layers."
            )
        _check_convertible(bn)
        frozen = cls(bn.num_features, bn.eps, affine=bn.affine, momentum=bn.momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                source = getattr(bn, name, None)
                if source is not None and getattr(frozen, name) is not None:
                    setattr(frozen, name, source.detach().clone())
        frozen._source = type(bn)
        frozen.__dict__["_original"] = bn
        return frozen

    def to_batchnorm(self) -> nn.Module:
        """The inverse of :meth:`from_batchnorm`: a trainable BatchNorm holding this module's current values.

        It is the very layer :meth:`from_batchnorm` was given (its class, attributes
        and parameter objects), so no constructor is called with guessed arguments;
        a module built directly (say, to load a torchvision checkpoint) gives a new
        ``BatchNorm1d/2d/3d``.
        """
        tensors = {n: t for n, t in self._buffers.items() if t is not None}
        bn = self._original
        if bn is None:
            new = self._source(self.num_features, self.eps, momentum=self.momentum, affine=self.affine)
            new.to(device=self.running_mean.device, dtype=self.running_mean.dtype)
            new.load_state_dict(tensors)
            return new
        for name, tensor in tensors.items():
            param = bn._parameters.get(name)
            if param is not None:
                param.data = tensor  # the same parameter object, with the values (device, dtype) of now
            elif name in bn._buffers:
                bn._buffers[name] = tensor
        bn.eps, bn.momentum = self.eps, self.momentum
        set_requires_grad(bn.parameters(recurse=False), True)
        return bn

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torchvision's and detectron2's FrozenBatchNorm2d have no num_batches_tracked: keep ours
        key = prefix + "num_batches_tracked"
        if key not in state_dict and prefix + "running_mean" in state_dict:
            state_dict[key] = self.num_batches_tracked
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        # torchvision's repr: FrozenBatchNorm2d(32, eps=1e-05)
        return f"{self.num_features}, eps={self.eps}" + ("" if self.affine else ", affine=False")


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen ``BatchNorm1d``: all tensors are buffers, same ``state_dict`` keys.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> bn = nn.BatchNorm1d(3).eval()
        >>> frozen = FrozenBatchNorm1d.from_batchnorm(bn)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(frozen(x), bn(x), atol=1e-6)
        True
    """


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen ``BatchNorm2d`` (and the form ``SyncBatchNorm`` converts to): all tensors are buffers.

    Example:
        >>> from torch import nn
        >>> sorted(FrozenBatchNorm2d(4).state_dict()) == sorted(nn.BatchNorm2d(4).state_dict())
        True
    """


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen ``BatchNorm3d``: all tensors are buffers, same ``state_dict`` keys.

    Example:
        >>> FrozenBatchNorm3d(2).running_var.tolist()
        [1.0, 1.0]
    """


#: The ``FrozenBatchNorm`` classes: ``isinstance(module, FROZEN_BATCHNORM_TYPES)`` tells a converted BatchNorm.
FROZEN_BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)


_BATCHNORM_BY_DIM: dict[type, type[nn.Module]] = {
    FrozenBatchNorm1d: nn.BatchNorm1d,
    FrozenBatchNorm2d: nn.BatchNorm2d,
    FrozenBatchNorm3d: nn.BatchNorm3d,
}


def _frozen_type_for(bn: nn.Module) -> type[_FrozenBatchNorm]:
    if isinstance(bn, (nn.BatchNorm1d, nn.LazyBatchNorm1d)):
        return FrozenBatchNorm1d
    if isinstance(bn, (nn.BatchNorm3d, nn.LazyBatchNorm3d)):
        return FrozenBatchNorm3d
    return FrozenBatchNorm2d  # BatchNorm2d and SyncBatchNorm (the forward works for any rank)


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every path of ``old`` in ``model``, so a shared layer stays shared."""
    paths = [name for name, m in model.named_modules(remove_duplicate=False) if m is old and name]
    for name in paths:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)


def is_converted_batchnorm(module: nn.Module) -> bool:
    """True for a BatchNorm that ``freeze_batchnorm(..., convert=True)`` converted (either form).

    That is a ``FrozenBatchNorm1d/2d/3d``, or a BatchNorm subclass with its own
    forward or submodules converted in place (its tensors all buffers, pinned eval).

    Example:
        >>> from torch import nn
        >>> model = freeze_batchnorm(nn.Sequential(nn.BatchNorm1d(2)), convert=True)
        >>> is_converted_batchnorm(model[0]), is_converted_batchnorm(nn.BatchNorm1d(2))
        (True, False)
    """
    return isinstance(module, _FrozenBatchNorm) or is_converted_in_place(module)


def _check_convertible(bn: _BatchNorm) -> None:
    if any(nn.parameter.is_lazy(t) for t in (*bn.parameters(recurse=False), *bn.buffers(recurse=False))):
        raise ArgumentError(
            f"{type(bn).__name__} is a lazy layer whose tensors are not initialised yet, so there is "
            "nothing to freeze; expected an initialised BatchNorm. Fix: run one forward (or load its "
            "weights) before freeze_batchnorm(..., convert=True)."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ArgumentError(
            f"{type(bn).__name__} has track_running_stats=False: it normalises with batch statistics "
            "in every mode, so there are no statistics to freeze. Fix: leave it out of the selection, "
            "or build it with track_running_stats=True."
        )


def freeze_batchnorm(model: nn.Module, *selectors: Selector, convert: bool = False) -> nn.Module:
    """Freeze the BatchNorm layers in the selection: affine weights *and* running statistics.

    Each BatchNorm (including ``SyncBatchNorm`` and subclasses) in the selection
    gets ``requires_grad=False`` on its weight and bias and a pinned eval mode, so
    a training-mode forward leaves every tensor bit-identical and returns what
    eval mode returns.

    ``convert=True`` makes every tensor of each one a buffer (same ``state_dict``
    keys) without changing what the model computes:

    * a layer that computes exactly BatchNorm (``BatchNorm1d/2d/3d``,
      ``SyncBatchNorm``, a subclass that only changes the constructor) is swapped
      for a ``FrozenBatchNorm1d/2d/3d`` (module and parameter identity change,
      which is the point); a layer shared under several names is swapped at each,
      so it stays shared;
    * a subclass with its own ``forward``, submodules, extra tensors or hooks
      (timm's ``BatchNormAct2d``: BatchNorm + activation + dropout) is converted
      in place: same object, class, forward and submodules, its own parameters
      turned into buffers, pinned to eval.

    :func:`torchfreeze.unfreeze` converts back to the original layer object (its
    class, attributes and parameter objects, with the current values); no
    constructor is called. Layers already converted count as frozen: calling it
    twice is harmless.

    Args:
        model: any ``nn.Module``.
        *selectors: where to look for BatchNorm layers; none means the whole model.
        convert: make every tensor a buffer (see above) instead of only pinning.

    Returns:
        The model, changed in place.

    Raises:
        ArgumentTypeError: ``convert`` is not a bool.
        SelectorError: a selector matched nothing.
        ArgumentError: the selection holds no BatchNorm layer, or (with ``convert=True``)
            one without running statistics, a lazy one not yet initialised, or a plain
            BatchNorm that is the model itself; nothing changes then.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        >>> _ = freeze_batchnorm(model).train()
        >>> before = model[1].running_mean.clone()
        >>> _ = model(torch.randn(8, 3))
        >>> torch.equal(before, model[1].running_mean), model[1].weight.requires_grad
        (True, False)
    """
    require_module(model, "freeze_batchnorm")
    require_bool(convert, "freeze_batchnorm", "convert")
    selection = resolve(model, *selectors, verb="freeze_batchnorm")
    modules = selection.unique_modules().values()
    batchnorms = [m for m in modules if isinstance(m, _BatchNorm)]
    if not batchnorms and not any(isinstance(m, _FrozenBatchNorm) for m in modules):
        raise ArgumentError(
            f"freeze_batchnorm found no BatchNorm layer in the selection {selection.matched!r}; expected "
            "a part of the model that contains BatchNorm1d/2d/3d or SyncBatchNorm. Fix: select such a part."
        )
    if convert:
        to_convert = [bn for bn in batchnorms if not is_converted_in_place(bn)]
        for bn in to_convert:
            _check_convertible(bn)
        swaps = [bn for bn in to_convert if computes_as_batchnorm(bn)]
        if model in swaps:
            raise ArgumentError(
                "freeze_batchnorm(model, convert=True) cannot swap the model itself; expected a BatchNorm "
                "inside a container. Fix: pass convert=False (pin it), or use "
                "FrozenBatchNorm2d.from_batchnorm(model)."
            )
        replacements = [(bn, _frozen_type_for(bn).from_batchnorm(bn)) for bn in swaps]
        for bn, frozen in replacements:  # all built (and validated) before any swap
            _replace_everywhere(model, bn, frozen)
        for bn in to_convert:
            if not computes_as_batchnorm(bn):
                convert_in_place(bn)
        return model
    for bn in batchnorms:
        set_requires_grad(bn.parameters(recurse=False), False)
        set_pin(bn, "eval", "freeze")
    return model


def unconvert_batchnorm(model: nn.Module, names: list[str]) -> None:
    """Convert the layers at ``names`` (at every path of each) back to the BatchNorm they were.

    A ``FrozenBatchNorm*d`` gives way to the original layer object (or a new
    BatchNorm when it was built directly); a layer converted in place gets its
    parameter objects back. Each takes the train/eval flag its ancestors pass
    down, as if their last ``train()``/``eval()`` had reached it (a pin set by
    freezing is removed, other pins stay). Cannot fail: everything is built before
    the first swap.
    """
    swaps: list[tuple[str, nn.Module, nn.Module]] = []
    in_place: list[tuple[str, nn.Module]] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, _FrozenBatchNorm):
            swaps.append((name, module, module.to_batchnorm()))
        elif is_converted_in_place(module):
            in_place.append((name, module))
    for name, frozen, bn in swaps:
        drop_freeze_pin(model, name, bn)
        if get_pin(bn) is None:
            bn.train(bool(inherited_training(model, name, default=model.training)))
        _replace_everywhere(model, frozen, bn)
    for name, module in in_place:
        restore_in_place(model, name, module)
