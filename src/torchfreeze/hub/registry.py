"""Model registry: ``register_model``, ``get_model(name, *, weights=..., freeze=...)``, ``list_models``.

A registered model is a builder (keyword arguments -> ``nn.Module``), its named
pretrained :class:`~torchfreeze.Weights` (``"default"`` first), and its *freeze
plans*: what ``freeze=True`` means for it, plus optional named alternatives
(``freeze="all_but_last_block"``). The default plan of a model that declares
none is the one of a :class:`~torchfreeze.Composite`: backbone frozen and pinned
in eval mode, head trainable.

Building order: builder, then weights (verified, atomic), then the freeze plan.

The built-in models are a table of names -> ``"module:function"``
(:data:`BUILTIN_MODELS`): the module under :mod:`torchfreeze.hub.builtin` is
imported, and its function registers the model, only when that name is looked
up. ``list_models`` reads the table and imports nothing; a user-registered model
never imports a built-in module.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from torchfreeze._core.checks import bind_problem, require_bool, short_repr
from torchfreeze._core.select import Selector
from torchfreeze.compose.composite import Composite, store_frozen_backbone
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.hub.weights import Weights
from torchfreeze.nn.freezing import freeze as freeze_selection

__all__ = [
    "FreezePlan",
    "NothingPretrainedWarning",
    "ModelSpec",
    "register_model",
    "get_model",
    "list_models",
    "model_spec",
    "BUILTIN_MODELS",
]


class NothingPretrainedWarning(UserWarning):
    """``freeze=...`` was asked for a model built without pretrained weights.

    >>> issubclass(NothingPretrainedWarning, UserWarning)
    True
    """


@dataclass(frozen=True, kw_only=True)
class FreezePlan:
    """What freezing means for a model: which parts, and which mode they keep.

    Args:
        freeze: selectors of what to freeze (default: ``("backbone",)``).
        mode: mode pinned on the frozen modules (``"eval"`` by default; ``None``
            leaves behaviour alone).
        train_bn: keep normalisation layers in the selection trainable.
        description: one line shown by ``list_models`` / docs.

    >>> import torch
    >>> from torchfreeze import Composite, is_frozen
    >>> m = Composite(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> _ = FreezePlan().apply(m)
    >>> is_frozen(m, "backbone"), is_frozen(m, "head")
    (True, False)
    """

    freeze: tuple[Selector, ...] = ("backbone",)
    mode: Literal["eval", "train"] | None = "eval"
    train_bn: bool = False
    description: str = "backbone frozen and pinned in eval mode, head trainable"

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze ``model`` in place according to the plan and return it.

        Args:
            model: the model to freeze (a :class:`Composite` for the default plan).

        Returns:
            ``model``.

        Raises:
            SelectorError: a selector of the plan matches nothing in ``model``.

        >>> import torch
        >>> m = FreezePlan(freeze=("0",), mode=None).apply(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> m[0].weight.requires_grad
        False
        """
        return freeze_selection(model, *self.freeze, mode=self.mode, train_bn=self.train_bn)


Plan = FreezePlan | Callable[[nn.Module], Any]
DEFAULT_PLAN = FreezePlan()


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: builder, weights and freeze plans (see :func:`register_model`)."""

    name: str
    builder: Callable[..., nn.Module]
    weights: Mapping[str, Weights] = field(default_factory=dict)
    plans: Mapping[str, Plan] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}

#: Built-in model name -> ``"module:function"`` that registers it, imported on the first look-up of the name.
BUILTIN_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "digits-cnn": "torchfreeze.hub.builtin.digits:register",
        "minilm-classifier": "torchfreeze.hub.builtin.minilm:register",
    }
)


def _lookup(name: str) -> ModelSpec | None:
    """The registration of ``name``; a built-in one is imported and registered now (once)."""
    spec = _REGISTRY.get(name)
    if spec is None and name in BUILTIN_MODELS:
        module, _, function = BUILTIN_MODELS[name].partition(":")
        getattr(importlib.import_module(module), function)()
        spec = _REGISTRY.get(name)
    return spec


def register_model(
    name: str,
    builder: Callable[..., nn.Module] | None = None,
    *,
    weights: Mapping[str, Weights] | Sequence[Weights] | Weights | None = None,
    plans: Mapping[str, Plan] | None = None,
    description: str = "",
    overwrite: bool = False,
) -> Any:
    """Register a model builder under ``name`` (also usable as a decorator).

    Args:
        name: the registry key, e.g. ``"digits-cnn"``.
        builder: a callable ``(**kwargs) -> nn.Module``; omit to use as a decorator.
        weights: pretrained weights by name; the first (or the one named
            ``"default"``) is the default. A single :class:`Weights` or a list is
            keyed by each ``Weights.name``.
        plans: named freeze plans (a :class:`FreezePlan` or a callable taking the
            model). ``"default"`` is what ``freeze=True`` applies; when absent,
            the Composite default (backbone frozen + pinned eval) is used.
        description: one line describing the model.
        overwrite: allow replacing an existing registration (a built-in name included:
            the built-in module is then never imported).

    Returns:
        ``builder`` (so it works as a decorator).

    Raises:
        ArgumentError: empty or duplicate name, builder not callable, bad plans.

    >>> import torch
    >>> from torchfreeze import Composite
    >>> @register_model("doc-tiny", overwrite=True)
    ... def tiny(num_classes: int = 2):
    ...     return Composite(torch.nn.Linear(4, 8), torch.nn.Linear(8, num_classes))
    >>> "doc-tiny" in list_models()
    True
    """
    if builder is None:

        def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            register_model(name, fn, weights=weights, plans=plans, description=description, overwrite=overwrite)
            return fn

        return decorator
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"register_model(name={short_repr(name)}): expected a str, got {type(name).__name__}. "
            "Fix: pass the model's name, e.g. 'my-classifier'."
        )
    if not name.strip():
        raise ArgumentError(f"register_model(name={name!r}): expected a non-empty string. Fix: pass a name.")
    if not callable(builder):
        raise ArgumentTypeError(
            f"register_model(builder={short_repr(builder)}): expected a callable returning an nn.Module, got "
            f"{type(builder).__name__}. Fix: pass the function (or class) that builds the model."
        )
    require_bool(overwrite, "register_model", "overwrite")
    if (name in _REGISTRY or name in BUILTIN_MODELS) and not overwrite:
        raise ArgumentError(
            f"register_model(name={short_repr(name)}): that name is already registered. "
            "Fix: choose another name, or pass overwrite=True to replace it."
        )
    if weights is None:
        table: dict[str, Weights] = {}
    elif isinstance(weights, Weights):
        table = {"default": weights}
    elif isinstance(weights, Mapping):
        table = dict(weights)
    elif isinstance(weights, (list, tuple)):
        table = {getattr(w, "name", f"#{i}"): w for i, w in enumerate(weights)}
    else:
        raise ArgumentTypeError(
            f"register_model(weights={short_repr(weights)}): expected a Weights, a list of Weights or a dict "
            "name -> Weights. Fix: for a file, wrap it: Weights(name, path, sha256)."
        )
    for key, w in table.items():
        if not isinstance(w, Weights):
            raise ArgumentTypeError(
                f"register_model(weights[{key!r}]={short_repr(w)}): expected a Weights, got {type(w).__name__}. "
                "Fix: wrap the file: Weights(name, path, sha256)."
            )
    if table and "default" not in table:
        table = {"default": next(iter(table.values())), **table}
    plan_table = dict(plans or {})
    for key, plan in plan_table.items():
        if not isinstance(key, str) or not (isinstance(plan, FreezePlan) or callable(plan)):
            raise ArgumentTypeError(
                f"register_model(plans[{key!r}]={short_repr(plan)}): expected a FreezePlan or a callable taking "
                "the model. Fix: plans={'default': FreezePlan(freeze=('backbone',))}."
            )
    _REGISTRY[name] = ModelSpec(name, builder, table, plan_table, description)
    return builder


def list_models() -> list[str]:
    """Names of every registered model, sorted.

    Returns:
        The registry keys (built-in models included, without importing them), sorted.

    >>> "digits-cnn" in list_models()
    True
    """
    return sorted({*_REGISTRY, *BUILTIN_MODELS})


def model_spec(name: str) -> ModelSpec:
    """The registration of ``name`` (builder, weights, plans).

    Args:
        name: a name from :func:`list_models`.

    Returns:
        Its :class:`ModelSpec`.

    Raises:
        ArgumentError: no model of that name, with the closest names.

    >>> sorted(model_spec("digits-cnn").plans)
    ['all_but_last_block', 'default', 'none']
    """
    return _spec(name, "model_spec")


def _spec(name: Any, verb: str) -> ModelSpec:
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"{verb}(name={short_repr(name)}): expected a model name (str), got {type(name).__name__}. "
            f"Fix: pass one of list_models(), e.g. {list_models()[0]!r}."
        )
    spec = _lookup(name)
    if spec is not None:
        return spec
    known = list_models()
    close = difflib.get_close_matches(name.strip().lower(), known, n=3)
    raise ArgumentError(
        f"{verb}(name={short_repr(name)}): no registered model of that name; known models: {short_repr(known, 200)}. "
        + (
            f"Fix: pass {close[0]!r} (the closest name)."
            if close
            else "Fix: pass one of them, or register_model(...) yours."
        )
    )


def known_plans(spec: ModelSpec) -> list[str]:
    """Plan names accepted by ``get_model(spec.name, freeze=...)`` (``True`` = ``"default"``)."""
    return sorted({"default", *spec.plans})


def get_model(
    name: str,
    *,
    weights: str | Weights | None = "default",
    freeze: bool | str = False,
    frozen_dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, load its pretrained weights and apply a freeze plan.

    Args:
        name: a name from :func:`list_models`.
        weights: ``"default"``, the name of another registered weights, a
            :class:`Weights`, or ``None`` for random initialisation.
        freeze: ``False`` (nothing frozen), ``True`` (the model's default plan,
            for a Composite: backbone frozen and pinned eval, head trainable), or
            the name of one of the model's plans.
        frozen_dtype: opt-in storage dtype for a frozen Composite backbone (for example
            ``torch.bfloat16``: half the memory, no gradient, no optimizer state); needs a
            freeze plan that freezes the whole backbone. See :func:`store_frozen_backbone`.
        **kwargs: passed to the builder (for example ``num_classes=5``).

    Returns:
        The model, in training mode except what the plan pins.

    Raises:
        ArgumentError: unknown model, weights or plan name (the message lists the
            known ones).
        WeightsError: the weights file is missing, corrupted or does not fit.

    Warns:
        NothingPretrainedWarning: ``freeze`` asked with ``weights=None``.

    >>> import torch, warnings
    >>> from torchfreeze import Composite, trainable_parameters
    >>> _ = register_model("doc-frozen", lambda: Composite(torch.nn.Linear(2, 2),
    ...                torch.nn.Linear(2, 1)), overwrite=True)
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     m = get_model("doc-frozen", weights=None, freeze=True)
    >>> [n for n, _ in trainable_parameters(m)]
    ['head.weight', 'head.bias']
    """
    spec = _spec(name, "get_model")
    plan = _choose_plan(spec, freeze)
    if frozen_dtype is not None and plan is None:
        raise ArgumentError(
            f"get_model(frozen_dtype={frozen_dtype!r}) with freeze={freeze!r}: only a frozen backbone can be stored "
            "in another dtype. Fix: pass freeze=True (or a plan name), or drop frozen_dtype."
        )
    chosen = _choose_weights(spec, weights)
    problem = bind_problem(spec.builder, **kwargs)
    if problem is not None:  # checked on the builder's signature: an unknown keyword is never passed on
        shown = ", ".join(f"{k}={short_repr(v, 30)}" for k, v in list(kwargs.items())[:3])
        raise ArgumentTypeError(
            f"get_model({name!r}, {shown}): the builder of {name!r} cannot take these arguments ({problem}). "
            f"Fix: pass only what it takes: {short_repr(str(inspect.signature(spec.builder)), 120)[1:-1]}."
        )
    model = spec.builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ArgumentError(
            f"get_model(name={name!r}): its builder returned {type(model).__name__}; expected an nn.Module. "
            "Fix: register a builder that returns the model."
        )
    if chosen is not None:
        chosen.load_into(model)
    if plan is DEFAULT_PLAN and not isinstance(model, Composite) and not _has_submodule(model, "backbone"):
        raise ArgumentError(
            f"get_model(freeze={freeze!r}): model {name!r} declares no 'default' freeze plan and has no "
            f"'backbone' part (it is a {type(model).__name__}, not a Composite). Fix: register it with "
            f"plans={{'default': FreezePlan(freeze=(...selectors...))}} or pass freeze=False."
        )
    if plan is not None:
        if chosen is None:
            why = "" if weights is None else f" ({name!r} has no registered pretrained weights)"
            warnings.warn(
                f"get_model({name!r}, weights={weights!r}, freeze={freeze!r}): nothing pretrained is "
                f"being frozen{why}; the frozen parts keep their random initialisation. Pass "
                f"weights='default' (or a Weights) to freeze pretrained features.",
                NothingPretrainedWarning,
                stacklevel=2,
            )
        if isinstance(plan, FreezePlan):
            plan.apply(model)
        else:
            plan(model)
    if frozen_dtype is not None:
        if not isinstance(model, Composite):
            raise ArgumentError(
                f"get_model(frozen_dtype={frozen_dtype!r}): model {name!r} is a {type(model).__name__}, not a Composite, "
                "so it has no backbone part to store in another dtype. Fix: drop frozen_dtype."
            )
        store_frozen_backbone(model, frozen_dtype)
    return model


def _has_submodule(model: nn.Module, name: str) -> bool:
    return isinstance(getattr(model, name, None), nn.Module)


def _choose_plan(spec: ModelSpec, freeze: bool | str) -> Plan | None:
    if freeze is False:
        return None
    if freeze is True:
        key = "default"
    elif isinstance(freeze, str):
        key = freeze
    else:
        raise ArgumentTypeError(
            f"get_model(freeze={short_repr(freeze)}): expected True, False or a plan name; known plans for "
            f"{spec.name!r}: {known_plans(spec)}. Fix: pass freeze=True for the default plan."
        )
    if key in spec.plans:
        return spec.plans[key]
    if key == "default":
        return DEFAULT_PLAN
    raise ArgumentError(
        f"get_model(freeze={short_repr(freeze)}): model {spec.name!r} has no such freeze plan; known plans: "
        f"{known_plans(spec)}. Fix: pass one of them, or freeze=True for 'default'."
    )


def _choose_weights(spec: ModelSpec, weights: str | Weights | None) -> Weights | None:
    if weights is None or isinstance(weights, Weights):
        return weights
    if isinstance(weights, str):
        if weights == "default" and not spec.weights:
            return None  # nothing pretrained registered: random initialisation
        if weights in spec.weights:
            return spec.weights[weights]
        known = sorted(spec.weights) or ["(none: use weights=None)"]
        raise ArgumentError(
            f"get_model(weights={short_repr(weights)}): model {spec.name!r} has no such pretrained weights; "
            f"known: {known}. Fix: pass one of them, a Weights object for your own file, or weights=None."
        )
    raise ArgumentTypeError(
        f"get_model(weights={short_repr(weights)}): expected 'default', a weights name, a Weights, or None. "
        "Fix: pass weights='default' or weights=None."
    )
