"""How a BatchNorm layer is converted to all-buffer form, and back, without changing what it computes.

Two forms, chosen per layer by :func:`computes_as_batchnorm`:

* a layer that computes exactly what BatchNorm computes (``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm``, or a subclass that only changes the constructor: same
  ``forward``, no submodules, no other tensors, no hooks) is *swapped* for a
  ``FrozenBatchNorm1d/2d/3d`` (module :mod:`torchfreeze.nn.batchnorm`), which
  keeps the original layer object to give it back;
* any other subclass (timm's ``BatchNormAct2d`` adds an activation and a
  dropout, others add buffers or hooks) is *converted in place*: the object,
  its class, its ``forward`` and its submodules stay; its own parameters
  become buffers of the same values (same ``state_dict`` keys, in the same
  order) and the layer is pinned to eval, so it normalises with its running
  statistics in every mode. The original parameter objects are kept on the
  module (outside the module tree) and come back, with the current values,
  when it is converted back.

Nothing here calls a layer's constructor with guessed arguments.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchfreeze._core.mode import get_pin, inherited_training, remove_pin, set_pin
from torchfreeze._core.uses import set_requires_grad

__all__ = ["computes_as_batchnorm", "is_converted_in_place", "convert_in_place", "restore_in_place", "drop_freeze_pin"]

_KEY = "_torchfreeze_converted"
_STANDARD_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def computes_as_batchnorm(module: nn.Module) -> bool:
    """True for a BatchNorm whose output is BatchNorm's own: a ``FrozenBatchNorm`` can stand in for it.

    That is a ``BatchNorm1d/2d/3d``/``SyncBatchNorm`` (or lazy) instance whose class
    keeps BatchNorm's ``forward``, with no submodules, no parameters or buffers
    beyond BatchNorm's, and no forward hooks of its own.

    >>> import torch
    >>> class BatchNormAct(nn.BatchNorm1d):
    ...     def __init__(self, n: int) -> None:
    ...         super().__init__(n)
    ...         self.act = nn.ReLU()
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.act(super().forward(x))
    >>> computes_as_batchnorm(nn.BatchNorm1d(2)), computes_as_batchnorm(BatchNormAct(2))
    (True, False)
    """
    if not isinstance(module, _BatchNorm) or type(module).forward not in _PLAIN_FORWARDS:
        return False
    if "forward" in module.__dict__ or module._modules:
        return False
    if not set(module._parameters).union(module._buffers) <= _STANDARD_TENSORS:
        return False
    hooks = (module._forward_hooks, module._forward_pre_hooks)
    return not any(hooks)


def is_converted_in_place(module: nn.Module) -> bool:
    """True for a BatchNorm subclass that :func:`convert_in_place` converted."""
    return isinstance(module.__dict__.get(_KEY), dict)


def convert_in_place(bn: nn.Module) -> None:
    """Turn ``bn``'s own parameters into buffers (same keys, order and values) and pin it to eval."""
    if is_converted_in_place(bn):
        return
    order = list(bn._parameters)
    params = {n: p for n, p in bn._parameters.items() if p is not None}
    buffers = {n: p.detach() for n, p in params.items()}  # shares storage with the kept parameter
    rest = dict(bn._buffers)
    bn._parameters.clear()
    bn._parameters.update({n: None for n in order if n not in params})
    bn._buffers.clear()
    bn._buffers.update({**buffers, **rest})  # weight, bias first: state_dict order as before
    # plain containers (no class of ours), so deepcopy and pickle need nothing special
    bn.__dict__[_KEY] = {"parameters": params, "order": order}
    set_pin(bn, "eval", "freeze")


def restore_in_place(model: nn.Module, name: str, bn: nn.Module) -> None:
    """Undo :func:`convert_in_place`: the same parameter objects, now trainable, holding the current values."""
    converted = bn.__dict__.pop(_KEY, None)
    if not isinstance(converted, dict):
        return
    params: dict[str, nn.Parameter] = converted["parameters"]
    restored: dict[str, nn.Parameter | None] = {}
    for pname in converted["order"]:
        param = params.get(pname)
        if param is not None:
            current = bn._buffers.pop(pname, None)
            if current is not None:
                param.data = current  # values (and device/dtype) as they are now
        restored[pname] = param
    bn._parameters.clear()
    bn._parameters.update(restored)
    set_requires_grad([p for p in restored.values() if p is not None], True)
    drop_freeze_pin(model, name, bn)


def drop_freeze_pin(model: nn.Module, name: str, bn: nn.Module) -> None:
    """Remove a pin that freezing set; the layer then takes the flag its ancestors pass down."""
    pin = get_pin(bn)
    if pin is not None and pin.origin == "freeze":
        remove_pin(bn, bool(inherited_training(model, name, default=bn.training)))
