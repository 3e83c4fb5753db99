"""``check``'s findings about randomness and forced gradients in frozen parts: a mistake, or a choice?

Randomness in a frozen part is a **mistake** where that part works as a feature
extractor: nothing trainable comes before it, so its features could be fixed
(and cached) and dropout only makes them noisy. It is a **choice** where
trainable parts come before or inside the frozen ones (joint training through a
frozen block, adapters such as LoRA inside frozen layers): gradients flow
through the frozen part, and its dropout is the regulariser the recipe expects,
as the torchaudio discussion that motivated this library concluded
(pytorch/audio#1286). The test is static, over the model's parameter order:
the model is a feature extractor when no frozen parameter comes after a
trainable one (parameters a module holds next to child modules with parameters,
such as ``cls_token`` or Wav2Vec2's ``masked_spec_embed``, have no clear place
and are skipped).

Two findings hold in either case, because they defeat what the user asked for:

* ``stochastic-depth-over-frozen``: a parent that skips its layers at random
  (LayerDrop, see :func:`torchfreeze._core.behaviour.layer_skipping`) over
  frozen layers pinned to eval, or in a feature extractor: the pin on the layers
  does not stop the parent's coin;
* ``frozen-module-forces-grad``: a module whose parameters are all frozen but
  whose own switch (Hugging Face's ``_requires_grad``) makes its input require
  grad in train mode, so autograd runs through it for nothing.
"""

from __future__ import annotations

from torch import nn

from torchfreeze._core.behaviour import gradient_switch, layer_skipping, nondeterministic_modules
from torchfreeze._core.mode import get_pin

__all__ = ["is_feature_extractor", "randomness_findings", "Finding"]

#: ``(code, names, message, fix)``: what ``check`` turns into a ``Problem``
Finding = tuple[str, tuple[str, ...], str, str]


def _short(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def is_feature_extractor(model: nn.Module, frozen_ids: set[int]) -> bool:
    """True when no frozen parameter comes after a trainable one in model order (see the module docstring).

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> m[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
    Parameter...
    >>> is_feature_extractor(m, {id(m[0].weight)}), is_feature_extractor(m, {id(m[1].weight)})
    (True, False)
    """
    modules = dict(model.named_modules())
    trainable_seen = False
    for name, param in model.named_parameters():
        owner = modules.get(name.rpartition(".")[0])
        if owner is not None and any(next(c.parameters(), None) is not None for c in owner.children()):
            continue  # a loose parameter next to parameterised children: its place in the data flow is unknown
        if id(param) in frozen_ids:
            if trainable_seen:
                return False
        else:
            trainable_seen = True
    return True


def _all_frozen(module: nn.Module, frozen_ids: set[int]) -> bool:
    params = list(module.parameters())
    return bool(params) and all(id(p) in frozen_ids for p in params)


def _layer_drop(model: nn.Module, frozen_ids: set[int], feature_extractor: bool) -> list[Finding]:
    found: list[Finding] = []
    for name, module in model.named_modules():
        skipping = layer_skipping(module)
        pin = get_pin(module)
        if skipping is None or (pin is not None and pin.mode == "eval"):
            continue
        setting, rate, lists = skipping
        layers = [
            (f"{name}.{ln}.{i}" if name else f"{ln}.{i}", layer)
            for ln in lists
            for i, layer in enumerate(module.get_submodule(ln).children())
        ]
        frozen = [(n, m) for n, m in layers if _all_frozen(m, frozen_ids)]
        pinned = [n for n, m in frozen if (p := get_pin(m)) is not None and p.mode == "eval"]
        if not frozen or not (pinned or (feature_extractor and module.training)):
            continue
        where = name or "<model>"
        found.append(
            (
                "stochastic-depth-over-frozen",
                (name, *(n for n, _ in frozen)),
                f"{where!r} ({type(module).__name__}, {setting}={rate}) skips its layers at random in train mode, "
                f"frozen ones included ({_short([n for n, _ in frozen])})"
                + (", although they are pinned to eval" if pinned else "")
                + ": the frozen features are random, whatever the layers' own mode.",
                f"torchfreeze.freeze(model, {name + '.' + lists[0] if name else lists[0]!r}, mode='eval') pins "
                f"{where!r} to eval too once all its layers are frozen (or pin_mode(model, {name!r}, mode='eval'), "
                f"or set {setting} to 0).",
            )
        )
    return found


def _forced_gradients(model: nn.Module, frozen_ids: set[int]) -> list[Finding]:
    names = [
        name
        for name, module in model.named_modules()
        if gradient_switch(module) and module.training and _all_frozen(module, frozen_ids)
    ]
    if not names:
        return []
    return [
        (
            "frozen-module-forces-grad",
            tuple(names),
            f"{len(names)} module(s) with every parameter frozen set requires_grad=True on their input in "
            f"train mode ({_short(names)}: the model's own switch _requires_grad is on), so autograd runs "
            "through them and keeps their activations for input gradients nothing uses.",
            f"torchfreeze.freeze(model, {names[0]!r}) turns the switch off (as model.freeze_feature_encoder() "
            "does); or call the module's _freeze_parameters().",
        )
    ]


def randomness_findings(
    model: nn.Module, frozen_ids: set[int], pinned: set[str], reported: set[str], subtrees: list[tuple[str, nn.Module]]
) -> list[Finding]:
    """The ``train-mode-in-frozen-subtree``, ``stochastic-depth-over-frozen`` and ``frozen-module-forces-grad``
    findings, in that order (``reported``: module names another finding already covers)."""
    found: list[Finding] = []
    feature_extractor = is_feature_extractor(model, frozen_ids)
    for root, sub in subtrees if feature_extractor else []:
        live = [
            f.name
            for f in nondeterministic_modules(sub, prefix=root)
            if f.kind != "batch-dependent" and f.name not in pinned and f.name not in reported
        ]
        if live:
            sel = f", {root!r}" if root else ""
            found.append(
                (
                    "train-mode-in-frozen-subtree",
                    (root, *live),
                    f"frozen subtree {root or '<model>'!r} runs {_short(live)} in train mode (not pinned) and "
                    "nothing trainable comes before it: dropout or batch statistics make the frozen features "
                    "noisy and slower than they need to be, and they cannot be cached.",
                    f"torchfreeze.freeze(model{sel}, mode='eval') (or pin_mode(model{sel}, mode='eval')).",
                )
            )
    found += _layer_drop(model, frozen_ids, feature_extractor)
    found += _forced_gradients(model, frozen_ids)
    return found
