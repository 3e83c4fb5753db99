"""What freezing does besides ``requires_grad`` so that a model's own machinery agrees with it.

* **The model's own freeze switch.** Hugging Face's feature encoders (Wav2Vec2,
  HuBERT, ...) hold ``_requires_grad`` and, while it is on in train mode, make
  their input require grad, so autograd runs through a frozen encoder and keeps
  its activations (17% of the activation memory of a small Wav2Vec2ForCTC).
  :func:`sync_gradient_switches` turns it off when every parameter of such a
  module is frozen and back on when one trains again: ``freeze(m,
  "wav2vec2.feature_extractor")`` then costs what ``m.freeze_feature_encoder()``
  costs.
* **LayerDrop over a frozen, eval-pinned part.** A parent that skips its layers
  at random decides from its *own* ``training`` flag, so pinning the layers to
  eval does not make them deterministic. :func:`pin_skipping_parents` pins such
  a parent to eval (origin ``"freeze"``) once every layer it may skip is frozen
  and pinned to eval — the feature-extractor preset ``freeze(..., mode="eval")``
  and ``get_model(freeze=True)`` plans. Its other children keep following
  ``model.train()`` (a pin holds only the module's own flag).
  :func:`release_skipping_parents` removes that pin when a layer is unfrozen.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from torchfreeze._core.behaviour import gradient_switch, layer_skipping
from torchfreeze._core.mode import get_pin, remove_pin, set_pin

__all__ = ["sync_gradient_switches", "pin_skipping_parents", "release_skipping_parents"]


def sync_gradient_switches(modules: Iterable[nn.Module]) -> None:
    """Set each module's own ``_requires_grad`` switch to "some parameter of mine trains"."""
    for module in modules:
        switch = gradient_switch(module)
        if switch is not None:
            trains = any(p.requires_grad for p in module.parameters())
            if switch != trains:
                module.__dict__["_requires_grad"] = trains


def _layers(module: nn.Module, lists: list[str]) -> list[nn.Module]:
    return [layer for name in lists for layer in module.get_submodule(name).children()]


def _fixed(layer: nn.Module) -> bool:
    """Every parameter frozen and the layer pinned to eval."""
    pin = get_pin(layer)
    params = list(layer.parameters())
    return bool(params) and not any(p.requires_grad for p in params) and pin is not None and pin.mode == "eval"


def pin_skipping_parents(model: nn.Module) -> None:
    """Pin to eval every LayerDrop parent whose layers are all frozen and pinned to eval."""
    for module in model.modules():
        skipping = layer_skipping(module)
        if skipping is None or get_pin(module) is not None:
            continue
        layers = _layers(module, skipping[2])
        if layers and all(_fixed(layer) for layer in layers):
            set_pin(module, "eval", "freeze")


def release_skipping_parents(model: nn.Module) -> None:
    """Unpin (back to following its parent) a LayerDrop parent pinned by freeze whose layers no longer all are fixed."""
    for name, module in model.named_modules():
        skipping = layer_skipping(module)
        pin = get_pin(module)
        if skipping is None or pin is None or pin.origin != "freeze":
            continue
        own_frozen = not any(p.requires_grad for p in module.parameters())
        if not own_frozen and not all(_fixed(layer) for layer in _layers(module, skipping[2])):
            parent = model.get_submodule(name.rpartition(".")[0]) if name else None
            remove_pin(module, parent.training if parent is not None else None)
