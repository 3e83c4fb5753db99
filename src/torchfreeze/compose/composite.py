"""Composition: a backbone, an optional neck and a head in one ``nn.Module``.

:class:`Composite` names its parts ``backbone``, ``neck`` and ``head``, so every
selector (``"backbone"``, ``"backbone.**.bias"``, ``"head"``) and
:func:`~torchfreeze.layer_groups` work on it without special cases. Any backbone
works with any head: a backbone is anything with ``forward_features(x)`` and
``feature_dim`` (the small duck-typed :class:`Backbone` protocol), and two
adapters turn existing models into backbones without editing them:

* :class:`ModuleBackbone` — any ``nn.Module``; its features are the module's
  output, or the output of one of its named submodules captured with a forward
  hook (the rest of the forward pass is skipped).
* :class:`HFEncoder` — a Hugging Face ``transformers`` encoder; pooled
  (mean over real tokens, or the first token) or per-token features, with the
  attention mask applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from torchfreeze.errors import ArgumentError

__all__ = ["Backbone", "Composite", "ModuleBackbone", "HFEncoder", "store_frozen_backbone"]

Pool = Literal["flatten", "avg", "max"]


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


def _call(module: nn.Module, x: Any) -> Any:
    """Call a module with ``x``; a mapping (tokenizer output) is passed as keywords."""
    if isinstance(x, Mapping):
        return module(**x)
    return module(x)


class Composite(nn.Module):
    """``head(neck(backbone.forward_features(x)))`` with parts named for selectors.

    Args:
        backbone: a :class:`Backbone` (``forward_features`` + ``feature_dim``) or
            any ``nn.Module`` (then its plain output are the features).
        head: the task head, any ``nn.Module``.
        neck: an optional module between backbone and head.

    Raises:
        ArgumentError: a part is not an ``nn.Module``.

    >>> import torch
    >>> from torch import nn
    >>> m = Composite(ModuleBackbone(nn.Linear(4, 8), feature_dim=8), nn.Linear(8, 2))
    >>> m(torch.zeros(3, 4)).shape
    torch.Size([3, 2])
    >>> [n for n, _ in m.named_children()]
    ['backbone', 'head']
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, neck: nn.Module | None = None) -> None:
        super().__init__()
        for arg, value in (("backbone", backbone), ("head", head)):
            if not isinstance(value, nn.Module):
                raise ArgumentError(
                    f"{arg}={type(value).__name__}: expected an nn.Module; wrap a plain callable "
                    f"in a module first (for example ModuleBackbone(...) for a backbone)."
                )
        if neck is not None and not isinstance(neck, nn.Module):
            raise ArgumentError(f"neck={type(neck).__name__}: expected an nn.Module or None.")
        self.backbone = backbone
        if neck is not None:
            self.neck = neck
        else:
            self.neck = None
        self.head = head
        #: set by :func:`store_frozen_backbone`: the dtype the frozen backbone is stored in
        self.frozen_storage_dtype: torch.dtype | None = None

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
        run = fn if callable(fn) else (lambda inputs: _call(self.backbone, inputs))
        storage = self.frozen_storage_dtype
        if storage is not None:
            x = _cast_floating(x, storage)
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

    def layer_groups(self) -> list[Any]:
        """Default layer groups: the backbone's own groups, then ``neck``, then ``head``.

        Returns:
            A list of selectors (each a list of qualified module names or a name),
            from input to output, as :func:`torchfreeze.layer_groups` expects.
        """
        from torchfreeze.nn.freezing import layer_groups as _core_layer_groups

        groups: list[Any] = []
        for group in _core_layer_groups(self.backbone):
            names = [group] if isinstance(group, str) else list(group)
            groups.append([f"backbone.{n}" if n else "backbone" for n in names])
        if self.neck is not None:
            groups.append(["neck"])
        groups.append(["head"])
        return groups


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _can_skip_autograd(backbone: nn.Module, x: Any) -> bool:
    """True when nothing in or before the backbone needs a gradient, so ``no_grad`` changes nothing."""
    if not torch.is_grad_enabled() or getattr(backbone, "manages_autograd", False):
        return False  # already off, or the backbone handles it itself (a FeatureCache)
    return not any(t.requires_grad for t in _tensors(x)) and not any(p.requires_grad for p in backbone.parameters())


