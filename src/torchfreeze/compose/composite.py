"""Composition: a backbone, an optional neck and a head in one ``nn.Module``.

:class:`Composite` names its parts ``backbone``, ``neck`` and ``head``, so every
selector (``"backbone"``, ``"backbone.**.bias"``, ``"head"``) and
:func:`~torchfreeze.layer_groups` work on it without special cases. Any backbone
works with any head: a backbone is anything with ``forward_features(x)`` and
``feature_dim`` (the small duck-typed :class:`Backbone` protocol); the adapters
in :mod:`torchfreeze.compose.adapters` (:class:`ModuleBackbone`,
:class:`HFEncoder`) turn existing models into backbones without editing them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.select import Selector
from torchfreeze._core.tree import map_tensors, tensor_leaves
from torchfreeze.compose.adapters import HFEncoder, ModuleBackbone, call_module
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.nn.freezing import STORAGE_ATTR, layer_groups

# ModuleBackbone and HFEncoder live in compose.adapters; re-exported for the 0.2 import path.
__all__ = ["Backbone", "Composite", "store_frozen_backbone", "ModuleBackbone", "HFEncoder"]


@runtime_checkable
class Backbone(Protocol):
    """What :class:`Composite` needs from a backbone (structural, no subclassing).

    ``forward_features(x)`` returns the features given to the neck or head, and
    ``feature_dim`` is the size of their last dimension.

    >>> isinstance(ModuleBackbone(torch.nn.Linear(3, 4), feature_dim=4), Backbone)
    True
    """

    feature_dim: int

    def forward_features(self, x: Any) -> torch.Tensor:  # pragma: no cover - protocol
        """Return the features of ``x``."""
        ...


class Composite(nn.Module):
    """``head(neck(backbone.forward_features(x)))`` with parts named for selectors.

    Args:
        backbone: a :class:`Backbone` (``forward_features`` + ``feature_dim``) or
            any ``nn.Module`` (then its plain output are the features).
        head: the task head, any ``nn.Module``.
        neck: an optional module between backbone and head.

    Raises:
        ArgumentTypeError: a part is not an ``nn.Module``.

    >>> import torch
    >>> from torch import nn
    >>> m = Composite(ModuleBackbone(nn.Linear(4, 8), feature_dim=8), nn.Linear(8, 2))
    >>> m(torch.zeros(3, 4)).shape
    torch.Size([3, 2])
    >>> [n for n, _ in m.named_children()]
    ['backbone', 'head']
    """

    neck: nn.Module | None

    def __init__(self, backbone: nn.Module, head: nn.Module, neck: nn.Module | None = None) -> None:
        super().__init__()
        require_module(backbone, "Composite", "backbone")
        require_module(head, "Composite", "head")
        if neck is not None:
            require_module(neck, "Composite", "neck")
        self.backbone = backbone
        self.neck = neck
        self.head = head

    @property
    def frozen_storage_dtype(self) -> torch.dtype | None:
        """The dtype :func:`store_frozen_backbone` stores the frozen backbone in (``None``: float32).

        Unfreezing any backbone parameter (``unfreeze``, ``freeze_to``, ``GradualUnfreezing``)
        first restores the backbone to float32 and this goes back to ``None`` (issue 10.3).
        """
        dtype = self.backbone.__dict__.get(STORAGE_ATTR)
        return dtype if isinstance(dtype, torch.dtype) else None

    @property
    def feature_dim(self) -> int | None:
        """The backbone's ``feature_dim`` (``None`` when it does not declare one)."""
        dim = getattr(self.backbone, "feature_dim", None)
        return int(dim) if dim is not None else None

    def forward_features(self, x: Any) -> torch.Tensor:
        """Features after backbone and neck (what the head receives).

        When no backbone parameter requires grad and no input tensor does, the
        backbone runs under ``torch.no_grad()``: nothing before it trains, so no
        activation is kept for a backward. With :func:`store_frozen_backbone`
        the floating inputs are cast to the backbone's storage dtype and the
        features back to float32.
        """
        fn = getattr(self.backbone, "forward_features", None)
        run = fn if callable(fn) else (lambda inputs: call_module(self.backbone, inputs))
        storage = self.frozen_storage_dtype
        if storage is not None:
            x = _cast_floating(x, storage)
        features: torch.Tensor
        if _can_skip_autograd(self.backbone, x):
            with torch.no_grad():
                features = run(x)
        else:
            features = run(x)
        if storage is not None:
            features = _cast_floating(features, torch.float32)
        if self.neck is not None:
            features = self.neck(features)
        return features

    def forward(self, x: Any) -> Any:
        """Run backbone, neck and head."""
        return self.head(self.forward_features(x))

    def layer_groups(self) -> list[Selector]:
        """Default layer groups: the backbone's own groups, then ``neck``, then ``head``.

        Returns:
            A list of selectors (each a list of qualified module names or a name),
            from input to output, as :func:`torchfreeze.layer_groups` expects.
        """
        groups: list[Selector] = [
            [f"backbone.{n}" if n else "backbone" for n in group] for group in layer_groups(self.backbone)
        ]
        if self.neck is not None:
            groups.append(["neck"])
        groups.append(["head"])
        return groups


