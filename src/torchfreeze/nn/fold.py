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

Which pairs exist, and why one cannot be folded, is :func:`foldable_pairs`
(module :mod:`torchfreeze.nn.foldable`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from torchfreeze._core.checks import refuse_meta, require_bool, require_module, short_repr
from torchfreeze._core.fingerprint import fingerprint
from torchfreeze._core.select import Selector, resolve
from torchfreeze.errors import ArgumentError, ArgumentTypeError, FreezeStateError
from torchfreeze.nn.foldable import Linear, Norm, foldable_pairs, frozen_norms, why_not

__all__ = ["fold_batchnorm", "unfold_batchnorm", "folded_batchnorms", "foldable_pairs", "FoldedBatchNorm"]


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

    # Plain instance attributes set through __dict__ (not submodules/buffers): not in
    # state_dict, not in parameters(); deepcopy/pickle map them to the copied objects.
    _original: nn.Module
    _weight: torch.Tensor
    _bias: torch.Tensor | None
    _added_bias: bool
    _weights_digest: str
    _conv: nn.Module | None

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
        self.__dict__.update(
            _original=original, _weight=weight, _bias=bias, _added_bias=added_bias, _weights_digest="", _conv=None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into {self.conv!r}"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _scale_shift(bn: Norm) -> tuple[torch.Tensor, torch.Tensor]:
    running_var, running_mean = bn.running_var, bn.running_mean
    if running_var is None or running_mean is None:  # why_not() refuses such a layer before
        raise ArgumentError(f"{type(bn).__name__} has no running statistics to fold.")
    var = running_var.detach().double()
    mean = running_mean.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _explicit_pairs(model: nn.Module, pairs: Any) -> list[tuple[str, str, str | None]]:
    """Check ``pairs=`` entries (types, names, repeats) and give each its reason (or None)."""
    if not isinstance(pairs, (list, tuple)):
        raise ArgumentTypeError(
            f"fold_batchnorm(pairs={pairs!r}): pairs must be a list of (conv_name, bn_name) tuples, "
            f"got {type(pairs).__name__}. Fix: pass pairs=[('conv', 'bn')]."
        )
    names = dict(model.named_modules())
    found: list[tuple[str, str, str | None]] = []
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ArgumentTypeError(
                f"fold_batchnorm: each entry of pairs must be (conv_name, bn_name), got {item!r}. "
                "Fix: pass a list of 2-tuples of qualified module names."
            )
        for s in item:
            if s not in names or not s:
                known = [n for n in names if n]
                close = difflib.get_close_matches(s, known, n=3) or known[:3]
                raise ArgumentError(
                    f"fold_batchnorm(pairs={short_repr(pairs)}): {short_repr(s)} is no submodule of the model; "
                    f"expected qualified module names (model.named_modules()), e.g. {short_repr(close)}. "
                    "Fix: name each layer as named_modules() does."
                )
        found.append((item[0], item[1], why_not(model, item[0], item[1])))
    used = [n for c, b, _ in found for n in (c, b)]
    repeated = sorted({n for n in used if used.count(n) > 1})
    if repeated:  # folding a layer twice would lose its original weights (no exact way back)
        raise ArgumentError(
            f"fold_batchnorm: pairs names {repeated} more than once; expected each layer in at most one "
            "(conv_name, bn_name) pair. Remove the duplicate entries."
        )
    return found


def fold_batchnorm(
    model: nn.Module,
    *selectors: Selector,
    pairs: Sequence[tuple[str, str]] | None = None,
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
        strict: raise when a pair found in the selection cannot be folded, or a
            frozen BatchNorm in it (converted, or frozen and pinned eval) is in no
            pair that can be folded (default: fold what can be folded and leave the
            rest as it is).

    Returns:
        The model, changed in place.

    Raises:
        ArgumentTypeError: ``model`` is not a module, ``strict`` not a bool, ``pairs``
            not a list of name pairs; nothing is changed.
        ArgumentError: nothing foldable in the selection (the message lists each
            candidate and why), a name in ``pairs`` that is no submodule; nothing is changed.
        FreezeStateError: with ``strict=True``, a pair that cannot be folded or a
            frozen BatchNorm left unfolded (each named with its reason); nothing is changed.

    >>> from torchfreeze import freeze, freeze_batchnorm
    >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    >>> _ = freeze_batchnorm(freeze(m))
    >>> x = torch.randn(1, 1, 5, 5)
    >>> before = m(x)
    >>> _ = fold_batchnorm(m)
    >>> torch.allclose(m(x), before, atol=1e-6), sorted(m.state_dict())
    (True, ['0.bias', '0.weight'])
    """
    require_module(model, "fold_batchnorm")
    require_bool(strict, "fold_batchnorm", "strict")
    scope = set(resolve(model, *selectors, verb="fold_batchnorm").modules) if selectors else None
    found = foldable_pairs(model) if pairs is None else _explicit_pairs(model, pairs)
    refuse_meta(model, "fold_batchnorm")  # the folded weights are computed from the values
    if scope is not None:
        found = [f for f in found if f[1] in scope]
    bad = [f for f in found if f[2] is not None]
    good = [(c, b) for c, b, reason in found if reason is None]
    paired = {b for _, b, _ in found}
    # frozen BatchNorm layers that no found pair feeds (its input is not a Conv/Linear used only by it,
    # or the pair was not visible to the trace)
    lone = [b for b in frozen_norms(model) if b not in paired and (scope is None or b in scope)]
    problems = [f"'{b}' into '{c}': {r}" for c, b, r in bad] + [f"'{b}': {_LONE}" for b in lone]
    if strict and problems:
        raise FreezeStateError(
            f"fold_batchnorm(strict=True): {len(problems)} frozen or candidate BatchNorm layer(s) would stay "
            f"unfolded: {_bounded(problems)}. Fix: the reason given for each; or call without strict=True "
            "to fold only the others."
        )
    if not good:
        detail = _bounded(problems) if problems else "no Conv/Linear followed by a BatchNorm was found"
        raise ArgumentError(f"fold_batchnorm: nothing to fold ({detail}). Fix: {_fix_for(bad, lone)}")
    plan: list[tuple[str, str, Linear, Norm, torch.Tensor, torch.Tensor]] = []
    for conv_name, bn_name in good:  # why_not() checked both types
        conv = cast(Linear, model.get_submodule(conv_name))
        bn = cast(Norm, model.get_submodule(bn_name))
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
        # the layer itself (its name is relative to the model folded, which may be a submodule of
        # the one later unfolded)
        holder.__dict__.update(_weights_digest=_digest(conv), _conv=conv)
        holder.train(bn.training)
        _set_submodule(model, bn_name, holder)
    return model


_LONE = (
    "no Conv/Linear whose output goes only to it was found before it (looked for in the torch.fx trace of "
    "the model or its submodules, and between neighbours in an nn.Sequential); if there is one, name the "
    "pair with pairs=[(conv_name, bn_name)]"
)


def _bounded(problems: list[str], limit: int = 5) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def _fix_for(bad: list[tuple[str, str, str | None]], lone: list[str]) -> str:
    """The fix that applies, never a step the model shows was already taken."""
    if bad:
        return "the reason given for each pair says what to change."
    if lone:
        return "pass pairs=[(conv_name, bn_name)] for the pairs the search cannot see."
    return (
        "select a part where a frozen Conv/Linear feeds a BatchNorm (freeze(model, ...) then "
        "freeze_batchnorm(model, ...)), or pass pairs=[(conv_name, bn_name)]."
    )


def _digest(conv: Linear) -> str:
    """Content digest of a layer's weights (detects changes after folding, survives deepcopy)."""
    tensors = {"weight": conv.weight} if conv.bias is None else {"weight": conv.weight, "bias": conv.bias}
    return fingerprint(tensors)


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
    require_module(model, "folded_batchnorms")
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
        ArgumentTypeError: ``model`` is not a module, ``force`` not a bool.
        ArgumentError: the model has no folded BatchNorm.
        FreezeStateError: a folded layer's weights changed since folding (and not ``force``);
            nothing is changed.

    >>> from torchfreeze import freeze, freeze_batchnorm
    >>> m = freeze_batchnorm(freeze(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))))
    >>> keys = list(m.state_dict())
    >>> list(unfold_batchnorm(fold_batchnorm(m)).state_dict()) == keys
    True
    """
    require_module(model, "unfold_batchnorm")
    require_bool(force, "unfold_batchnorm", "force")
    holders = [(n, m) for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]
    if not holders:
        raise ArgumentError(
            "unfold_batchnorm: the model has no folded BatchNorm (nothing to undo). "
            "Check with folded_batchnorms(model)."
        )

    def conv_of(h: FoldedBatchNorm) -> Linear:  # fold_batchnorm only folds into these layers
        return cast(Linear, h._conv if h._conv is not None else model.get_submodule(h.conv))

    if not force:
        for name, h in holders:
            if _digest(conv_of(h)) != h._weights_digest:
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
        device = conv.weight.device
        if any(t.device != device for t in bn.buffers()):
            bn.to(device)
        _set_submodule(model, name, bn)
    return model
