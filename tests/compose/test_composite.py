"""Composite: parts named for selectors, layer groups, autograd skipping, low-precision frozen storage."""

from __future__ import annotations

import pytest
import torch
from _compose_models import ProtocolBackbone
from torch import nn

import torchfreeze
from torchfreeze import Composite, freeze, store_frozen_backbone
from torchfreeze.compose import Backbone, ModuleBackbone
from torchfreeze.errors import ArgumentError, ArgumentTypeError


# ---------------------------------------------------------------------------- Composite
def test_composite_parts_and_forward() -> None:
    bb, neck, head = ProtocolBackbone(), nn.Linear(3, 3), nn.Linear(3, 1)
    model = Composite(bb, head, neck=neck)
    assert [n for n, _ in model.named_children()] == ["backbone", "neck", "head"]
    x = torch.randn(5, 2)
    assert torch.equal(model(x), head(neck(bb.forward_features(x))))
    assert model.feature_dim == 3
    assert isinstance(bb, Backbone)


def test_composite_plain_module_backbone_and_mapping_input() -> None:
    class Kw(nn.Module):
        def forward(self, *, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    model = Composite(Kw(), nn.Identity())
    out = model({"a": torch.ones(2), "b": torch.ones(2)})
    assert torch.equal(out, torch.full((2,), 2.0))
    assert model.feature_dim is None
    assert [n for n, _ in model.named_children()] == ["backbone", "head"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param((lambda x: x, nn.Linear(1, 1)), r"^Composite\(backbone=", id="backbone-not-module"),
        pytest.param(
            (nn.Linear(1, 1), "head"), r"^Composite\(head='head'\): expected a torch.nn.Module", id="head-not-module"
        ),
        pytest.param((nn.Linear(1, 1), nn.Linear(1, 1), 3), r"^Composite\(neck=3\)", id="neck-not-module"),
    ],
)
def test_composite_rejects_non_modules(args: tuple, match: str) -> None:
    with pytest.raises(ArgumentTypeError, match=match):
        Composite(*args)


def test_composite_layer_groups_are_backbone_groups_then_neck_then_head() -> None:
    model = Composite(ProtocolBackbone(), nn.Linear(3, 1), neck=nn.Linear(3, 3))
    assert torchfreeze.layer_groups(model) == [["backbone.a"], ["backbone.b"], ["neck"], ["head"]]
    plain = Composite(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), nn.Linear(2, 1))
    assert torchfreeze.layer_groups(plain) == [["backbone.0"], ["backbone.2"], ["head"]]


def test_composite_freeze_to_uses_the_groups() -> None:
    model = Composite(ProtocolBackbone(), nn.Linear(3, 1))
    torchfreeze.freeze_to(model, 1)
    assert torchfreeze.is_frozen(model, "backbone.a")
    assert not torchfreeze.is_frozen(model, "backbone.b")
    assert not torchfreeze.is_frozen(model, "head")


def test_any_backbone_with_any_head() -> None:
    heads = [nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))]
    backbones = [ProtocolBackbone(), ModuleBackbone(nn.Linear(2, 3), feature_dim=3)]
    x = torch.randn(4, 2)
    for bb in backbones:
        for head in heads:
            model = Composite(bb, head)
            assert model.feature_dim == 3
            assert torch.equal(model(x), head(bb.forward_features(x)))


# faster defaults: no autograd for a frozen backbone, opt-in low-precision storage ----------