def _tree(x: Any) -> Any:
    """``x`` with a mapping that is not a dict (a tokenizer's ``BatchEncoding``) as a dict, so pytree walks it."""
    return dict(x) if isinstance(x, Mapping) and not isinstance(x, dict) else x


def _can_skip_autograd(backbone: nn.Module, x: Any) -> bool:
    """True when nothing in or before the backbone needs a gradient, so ``no_grad`` changes nothing."""
    if not torch.is_grad_enabled() or getattr(backbone, "manages_autograd", False):
        return False  # already off, or the backbone handles it itself (a FeatureCache)
    if any(t.requires_grad for t in tensor_leaves(_tree(x))):
        return False
    return not any(p.requires_grad for p in backbone.parameters())


def _cast_floating(x: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor of a nested input cast to ``dtype``; other leaves as they are."""
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, _tree(x))


def store_frozen_backbone(model: Composite, dtype: torch.dtype | None) -> Composite:
    """Store a fully frozen backbone's weights and buffers in ``dtype`` (opt-in, e.g. bf16).

    Halves the frozen weights' memory with ``torch.bfloat16``; the backbone has
    no gradient and no optimizer state to store anyway. Floating inputs are cast
    to ``dtype`` on the way in and the features back to float32 on the way out,
    so the neck and head keep training in float32. ``dtype=None`` is the
    inverse: the backbone goes back to float32 (the values keep the precision
    they were rounded to). Unfreezing any part of the backbone later does that
    by itself before the part becomes trainable (``unfreeze``, ``freeze_to``,
    ``GradualUnfreezing``), so nothing trains in fp16/bf16 and
    ``GradScaler.unscale_`` never sees fp16 gradients; parameter identity is
    kept, so ``add_unfrozen`` hands the optimizer the float32 parameters.

    Args:
        model: a :class:`Composite` whose backbone has no parameter that requires grad.
        dtype: a floating dtype (``torch.bfloat16``, ``torch.float16``), or ``None`` to undo.

    Returns:
        The model, changed in place.

    Raises:
        ArgumentTypeError: ``model`` is not a Composite, ``dtype`` not a ``torch.dtype``.
        ArgumentError: ``dtype`` is not floating, or a backbone parameter still
            requires grad (nothing changes then).

    >>> import torch
    >>> from torchfreeze import freeze
    >>> m = freeze(Composite(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), "backbone")
    >>> _ = store_frozen_backbone(m, torch.bfloat16)
    >>> m.backbone.weight.dtype, m(torch.zeros(3, 4)).dtype
    (torch.bfloat16, torch.float32)
    """
    require_module(model, "store_frozen_backbone")
    if not isinstance(model, Composite):
        raise ArgumentTypeError(
            f"store_frozen_backbone(model={type(model).__name__}): expected a Composite (it casts the "
            "backbone part). Fix: compose it first, Composite(backbone, head)."
        )
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(
            f"store_frozen_backbone(dtype={short_repr(dtype)}): expected a floating torch.dtype or None, got "
            f"{type(dtype).__name__}. Fix: pass e.g. torch.bfloat16 (not a string), or None to undo."
        )
    if dtype is not None and not dtype.is_floating_point:
        raise ArgumentError(
            f"store_frozen_backbone(dtype={dtype!r}): expected a floating torch.dtype such as torch.bfloat16. "
            "Fix: pass torch.bfloat16 or torch.float16, or None to undo."
        )
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    if dtype is not None and trainable:
        raise ArgumentError(
            f"store_frozen_backbone(model=...): backbone parameter {'backbone.' + trainable[0]!r} still requires grad; "
            "a low-precision copy of a trainable weight would lose its updates. Fix: "
            "freeze(model, 'backbone') first."
        )
    model.backbone.to(torch.float32 if dtype is None else dtype)
    if dtype is None:
        model.backbone.__dict__.pop(STORAGE_ATTR, None)
    else:
        model.backbone.__dict__[STORAGE_ATTR] = dtype  # read by unfreeze (nn layer) to restore float32
    return model
