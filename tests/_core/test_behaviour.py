"""The one predicate of randomness: LayerDrop, drop path, wrappers, and the model's own gradient switch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from torch import nn

from torchfreeze import Frozen
from torchfreeze._core.behaviour import gradient_switch, layer_skipping, nondeterminism, nondeterministic_modules


def _parent(**attributes: Any) -> nn.Module:
    module = nn.Module()
    module.layers = nn.ModuleList([nn.Linear(2, 2)])
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


SKIPPING = [
    ("layerdrop-attribute", _parent(layerdrop=0.1), ("layerdrop", 0.1, ["layers"])),
    ("layer_drop-attribute", _parent(layer_drop=0.2), ("layer_drop", 0.2, ["layers"])),
    ("encoder_layerdrop", _parent(encoder_layerdrop=0.3), ("encoder_layerdrop", 0.3, ["layers"])),
    ("hf-config", _parent(config=SimpleNamespace(layerdrop=0.5)), ("config.layerdrop", 0.5, ["layers"])),
    ("zero-rate", _parent(layerdrop=0.0), None),
    ("a-bool-is-not-a-rate", _parent(layerdrop=True), None),
    ("no-layers-to-skip", nn.Linear(2, 2), None),
]


@pytest.mark.parametrize("module,expected", [c[1:] for c in SKIPPING], ids=[c[0] for c in SKIPPING])
def test_layer_skipping(module: nn.Module, expected: object) -> None:
    assert layer_skipping(module) == expected


def test_layerdrop_is_the_parents_randomness_in_train_mode_only() -> None:
    model = nn.Sequential(_parent(layerdrop=0.5))
    found = nondeterministic_modules(model.train())
    assert [(f.name, f.kind) for f in found] == [("0", "random")] and "skips its layers" in found[0].detail
    model[0].layers.eval()  # pinning the layers does not stop the parent's coin
    assert [f.name for f in nondeterministic_modules(model)] == ["0"]
    assert nondeterministic_modules(model.eval()) == []


class DropPath(nn.Module):
    """timm's / Hugging Face's stochastic depth: the rate is held as ``drop_prob``."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob


@pytest.mark.parametrize(
    "module,random",
    [
        pytest.param(DropPath(0.1), True, id="drop-path"),
        pytest.param(DropPath(0.0), False, id="drop-path-zero"),
        pytest.param(_parent(drop_path_rate=0.2), True, id="drop-path-rate"),
        pytest.param(_parent(stochastic_depth_prob=0.2), True, id="stochastic-depth-prob"),
    ],
)
def test_stochastic_depth_is_random_in_train_mode(module: nn.Module, random: bool) -> None:
    assert (nondeterminism(module.train()) is not None) == random
    assert nondeterminism(module.eval()) is None


def test_a_frozen_wrapper_is_not_reported_for_what_it_wraps() -> None:
    """Frozen forwards attributes to the wrapped module; the predicate asks the wrapped module only."""
    attention = nn.MultiheadAttention(4, 2, dropout=0.1)
    found = nondeterministic_modules(nn.Sequential(Frozen(attention)).train())
    assert [f.name for f in found] == ["0.module"]


class Switched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._requires_grad = True

    def _freeze_parameters(self) -> None:
        self._requires_grad = False


def test_gradient_switch() -> None:
    module = Switched()
    assert gradient_switch(module) is True
    module._freeze_parameters()
    assert gradient_switch(module) is False
    plain = nn.Linear(2, 2)
    plain._requires_grad = True  # an attribute alone, without the model's own freeze method, is not a switch
    assert gradient_switch(plain) is None
    assert gradient_switch(Frozen(Switched())) is None  # the wrapper has none of its own
