"""Fold frozen, eval-pinned BatchNorm layers into the frozen Conv/Linear before them.

A BatchNorm in eval mode is an affine map per channel,
``y = (x - mean) / sqrt(var + eps) * gamma + beta``. When the layer before it
is a frozen ``Conv1d/2d/3d`` or ``Linear`` whose output goes only to that
BatchNorm, the map can be merged into the weights once:
``W' = W * s`` (per output channel) and ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``. The forward then skips one pass over the
activations.

This is opt-in and changes the ``state_dict`` (documented in docs/speed.md):

* the convolution's ``weight`` holds the folded values, and it gains a
  ``bias`` key when it had none (a new frozen parameter);
* the BatchNorm's keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
  ``num_batches_tracked``) disappear: the BatchNorm is replaced by a
  :class:`FoldedBatchNorm` placeholder (identity forward, no tensors in the
  ``state_dict``) that remembers the original layer and weights.

The way back is :func:`unfold_batchnorm`, which restores the original
BatchNorm module object and the exact original weights (bit-identical), so the
``state_dict`` is again what it was. Parameter identity of the convolution's
``weight`` (and of an existing ``bias``) is kept in both directions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchfreeze._core.fingerprint import fingerprint
from torchfreeze.errors import ArgumentError, FreezeStateError

__all__ = ["fold_batchnorm", "unfold_batchnorm", "folded_batchnorms", "foldable_pairs", "FoldedBatchNorm"]

_LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class FoldedBatchNorm(nn.Module):
    """Placeholder left where a BatchNorm was folded into ``conv``: the identity.

    It holds no parameters or buffers (so the BatchNorm's ``state_dict`` keys
    are gone) and keeps what :func:`unfold_batchnorm` needs, outside the module
    tree: the original BatchNorm module and the convolution's original weights.

    Attributes:
        conv: qualified name of the layer the statistics were folded into.
        num_features: channels of the folded BatchNorm.

    >>> from torchfreeze import freeze, freeze_batchnorm
    >>> m = fold_batchnorm(freeze_batchnorm(freeze(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))))
    >>> m[1]
    FoldedBatchNorm(3, folded into '0')
    """

    def __init__(
        self,
        conv: str,
        original: nn.Module,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        added_bias: bool,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.num_features = int(getattr(original, "num_features", weight.shape[0]))
        # Plain attributes (not submodules/buffers): not in state_dict, not in parameters().
        self.__dict__["_original"] = original
        self.__dict__["_weight"] = weight
        self.__dict__["_bias"] = bias
        self.__dict__["_added_bias"] = added_bias
        self.__dict__["_weights_digest"] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into {self.conv!r}"


def _is_frozen_bn(module: nn.Module) -> bool:
    try:
        from torchfreeze.nn.batchnorm import _FrozenBatchNorm
    except Exception:
        return False
    return isinstance(module, _FrozenBatchNorm)


def _pinned_eval(module: nn.Module) -> bool:
    try:
        from torchfreeze._core.mode import get_pin
    except Exception:
        return False
    pin = get_pin(module)
    return pin is not None and pin.mode == "eval"


def _why_not(model: nn.Module, conv_name: str, bn_name: str) -> str | None:
    """Why the pair cannot be folded (None when it can)."""
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    if not isinstance(conv, _LINEAR_TYPES):
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
    if _is_frozen_bn(bn):
        channels = bn.num_features
    elif isinstance(bn, _BatchNorm):
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
        channels = bn.num_features
    else:
        return f"'{bn_name}' is a {type(bn).__name__}, not a BatchNorm"
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if out != channels:
        return f"'{conv_name}' has {out} output channels but '{bn_name}' normalises {channels}"
    return None


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        items = list(module.named_children())
        for (a, ma), (b, mb) in zip(items, items[1:]):
            if isinstance(ma, _LINEAR_TYPES) and (isinstance(mb, _BatchNorm) or _is_frozen_bn(mb)):
                pre = f"{name}." if name else ""
                pairs.append((pre + a, pre + b))
    return pairs


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """Conv/Linear -> BatchNorm edges from a torch.fx trace (None when the model does not trace)."""
    try:
        import torch.fx as fx

        graph = fx.symbolic_trace(model).graph
    except Exception:
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = modules.get(node.target)
        if not (isinstance(bn, _BatchNorm) or _is_frozen_bn(bn)) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        if not isinstance(modules.get(src.target), _LINEAR_TYPES):
            continue
        if len(src.users) != 1 or calls.get(src.target) != 1 or calls.get(node.target) != 1:
            continue
        pairs.append((str(src.target), str(node.target)))
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

    >>> m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> [(c, b) for c, b, _ in foldable_pairs(m)]
    [('0', '1')]
    """
    pairs = _fx_pairs(model)
    if pairs is None:
        pairs = _sequential_pairs(model)
    return [(c, b, _why_not(model, c, b)) for c, b in pairs]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def fold_batchnorm(
    model: nn.Module,
    *selectors: Any,
    pairs: list[tuple[str, str]] | None = None,
    strict: bool = False,
) -> nn.Module:
    """Fold each frozen, eval-pinned BatchNorm into the frozen Conv/Linear before it.

    Changes the ``state_dict`` (see the module docstring): the conv weights hold
    the folded values (and gain a ``bias`` if they had none), the BatchNorm keys
    disappear. :func:`unfold_batchnorm` restores everything exactly.

    Args:
        model: any ``nn.Module``.
        *selectors: only fold BatchNorm layers inside this selection (see
            :func:`torchfreeze.select`); none means the whole model.
        pairs: explicit ``(conv_name, bn_name)`` pairs, for models whose forward
            does not trace with ``torch.fx`` and is not a plain ``nn.Sequential``.
            You vouch that the conv's output goes only into the BatchNorm.
        strict: raise when a pair found in the selection cannot be folded
            (default: fold what can be folded and leave the rest as it is).

    Returns:
        The model, changed in place.

    Raises:
        ArgumentError: nothing foldable in the selection (the message lists each
            candidate and why), a bad ``pairs`` entry; nothing is changed.
        FreezeStateError: with ``strict=True``, a pair that cannot be folded;
            nothing is changed.

    >>> from torchfreeze import freeze, freeze_batchnorm
    >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    >>> _ = freeze_batchnorm(freeze(m))
    >>> x = torch.randn(1, 1, 5, 5)
    >>> before = m(x)
    >>> _ = fold_batchnorm(m)
    >>> torch.allclose(m(x), before, atol=1e-6), sorted(m.state_dict())
    (True, ['0.bias', '0.weight'])
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"fold_batchnorm: model must be an nn.Module, got {type(model).__name__}.")
    if not isinstance(strict, bool):
        raise ArgumentError(f"fold_batchnorm: strict must be a bool, got {strict!r}.")
    names = dict(model.named_modules())
    if pairs is not None:
        if not isinstance(pairs, (list, tuple)):
            raise ArgumentError(
                f"fold_batchnorm: pairs must be a list of (conv_name, bn_name) tuples, got {type(pairs).__name__}."
            )
        found: list[tuple[str, str, str | None]] = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
                raise ArgumentError(f"fold_batchnorm: each entry of pairs must be (conv_name, bn_name), got {item!r}.")
            for s in item:
                if s not in names or not s:
                    import difflib

                    close = difflib.get_close_matches(s, list(names), n=3)
                    raise ArgumentError(
                        f"fold_batchnorm: pairs names {s!r}, which is no submodule of the model; closest: {close}."
                    )
            found.append((item[0], item[1], _why_not(model, item[0], item[1])))
        used = [n for c, b, _ in found for n in (c, b)]
        repeated = sorted({n for n in used if used.count(n) > 1})
        if repeated:  # folding a layer twice would lose its original weights (no exact way back)
            raise ArgumentError(
                f"fold_batchnorm: pairs names {repeated} more than once; expected each layer in at most one "
                "(conv_name, bn_name) pair. Remove the duplicate entries."
            )
    else:
        found = foldable_pairs(model)
    if selectors:
        from torchfreeze._core.select import resolve

        selected = set(resolve(model, *selectors).modules)
        found = [f for f in found if f[1] in selected]
    bad = [f for f in found if f[2] is not None]
    good = [f for f in found if f[2] is None]
    if strict and bad:
        raise FreezeStateError(
            "fold_batchnorm: cannot fold "
            + "; ".join(f"'{b}' into '{c}': {r}" for c, b, r in bad)
            + ". Fix those layers, or call without strict=True to fold only the others."
        )
    if not good:
        detail = "; ".join(f"'{b}' into '{c}': {r}" for c, b, r in bad) or (
            "no Conv/Linear directly followed by a BatchNorm was found"
        )
        raise ArgumentError(
            f"fold_batchnorm: nothing to fold ({detail}). Fix: freeze the layers and pin the BatchNorm "
            "layers to eval (freeze(model, ...); freeze_batchnorm(model, ...)), or pass pairs=[(conv, bn)] "
            "for a model that is not an nn.Sequential and does not trace with torch.fx."
        )
    plan = []
    for conv_name, bn_name, _ in good:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        scale, shift = _scale_shift(bn)
        w = conv.weight.detach()
        view = (-1,) + (1,) * (w.dim() - 1)
        new_w = (w.double() * scale.view(view)).to(w.dtype)
        b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
        new_b = (b0 * scale + shift).to(w.dtype)
        plan.append((conv_name, bn_name, conv, bn, new_w, new_b))
    for conv_name, bn_name, conv, bn, new_w, new_b in plan:  # everything computed before anything changes
        old_w = conv.weight.detach().clone()
        old_b = conv.bias.detach().clone() if conv.bias is not None else None
        with torch.no_grad():
            conv.weight.copy_(new_w)
            if conv.bias is not None:
                conv.bias.copy_(new_b.to(conv.bias.device))
                added = False
            else:
                conv.bias = nn.Parameter(new_b.to(conv.weight.device), requires_grad=False)
                added = True
        holder = FoldedBatchNorm(conv_name, bn, old_w, old_b, added)
        holder.__dict__["_weights_digest"] = _digest(conv)
        # the layer itself (its name is relative to the model folded, which may be a submodule of
        # the one later unfolded); a plain attribute, so deepcopy/pickle map it to the copied layer
        holder.__dict__["_conv"] = conv
        holder.train(bn.training)
        _set_submodule(model, bn_name, holder)
    return model


def _digest(conv: nn.Module) -> str:
    """Content digest of a layer's weights (detects changes after folding, survives deepcopy)."""
    return fingerprint({name: p for name, p in (("weight", conv.weight), ("bias", conv.bias)) if p is not None})