def _cast_floating(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: _cast_floating(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_floating(v, dtype) for v in x)
    return x


def store_frozen_backbone(model: Composite, dtype: torch.dtype | None) -> Composite:
    """Store a fully frozen backbone's weights and buffers in ``dtype`` (opt-in, e.g. bf16).

    Halves the frozen weights' memory with ``torch.bfloat16``; the backbone has
    no gradient and no optimizer state to store anyway. Floating inputs are cast
    to ``dtype`` on the way in and the features back to float32 on the way out,
    so the neck and head keep training in float32. ``dtype=None`` is the
    inverse: the backbone goes back to float32 (the values keep the precision
    they were rounded to). Do this before unfreezing a backbone stored in bf16.

    Args:
        model: a :class:`Composite` whose backbone has no parameter that requires grad.
        dtype: a floating dtype (``torch.bfloat16``, ``torch.float16``), or ``None`` to undo.

    Returns:
        The model, changed in place.

    Raises:
        ArgumentError: ``model`` is not a Composite, ``dtype`` is not floating, or a
            backbone parameter still requires grad (nothing changes then).

    >>> import torch
    >>> from torchfreeze import freeze
    >>> m = freeze(Composite(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), "backbone")
    >>> _ = store_frozen_backbone(m, torch.bfloat16)
    >>> m.backbone.weight.dtype, m(torch.zeros(3, 4)).dtype
    (torch.bfloat16, torch.float32)
    """
    if not isinstance(model, Composite):
        raise ArgumentError(
            f"model={type(model).__name__}: expected a Composite (store_frozen_backbone casts its "
            "backbone part). Fix: compose it first, Composite(backbone, head)."
        )
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ArgumentError(
            f"dtype={dtype!r}: expected a floating torch.dtype such as torch.bfloat16, or None to undo."
        )
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    if dtype is not None and trainable:
        raise ArgumentError(
            f"store_frozen_backbone: backbone parameter {'backbone.' + trainable[0]!r} still requires grad; "
            "a low-precision copy of a trainable weight would lose its updates. Fix: "
            "freeze(model, 'backbone') first."
        )
    model.backbone.to(torch.float32 if dtype is None else dtype)
    model.frozen_storage_dtype = dtype
    return model


class _StopForward(Exception):
    """Raised by the capture hook to skip the rest of the forward pass."""


def _pool(features: torch.Tensor, pool: Pool | None) -> torch.Tensor:
    if pool is None:
        return features
    if pool == "flatten":
        return features.flatten(1)
    if features.dim() <= 2:
        return features
    dims = tuple(range(2, features.dim()))
    if pool == "avg":
        return features.mean(dim=dims)
    return features.amax(dim=dims)


class ModuleBackbone(nn.Module):
    """Adapt any ``nn.Module`` into a backbone, optionally tapping a named submodule.

    With ``output="layer3"`` the features are the output of ``module.layer3``,
    captured with a forward hook; the forward pass stops there (later modules
    are not run). The wrapped module is stored at ``.module`` and not edited.

    Args:
        module: the model to adapt.
        output: qualified name of the submodule whose output are the features;
            ``None`` uses the module's own output.
        feature_dim: size of the features' last dimension (after ``pool``). When
            ``None``, it is measured once with ``example_input``.
        pool: reduce feature maps to vectors: ``"avg"`` / ``"max"`` over every
            dimension after the second, ``"flatten"``, or ``None`` (as is).
        example_input: an input used once (no grad, modes restored) to measure
            ``feature_dim``.
        stop: stop the forward pass once ``output`` has run (default True).

    Raises:
        ArgumentError: ``output`` names no submodule, ``pool`` is unknown, or
            ``feature_dim`` can be neither read nor measured.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    >>> bb = ModuleBackbone(net, output="1", example_input=torch.zeros(1, 4))
    >>> bb.feature_dim, bb.forward_features(torch.zeros(2, 4)).shape
    (6, torch.Size([2, 6]))
    """

    def __init__(
        self,
        module: nn.Module,
        output: str | None = None,
        *,
        feature_dim: int | None = None,
        pool: Pool | None = None,
        example_input: Any = None,
        stop: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ArgumentError(f"module={type(module).__name__}: expected an nn.Module to adapt.")
        if pool not in (None, "flatten", "avg", "max"):
            raise ArgumentError(f"pool={pool!r}: expected one of None, 'flatten', 'avg', 'max'.")
        if output is not None:
            names = [n for n, _ in module.named_modules() if n]
            if output not in names:
                import difflib

                close = difflib.get_close_matches(output, names, n=5) or names[:5]
                raise ArgumentError(
                    f"output={output!r}: no submodule of {type(module).__name__} has that name; "
                    f"expected a qualified module name, closest: {close}."
                )
        self.module = module
        self.output = output
        self.pool = pool
        self.stop = bool(stop)
        if feature_dim is None and example_input is not None:
            feature_dim = self._measure(example_input)
        if feature_dim is not None and (not isinstance(feature_dim, int) or feature_dim <= 0):
            raise ArgumentError(f"feature_dim={feature_dim!r}: expected a positive int.")
        self._feature_dim = feature_dim

    @property
    def feature_dim(self) -> int:
        """Size of the features' last dimension."""
        if self._feature_dim is None:
            raise ArgumentError(
                "feature_dim is unknown for this ModuleBackbone: pass feature_dim=... or "
                "example_input=... when building it."
            )
        return self._feature_dim

    def _measure(self, example_input: Any) -> int:
        flags = [(m, m.training) for m in self.modules()]
        try:
            self.eval()
            with torch.no_grad():
                out = self.forward_features(example_input)
        finally:
            for m, flag in flags:
                m.training = flag
        return int(out.shape[-1])

    def forward_features(self, x: Any) -> torch.Tensor:
        """The (pooled) output of ``output``, or of the whole module."""
        if self.output is None:
            return _pool(_call(self.module, x), self.pool)
        captured: list[Any] = []
        stop = self.stop

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(out)
            if stop:
                raise _StopForward

        handle = self.module.get_submodule(self.output).register_forward_hook(hook)
        try:
            _call(self.module, x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ArgumentError(
                f"output={self.output!r}: that submodule did not run during forward; choose a "
                f"submodule that the module's forward calls."
            )
        out = captured[0]
        if isinstance(out, (tuple, list)):
            out = out[0]
        return _pool(out, self.pool)

    def forward(self, x: Any) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def layer_groups(self) -> list[Any]:
        """The wrapped module's default layer groups (names under ``module.``)."""
        from torchfreeze.nn.freezing import layer_groups as _core_layer_groups

        return [
            [f"module.{n}" if n else "module" for n in ([g] if isinstance(g, str) else g)]
            for g in _core_layer_groups(self.module)
        ]


class HFEncoder(nn.Module):
    """Adapt a Hugging Face ``transformers`` encoder (BERT-like) into a backbone.

    Inputs are tokenizer outputs: a mapping with ``input_ids`` and optionally
    ``attention_mask`` / ``token_type_ids`` (a ``BatchEncoding`` works), or a
    tensor of input ids (then every token is real). The attention mask is passed
    to the model and used by the pooling; padded positions never leak into the
    features.

    Args:
        model: the encoder (e.g. ``transformers.AutoModel.from_pretrained(...)``),
            stored at ``.model``.
        pooling: ``"mean"`` (mean over real tokens, as sentence-transformers),
            ``"cls"`` (first token), or ``"none"`` for per-token features of
            shape ``(batch, tokens, hidden)`` with padded positions set to zero.
        normalize: L2-normalise pooled features (sentence-embedding convention).
        tokenizer: optional tokenizer kept for :meth:`tokenize` (not a module).

    Raises:
        ArgumentError: unknown ``pooling`` or a model without ``config.hidden_size``.

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
    ...                             num_attention_heads=2, intermediate_size=8), add_pooling_layer=False)
    >>> enc = HFEncoder(bert)
    >>> batch = {"input_ids": torch.tensor([[2, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    >>> enc.feature_dim, enc.forward_features(batch).shape
    (8, torch.Size([1, 8]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pooling: Literal["mean", "cls", "none"] = "mean",
        normalize: bool = False,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls", "none"):
            raise ArgumentError(f"pooling={pooling!r}: expected 'mean', 'cls' or 'none'.")
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(model, nn.Module) or hidden is None:
            raise ArgumentError(
                f"model={type(model).__name__}: expected a transformers encoder with "
                f"config.hidden_size (for example AutoModel.from_pretrained(...))."
            )
        self.model = model
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.tokenizer = tokenizer
        self.feature_dim = int(hidden)

    def tokenize(self, texts: Sequence[str], *, max_length: int = 128) -> Mapping[str, torch.Tensor]:
        """Tokenize ``texts`` with the stored tokenizer (padding, truncation, tensors)."""
        if self.tokenizer is None:
            raise ArgumentError("tokenize: this HFEncoder was built without tokenizer=...; pass one.")
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def forward_features(self, x: Any) -> torch.Tensor:
        """Pooled (``(batch, hidden)``) or per-token (``(batch, tokens, hidden)``) features."""
        if isinstance(x, Mapping):
            inputs = {k: v for k, v in x.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        elif isinstance(x, torch.Tensor):
            inputs = {"input_ids": x}
        else:
            raise ArgumentError(
                f"x={type(x).__name__}: expected tokenizer output (a mapping with 'input_ids') "
                f"or a tensor of input ids."
            )
        if "input_ids" not in inputs:
            raise ArgumentError(f"x: expected an 'input_ids' entry, got keys {sorted(x)}.")
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
            inputs["attention_mask"] = mask
        out = self.model(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        if self.pooling == "none":
            return hidden * weights
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled

    def forward(self, x: Any) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def layer_groups(self) -> list[Any]:
        """Embeddings, then each encoder layer, then a pooler if there is one."""
        groups: list[Any] = []
        names = dict(self.model.named_modules())
        for emb in ("embeddings",):
            if emb in names:
                groups.append([f"model.{emb}"])
        layers = None
        for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
            if path in names and isinstance(names[path], nn.ModuleList):
                layers = path
                break
        if layers is not None:
            groups.extend([[f"model.{layers}.{i}"] for i in range(len(names[layers]))])
        if "pooler" in names and names["pooler"] is not None:
            groups.append(["model.pooler"])
        if not groups:
            groups.append(["model"])
        return groups
