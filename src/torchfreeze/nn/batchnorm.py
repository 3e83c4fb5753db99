"""BatchNorm that really stays frozen: pinned eval, or converted to all-buffer modules."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchfreeze._core.behaviour import is_normalization
from torchfreeze._core.checks import require_module
from torchfreeze._core.mode import inherited_training, set_pin
from torchfreeze._core.select import Selector, resolve
from torchfreeze._core.uses import set_requires_grad
from torchfreeze.errors import ArgumentError

__all__ = [
    "is_norm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FROZEN_BATCHNORM_TYPES",
    "freeze_batchnorm",
]


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm).

    Example:
        >>> from torch import nn
        >>> is_norm(nn.BatchNorm2d(3)), is_norm(nn.Linear(2, 2))
        (True, False)
    """
    return is_normalization(module) or isinstance(module, _FrozenBatchNorm)


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with every tensor a buffer: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``state_dict`` keys are those of the BatchNorm it replaces. Without a
    gradient to compute, the forward is the native inference kernel; when the
    input needs a gradient, it is one multiply-add per element, whose backward
    is a single multiply (BatchNorm's own backward would also compute the
    constant weight's and bias's gradients).

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

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> _FrozenBatchNorm:
        """A frozen copy of ``bn``'s tensors (same dtype and device, same ``state_dict`` keys)."""
        if not isinstance(bn, _BatchNorm):
            raise ArgumentError(
                "bn must be a BatchNorm layer (BatchNorm1d/2d/3d or SyncBatchNorm), "
                f"got {type(bn).__name__}. "
                "Fix: convert only BatchNorm layers."
            )
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
        frozen = cls(bn.num_features, bn.eps, affine=bn.affine, momentum=bn.momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                source = getattr(bn, name, None)
                if source is not None and getattr(frozen, name) is not None:
                    setattr(frozen, name, source.detach().clone())
        frozen._source = type(bn)
        return frozen

    def to_batchnorm(self) -> nn.Module:
        """The inverse of :meth:`from_batchnorm`: an ordinary, trainable BatchNorm with these values."""
        bn = self._source(self.num_features, self.eps, momentum=self.momentum, affine=self.affine)
        bn.to(device=self.running_mean.device, dtype=self.running_mean.dtype)
        bn.load_state_dict(self.state_dict())
        return bn

    def _scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}D")
        if not (x.requires_grad and torch.is_grad_enabled()):
            # nothing to differentiate: the native inference kernel is the fastest forward
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        # with a gradient to the input, a multiply-add avoids batch_norm's backward,
        # which would also compute gradients for the (constant) weight and bias
        scale, shift = self._scale_shift()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


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


def freeze_batchnorm(model: nn.Module, *selectors: Selector, convert: bool = False) -> nn.Module:
    """Freeze the BatchNorm layers in the selection: affine weights *and* running statistics.

    Each BatchNorm (including ``SyncBatchNorm``) in the selection gets
    ``requires_grad=False`` on its weight and bias and a pinned eval mode, so a
    training-mode forward leaves every tensor bit-identical and returns what
    eval mode returns. ``convert=True`` instead swaps each one for a
    ``FrozenBatchNorm1d/2d/3d`` whose tensors are all buffers (same
    ``state_dict`` keys; module and parameter identity change, which is the
    point); a layer shared under several names is swapped at each, so it stays
    shared; :func:`torchfreeze.unfreeze` swaps them back (``eps`` and
    ``momentum`` included). Layers already converted count as frozen: calling
    it twice is harmless.

    Args:
        model: any ``nn.Module``.
        *selectors: where to look for BatchNorm layers; none means the whole model.
        convert: swap in ``FrozenBatchNorm*d`` modules instead of pinning.

    Returns:
        The model, changed in place.

    Raises:
        SelectorError: a selector matched nothing.
        ArgumentError: the selection holds no BatchNorm layer, or (with ``convert=True``)
            one without running statistics, a lazy one not yet initialised, or the
            model itself; nothing changes then.

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
    if not isinstance(convert, bool):
        raise ArgumentError(f"convert={convert!r} must be a bool (True to swap in FrozenBatchNorm modules).")
    selection = resolve(model, *selectors)
    modules = selection.unique_modules().values()
    batchnorms = [m for m in modules if isinstance(m, _BatchNorm)]
    if not batchnorms and not any(isinstance(m, _FrozenBatchNorm) for m in modules):
        raise ArgumentError(
            f"freeze_batchnorm found no BatchNorm layer in the selection {selection.matched!r}; expected "
            "a part of the model that contains BatchNorm1d/2d/3d or SyncBatchNorm. Fix: select such a part."
        )
    if convert:
        if model in batchnorms:
            raise ArgumentError(
                "freeze_batchnorm(model, convert=True) cannot swap the model itself; expected a BatchNorm "
                "inside a container. Fix: pass convert=False (pin it), or use "
                "FrozenBatchNorm2d.from_batchnorm(model)."
            )
        replacements = [(bn, _frozen_type_for(bn).from_batchnorm(bn)) for bn in batchnorms]
        for bn, frozen in replacements:  # all built (and validated) before any swap
            _replace_everywhere(model, bn, frozen)
        return model
    for bn in batchnorms:
        set_requires_grad(bn.parameters(recurse=False), False)
        set_pin(bn, "eval", "freeze")
    return model


def unconvert_batchnorm(model: nn.Module, names: list[str]) -> None:
    """Swap the ``FrozenBatchNorm*d`` modules at ``names`` (at every path of each) back to BatchNorm.

    Each new BatchNorm takes the train/eval flag its ancestors pass down, as if
    their last ``train()``/``eval()`` had reached it.
    """
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, _FrozenBatchNorm):
            bn = module.to_batchnorm()
            bn.train(bool(inherited_training(model, name, default=model.training)))
            _replace_everywhere(model, module, bn)
