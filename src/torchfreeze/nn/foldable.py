"""Which Conv/Linear -> BatchNorm pairs a model has, and why one cannot be folded.

Pairs come from a ``torch.fx`` trace when the model traces, else from adjacent
children of ``nn.Sequential`` containers. :func:`torchfreeze.fold_batchnorm`
folds the pairs whose reason is ``None``.
"""

from __future__ import annotations

from itertools import pairwise

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchfreeze._core.checks import require_module
from torchfreeze._core.mode import get_pin
from torchfreeze.nn.batchnorm import _FrozenBatchNorm

__all__ = ["foldable_pairs", "why_not", "Linear", "Norm", "LINEAR_TYPES"]

#: The layers a BatchNorm can be folded into, and the layers that can be folded.
Linear = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear
Norm = _BatchNorm | _FrozenBatchNorm
LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_TYPES = (_BatchNorm, _FrozenBatchNorm)

# What symbolic tracing raises for a forward it cannot trace (control flow on a
# proxy, iterating one, calling code that needs real tensors).
_TRACE_ERRORS = (fx.proxy.TraceError, TypeError, AttributeError, NotImplementedError, RuntimeError, ValueError)


def _pinned_eval(module: nn.Module) -> bool:
    pin = get_pin(module)
    return pin is not None and pin.mode == "eval"


def why_not(model: nn.Module, conv_name: str, bn_name: str) -> str | None:
    """Why the pair cannot be folded (``None`` when it can)."""
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    if not isinstance(conv, LINEAR_TYPES):
        return f"'{conv_name}' is a {type(conv).__name__}; only Conv1d/2d/3d and Linear can take a folded BatchNorm"
    trainable = [n for n, p in conv.named_parameters() if p.requires_grad]
    if trainable:
        return (
            f"'{conv_name}.{trainable[0]}' is trainable; fold only frozen layers (freeze(model, '{conv_name}') first)"
        )
    own = {id(p) for p in conv.parameters()}
    elsewhere = [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if id(p) in own and not n.startswith(conv_name + ".")
    ]
    if elsewhere:
        return (
            f"a parameter of '{conv_name}' is also used as '{elsewhere[0]}'; folding would change that other "
            "use too (untie the weights first)"
        )
    if isinstance(bn, _BatchNorm):
        if bn.running_mean is None or bn.running_var is None:
            return f"'{bn_name}' has track_running_stats=False (it always uses batch statistics)"
        trainable = [n for n, p in bn.named_parameters() if p.requires_grad]
        if trainable:
            return f"'{bn_name}.{trainable[0]}' is trainable; freeze the BatchNorm first (freeze_batchnorm)"
        if not _pinned_eval(bn):
            return (
                f"'{bn_name}' is not pinned to eval mode, so model.train() would make it use batch "
                f"statistics; pin it first with freeze_batchnorm(model, '{bn_name}') or "
                f"pin_mode(model, '{bn_name}', mode='eval')"
            )
    elif not isinstance(bn, _FrozenBatchNorm):
        return f"'{bn_name}' is a {type(bn).__name__}, not a BatchNorm"
    channels = bn.num_features
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if out != channels:
        return f"'{conv_name}' has {out} output channels but '{bn_name}' normalises {channels}"
    return None


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        pre = f"{name}." if name else ""
        for (a, ma), (b, mb) in pairwise(module.named_children()):
            if isinstance(ma, LINEAR_TYPES) and isinstance(mb, _NORM_TYPES):
                pairs.append((pre + a, pre + b))
    return pairs


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """Conv/Linear -> BatchNorm edges from a torch.fx trace (None when the model does not trace)."""
    try:
        graph = fx.symbolic_trace(model).graph
    except _TRACE_ERRORS:
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        if not isinstance(modules.get(str(node.target)), _NORM_TYPES):
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv, bn = str(src.target), str(node.target)
        if not isinstance(modules.get(conv), LINEAR_TYPES):
            continue
        if len(src.users) != 1 or calls.get(conv) != 1 or calls.get(bn) != 1:
            continue
        pairs.append((conv, bn))
    return pairs


def foldable_pairs(model: nn.Module) -> list[tuple[str, str, str | None]]:
    """Every Conv/Linear -> BatchNorm pair found, with the reason it cannot be folded (or None).

    Pairs come from a ``torch.fx`` trace when the model traces (a layer whose
    output is used anywhere else, or a layer called twice, is left out), else from
    adjacent children of ``nn.Sequential`` containers.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``(conv_name, bn_name, reason_or_None)`` triples in model order.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.

    >>> m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> [(c, b) for c, b, _ in foldable_pairs(m)]
    [('0', '1')]
    """
    require_module(model, "foldable_pairs")
    pairs = _fx_pairs(model)
    if pairs is None:
        pairs = _sequential_pairs(model)
    return [(c, b, why_not(model, c, b)) for c, b in pairs]