class Recording(nn.Module):
    """Records whether autograd was on when it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.grad_enabled: list[bool] = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.linear(x)


def composite() -> Composite:
    torch.manual_seed(0)
    return Composite(Recording(), nn.Linear(8, 2))


def test_frozen_backbone_runs_without_autograd_when_nothing_before_it_trains():
    model = freeze(composite(), "backbone", mode="eval")
    out = model(torch.randn(3, 4))
    out.sum().backward()
    assert model.backbone.grad_enabled == [False]
    assert model.head.weight.grad is not None


@pytest.mark.parametrize(
    "setup",
    [
        ("trainable-backbone", lambda m: (m, torch.randn(3, 4))),
        ("input-requires-grad", lambda m: (freeze(m, "backbone"), torch.randn(3, 4, requires_grad=True))),
    ],
    ids=lambda c: c[0],
)
def test_backbone_keeps_autograd_when_something_needs_it(setup):
    model, x = setup[1](composite())
    model(x).sum().backward()
    assert model.backbone.grad_enabled == [True]
    if x.requires_grad:
        assert x.grad is not None  # gradients flow through the frozen backbone to the input


def test_store_frozen_backbone_bf16_and_back():
    model = freeze(composite(), "backbone")
    x = torch.randn(5, 4)
    reference = model(x)
    store_frozen_backbone(model, torch.bfloat16)
    assert model.backbone.linear.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.float32
    out = model(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
    out.sum().backward()
    assert model.head.weight.grad is not None and model.backbone.linear.weight.grad is None
    store_frozen_backbone(model, None)
    assert model.backbone.linear.weight.dtype == torch.float32 and model.frozen_storage_dtype is None


BAD = [
    ("not-composite", lambda: nn.Linear(2, 2), torch.bfloat16, ArgumentTypeError, "expected a Composite"),
    ("dtype-not-a-dtype", lambda: freeze(composite(), "backbone"), "bf16", ArgumentTypeError, "torch.dtype"),
    ("integer-dtype", lambda: freeze(composite(), "backbone"), torch.int8, ArgumentError, "floating"),
    ("complex-dtype", lambda: freeze(composite(), "backbone"), torch.complex64, ArgumentError, "floating"),
    ("dtype-int", lambda: freeze(composite(), "backbone"), 16, ArgumentTypeError, r"dtype=16\): .*got int"),
    ("trainable-backbone", composite, torch.bfloat16, ArgumentError, "still requires grad"),
]


@pytest.mark.parametrize("make,dtype,error,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_store_frozen_backbone_refuses_and_changes_nothing(make, dtype, error, message):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message) as caught:
        store_frozen_backbone(model, dtype)
    assert "Fix: " in str(caught.value) and str(caught.value).startswith("store_frozen_backbone(")
    assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_cached_backbone_is_not_walked_for_autograd(monkeypatch):
    from torchfreeze import cache_features

    model = freeze(composite(), "backbone", mode="eval")
    model.backbone = cache_features(model.backbone)
    walked = []
    original = nn.Module.parameters

    def spy(self, *args, **kwargs):
        walked.append(type(self).__name__)
        return original(self, *args, **kwargs)

    x = torch.randn(3, 4)
    model(x)  # miss: computed by the cache under no_grad
    monkeypatch.setattr(nn.Module, "parameters", spy)
    out = model(x)  # hit
    monkeypatch.undo()
    assert "FeatureCache" not in walked
    assert model.backbone.stats().hits == 3 and out.requires_grad


def test_mapping_inputs_are_walked_for_autograd_and_cast() -> None:
    from types import MappingProxyType

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.seen: list[tuple[torch.dtype, bool]] = []

        def forward(self, *, a: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            self.seen.append((a.dtype, torch.is_grad_enabled()))
            return self.linear(a) + ids

    model = freeze(Composite(Kw(), nn.Identity()), "backbone")
    a = torch.ones(1, 2, requires_grad=True)
    model(MappingProxyType({"a": a, "ids": torch.ones(1, 2, dtype=torch.long)}))  # not a dict: still walked
    store_frozen_backbone(model, torch.bfloat16)
    out = model(MappingProxyType({"a": torch.ones(1, 2), "ids": torch.ones(1, 2, dtype=torch.long)}))
    assert model.backbone.seen == [(torch.float32, True), (torch.bfloat16, False)]
    assert out.dtype == torch.float32