def folded_batchnorms(model: nn.Module) -> dict[str, str]:
    """Map each folded BatchNorm's qualified name to the layer it was folded into.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``{bn_name: conv_name}`` for every :class:`FoldedBatchNorm` in ``model``
        (empty when nothing is folded).

    >>> folded_batchnorms(nn.Sequential(nn.Linear(2, 2)))
    {}
    """
    return {n: m.conv for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)}


def unfold_batchnorm(model: nn.Module, *, force: bool = False) -> nn.Module:
    """Undo :func:`fold_batchnorm`: original BatchNorm modules and exact original weights.

    Args:
        model: a model with folded BatchNorm layers.
        force: restore even when the folded weights were changed after folding
            (those changes are then lost).

    Returns:
        The model, changed in place (``state_dict`` keys and values as before folding).

    Raises:
        ArgumentError: the model has no folded BatchNorm.
        FreezeStateError: a folded layer's weights changed since folding (and not ``force``);
            nothing is changed.

    >>> from torchfreeze import freeze, freeze_batchnorm
    >>> m = freeze_batchnorm(freeze(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))))
    >>> keys = list(m.state_dict())
    >>> list(unfold_batchnorm(fold_batchnorm(m)).state_dict()) == keys
    True
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"unfold_batchnorm: model must be an nn.Module, got {type(model).__name__}.")
    holders = [(n, m) for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]
    if not holders:
        raise ArgumentError(
            "unfold_batchnorm: the model has no folded BatchNorm (nothing to undo). "
            "Check with folded_batchnorms(model)."
        )

    def conv_of(h: FoldedBatchNorm) -> nn.Module:
        conv = h.__dict__.get("_conv")
        return conv if conv is not None else model.get_submodule(h.conv)

    if not force:
        for name, h in holders:
            conv = conv_of(h)
            if _digest(conv) != h._weights_digest:
                raise FreezeStateError(
                    f"unfold_batchnorm: '{h.conv}' changed after its BatchNorm '{name}' was folded into it; "
                    "unfolding would throw those changes away. Pass force=True to restore the original weights anyway."
                )
    for name, h in holders:
        conv = conv_of(h)
        with torch.no_grad():
            conv.weight.copy_(h._weight)
            if h._added_bias:
                del conv.bias
                conv.register_parameter("bias", None)
            elif conv.bias is not None and h._bias is not None:
                conv.bias.copy_(h._bias)
        bn = h._original
        ref = conv.weight
        if any(t.device != ref.device for t in bn.buffers()):
            bn.to(ref.device)
        _set_submodule(model, name, bn)
    return model
