"""Which Conv/Linear -> BatchNorm pairs a model has, and why one cannot be folded.

Pairs come from a ``torch.fx`` trace of the model; where the model does not
trace, from the traces of its submodules (recursively), and from adjacent
children of an ``nn.Sequential`` that does not trace. Conv/Linear and BatchNorm
layers (``FrozenBatchNorm*d`` and converted subclasses included) are leaves of
the trace, so a pair is found the same way whether the BatchNorm is converted or
not, in a ``Sequential`` or called by a block's ``forward``
(``self.bn1(self.conv1(x))``). :func:`torchfreeze.fold_batchnorm` folds the
pairs whose reason is ``None``.
"""

from __future__ import annotations

from itertools import pairwise

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchfreeze._core.checks import require_module
from torchfreeze._core.mode import get_pin
from torchfreeze.nn.batchnorm import _FrozenBatchNorm, computes_as_batchnorm, is_converted_batchnorm

__all__ = ["foldable_pairs", "why_not", "frozen_norms", "is_frozen_norm", "Linear", "Norm", "LINEAR_TYPES"]

#: The layers a BatchNorm can be folded into, and the layers that can be folded.
Linear = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear
Norm = _BatchNorm | _FrozenBatchNorm
LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_TYPES = (_BatchNorm, _FrozenBatchNorm)

# What symbolic tracing raises for a forward it cannot trace (control flow on a
# proxy, iterating one, calling code that needs real tensors).
_TRACE_ERRORS = (
    fx.proxy.TraceError,
    TypeError,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    LookupError,
    AssertionError,
)


def _pinned_eval(module: nn.Module) -> bool:
    pin = get_pin(module)
    return pin is not None and pin.mode == "eval"


class _PairTracer(fx.Tracer):
    """A tracer that keeps Conv/Linear and BatchNorm layers (of any class) as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*LINEAR_TYPES, *_NORM_TYPES)) or super().is_leaf_module(m, module_qualified_name)


def is_frozen_norm(module: nn.Module) -> bool:
    """A BatchNorm that no longer learns: converted, or with frozen weights and a pinned eval mode."""
    if is_converted_batchnorm(module):
        return True
    if not isinstance(module, _BatchNorm) or module.running_mean is None:
        return False
    return not any(p.requires_grad for p in module.parameters(recurse=False)) and _pinned_eval(module)


def frozen_norms(model: nn.Module) -> list[str]:
    """Qualified names of the frozen BatchNorm layers (see :func:`is_frozen_norm`), in model order."""
    return [name for name, m in model.named_modules() if name and is_frozen_norm(m)]


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
    if isinstance(bn, _BatchNorm) and not computes_as_batchnorm(bn):
        return (
            f"'{bn_name}' is a {type(bn).__name__}, whose forward does more than BatchNorm (its own forward, "
            "submodules such as an activation, extra tensors or hooks); folding would drop that"
        )
    channels = bn.num_features
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if out != channels:
        return f"'{conv_name}' has {out} output channels but '{bn_name}' normalises {channels}"
    return None


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """Conv/Linear -> BatchNorm edges from a torch.fx trace (None when the module does not trace)."""
    try:
        graph = _PairTracer().trace(model)
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


def _collect(module: nn.Module, prefix: str, out: list[tuple[str, str]]) -> None:
    """Pairs of ``module`` (names prefixed): its trace, else its Sequential neighbours and its children's."""
    if isinstance(module, (*LINEAR_TYPES, *_NORM_TYPES)) or not module._modules:
        return
    pairs = _fx_pairs(module)
    if pairs is not None:
        out.extend((prefix + c, prefix + b) for c, b in pairs)
        return
    if isinstance(module, nn.Sequential):
        for (a, ma), (b, mb) in pairwise(module.named_children()):
            if isinstance(ma, LINEAR_TYPES) and isinstance(mb, _NORM_TYPES):
                out.append((prefix + a, prefix + b))
    for name, child in module.named_children():
        _collect(child, f"{prefix}{name}.", out)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str, str | None]]:
    """Every Conv/Linear -> BatchNorm pair found, with the reason it cannot be folded (or None).

    Pairs come from a ``torch.fx`` trace in which Conv/Linear and BatchNorm
    layers (converted or not) are single calls (a layer whose output is used
    anywhere else, or a layer called twice, is left out). Where the model does
    not trace, each submodule is traced on its own, and an ``nn.Sequential`` that
    does not trace contributes its adjacent children.

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
    pairs: list[tuple[str, str]] = []
    _collect(model, "", pairs)
    return [(c, b, why_not(model, c, b)) for c, b in pairs]
