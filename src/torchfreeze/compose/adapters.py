"""Backbone adapters: turn existing models into backbones without editing them.

* :class:`ModuleBackbone` — any ``nn.Module``; its features are the module's
  output, or the output of one of its named submodules captured with a forward
  hook (the rest of the forward pass is skipped).
* :class:`HFEncoder` — a Hugging Face ``transformers`` encoder; pooled
  (mean over real tokens, or the first token) or per-token features, with the
  attention mask applied. ``transformers`` itself is never imported here: the
  encoder object is passed in.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchfreeze._core.checks import require_bool, require_choice, require_module, short_repr
from torchfreeze._core.select import Selector
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.nn.groups import layer_groups

__all__ = ["ModuleBackbone", "HFEncoder", "Pool", "call_module"]

Pool = Literal["flatten", "avg", "max"]
Pooling = Literal["mean", "cls", "none"]


def call_module(module: nn.Module, x: Any) -> Any:
    """Call a module with ``x``; a mapping (tokenizer output) is passed as keywords."""
    if isinstance(x, Mapping):
        return module(**x)
    return module(x)


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


def _prefixed(prefix: str, groups: list[list[str]]) -> list[Selector]:
    """Layer groups of a wrapped module, renamed under ``prefix`` (its attribute name)."""
    return [[f"{prefix}.{n}" if n else prefix for n in group] for group in groups]


def _require_feature_dim(feature_dim: Any) -> int:
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
        raise ArgumentTypeError(
            f"ModuleBackbone(feature_dim={short_repr(feature_dim)}): expected a positive int, got "
            f"{type(feature_dim).__name__}. Fix: pass the features' last dimension, e.g. feature_dim=512."
        )
    if feature_dim <= 0:
        raise ArgumentError(
            f"ModuleBackbone(feature_dim={feature_dim}): expected a positive int. "
            "Fix: pass the features' last dimension, e.g. feature_dim=512, or example_input=... to measure it."
        )
    return feature_dim


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
        ArgumentTypeError: ``module`` is not an ``nn.Module``, ``output`` not a str,
            ``feature_dim`` not an int, ``stop`` not a bool.
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
        verb = "ModuleBackbone"
        require_module(module, verb, "module")
        require_choice(pool, (None, "flatten", "avg", "max"), verb, "pool")
        require_bool(stop, verb, "stop")
        if output is not None:
            if not isinstance(output, str):
                raise ArgumentTypeError(
                    f"{verb}(output={short_repr(output)}): expected a qualified submodule name (str) or None, "
                    f"got {type(output).__name__}. Fix: pass the name as named_modules() gives it, e.g. output='layer3'."
                )
            names = [n for n, _ in module.named_modules() if n]
            if output not in names:
                close = difflib.get_close_matches(output, names, n=5) or names[:5]
                raise ArgumentError(
                    f"{verb}(output={short_repr(output)}): no submodule of {type(module).__name__} has that name; "
                    f"expected a qualified module name, closest: {short_repr(close)}. Fix: pass one of the names "
                    "module.named_modules() gives, or output=None for the module's own output."
                )
        if feature_dim is not None:
            _require_feature_dim(feature_dim)
        self.module = module
        self.output = output
        self.pool = pool
        self.stop = stop
        if feature_dim is None and example_input is not None:
            feature_dim = _require_feature_dim(self._measure(example_input))
        self._feature_dim = feature_dim

    @property
    def feature_dim(self) -> int:
        """Size of the features' last dimension."""
        if self._feature_dim is None:
            raise ArgumentError(
                "ModuleBackbone.feature_dim is unknown: it was built without feature_dim or example_input. "
                "Fix: pass feature_dim=... or example_input=... when building it."
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
            return _pool(call_module(self.module, x), self.pool)
        captured: list[Any] = []
        stop = self.stop

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(out)
            if stop:
                raise _StopForward

        handle = self.module.get_submodule(self.output).register_forward_hook(hook)
        try:
            call_module(self.module, x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ArgumentError(
                f"ModuleBackbone(output={short_repr(self.output)}): that submodule did not run during forward. "
                "Fix: choose a submodule that the module's forward calls."
            )
        out = captured[0]
        if isinstance(out, (tuple, list)):
            out = out[0]
        return _pool(out, self.pool)

    def forward(self, x: Any) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def layer_groups(self) -> list[Selector]:
        """The wrapped module's default layer groups (names under ``module.``)."""
        return _prefixed("module", layer_groups(self.module))


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
        ArgumentTypeError: ``model`` is not an ``nn.Module``, ``normalize`` not a bool,
            ``tokenizer`` not callable.
        ArgumentError: unknown ``pooling``, or a module without ``config.hidden_size``
            (not a ``transformers`` model).

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
        pooling: Pooling = "mean",
        normalize: bool = False,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        require_module(model, "HFEncoder")
        require_choice(pooling, ("mean", "cls", "none"), "HFEncoder", "pooling")
        require_bool(normalize, "HFEncoder", "normalize")
        if tokenizer is not None and not callable(tokenizer):
            raise ArgumentTypeError(
                f"HFEncoder(tokenizer={short_repr(tokenizer)}): expected a tokenizer (a callable such as "
                f"AutoTokenizer.from_pretrained(...)) or None, got {type(tokenizer).__name__}. "
                "Fix: pass the model's tokenizer, or leave tokenizer out."
            )
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:  # a module, but not one of transformers: a wrong value, not a wrong type
            raise ArgumentError(
                f"HFEncoder(model={type(model).__name__}(...)): expected a transformers encoder with "
                "config.hidden_size. Fix: pass e.g. AutoModel.from_pretrained(...), or wrap other "
                "modules with ModuleBackbone."
            )
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = tokenizer
        self.feature_dim = int(hidden)

    def tokenize(self, texts: Sequence[str], *, max_length: int = 128) -> Mapping[str, torch.Tensor]:
        """Tokenize ``texts`` with the stored tokenizer (padding, truncation, tensors)."""
        if self.tokenizer is None:
            raise ArgumentError(
                "HFEncoder.tokenize: this HFEncoder was built without a tokenizer. "
                "Fix: build it with HFEncoder(model, tokenizer=AutoTokenizer.from_pretrained(...))."
            )
        batch: Mapping[str, torch.Tensor] = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return batch

    def forward_features(self, x: Any) -> torch.Tensor:
        """Pooled (``(batch, hidden)``) or per-token (``(batch, tokens, hidden)``) features."""
        if isinstance(x, Mapping):
            inputs = {k: v for k, v in x.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        elif isinstance(x, torch.Tensor):
            inputs = {"input_ids": x}
        else:
            raise ArgumentTypeError(
                f"HFEncoder.forward_features(x={short_repr(x)}): expected tokenizer output (a mapping with "
                f"'input_ids') or a tensor of input ids, got {type(x).__name__}. Fix: pass tokenizer(texts, "
                "return_tensors='pt') or HFEncoder.tokenize(texts)."
            )
        if "input_ids" not in inputs:
            raise ArgumentError(
                f"HFEncoder.forward_features(x=...): expected an 'input_ids' entry, got keys "
                f"{short_repr(sorted(map(str, x)))}. Fix: pass the tokenizer's output as it is."
            )
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
            inputs["attention_mask"] = mask
        out = self.model(**inputs)
        hidden: torch.Tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        if self.pooling == "none":
            return hidden * weights
        pooled = hidden[:, 0] if self.pooling == "cls" else (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled

    def forward(self, x: Any) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def layer_groups(self) -> list[Selector]:
        """The encoder's default layer groups (:func:`torchfreeze.layer_groups`: embeddings, one group
        per layer, then the pooler if there is one), named under ``model.``."""
        return _prefixed("model", layer_groups(self.model))
