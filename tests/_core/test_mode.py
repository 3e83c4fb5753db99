"""Pinned modes and the mode context managers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from _helpers import Net, training_map
from torchfreeze import eval_mode, pin_mode, pinned_modes, train_mode, unpin_mode
from torchfreeze.errors import ArgumentTypeError, ModeError, SelectorError


def pinned_net() -> Net:
    model = Net()
    pin_mode(model, "backbone.1", mode="eval")  # BatchNorm stays eval
    pin_mode(model, "backbone.3", mode="train")  # Monte-Carlo dropout
    return model


def assert_pins_hold(model: nn.Module) -> None:
    for call in (model.train, model.eval, lambda: model.train(True), lambda: model.train(False)):
        call()
        assert model.backbone[1].training is False
        assert model.backbone[3].training is True


def test_pin_survives_any_ancestor_call_immediately():
    model = pinned_net()
    assert_pins_hold(model)
    model.backbone.train()
    assert model.backbone[1].training is False
    model.backbone.eval()
    assert model.backbone[3].training is True


def test_pin_keeps_a_class_train_override():
    class Remembers(nn.Sequential):
        def train(self, mode: bool = True):
            self.last_call = mode  # a model's own extra work in train(), as some backbones have
            return super().train(mode)

    inner = Remembers(nn.Dropout(0.1))
    model = nn.Sequential(inner, nn.Dropout(0.1))
    pin_mode(model, "0", mode="eval")
    model.train()
    assert inner.last_call is True  # the override still ran
    assert inner.training is False and inner[0].training is False and model[1].training is True
    with pytest.raises(ValueError):
        model.train("yes")  # type: ignore[arg-type]


def test_unpinned_modules_follow_ancestors():
    model = pinned_net()
    model.train()
    assert model.backbone[0].training and model.head.training
    model.eval()
    assert not model.backbone[0].training and not model.head.training


def test_pin_keeps_identity_and_state_dict_keys():
    model = Net()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    pin_mode(model, "backbone", mode="eval")
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert type(model.backbone[1]) is nn.BatchNorm1d


@pytest.mark.parametrize(
    "clone",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
    ids=["deepcopy", "pickle"],
)
def test_pin_survives_copies(clone):
    original = pinned_net()
    copied = clone(original)
    assert pinned_modes(copied) == {"backbone.1": "eval", "backbone.3": "train"}
    assert_pins_hold(copied)
    # the copy's pin is bound to the copy, not to the original
    original.backbone[1].training = True
    copied.train()
    assert copied.backbone[1].training is False
    assert original.backbone[1].training is True


def test_pin_survives_torch_compile():
    model = pinned_net()
    compiled = torch.compile(model, backend="eager")
    compiled.train()
    assert model.backbone[1].training is False and model.backbone[3].training is True
    x = torch.randn(8, 4)
    stats = model.backbone[1].running_mean.clone()
    compiled(x)
    assert torch.equal(model.backbone[1].running_mean, stats)  # eval BatchNorm: statistics unchanged
    compiled.eval()
    assert model.backbone[3].training is True
    torch.manual_seed(1)
    a = compiled(x)
    torch.manual_seed(2)
    b = compiled(x)
    assert not torch.equal(a, b)  # dropout stays active in eval: MC dropout


def test_pinned_mode_reaches_forward_behaviour():
    model = Net()
    pin_mode(model, nn.BatchNorm1d, mode="eval")
    model.train()
    x = torch.randn(8, 4)
    before = model.backbone[1].running_mean.clone()
    model(x)
    assert torch.equal(before, model.backbone[1].running_mean)


def test_unpin_restores_following_parent():
    model = pinned_net()
    model.eval()
    unpin_mode(model)
    assert pinned_modes(model) == {}
    assert training_map(model) == dict.fromkeys(training_map(model), False)
    model.train()
    assert all(m.training for m in model.modules())


def test_unpin_under_a_pinned_parent_takes_the_mode_passed_down():
    """A pinned parent passes its ancestors' mode on: an unpinned child gets that, not the parent's flag."""
    model = Net().train()
    pin_mode(model, "backbone", mode="eval")
    unpin_mode(model, "backbone.1", "backbone.3")
    expected = copy.deepcopy(model).train()  # what the next model.train() gives
    assert model.backbone[1].training is True and model.backbone[3].training is True
    assert training_map(model) == training_map(expected)


def test_pin_on_the_root_module():
    model = Net()
    pin_mode(model, mode="eval")  # no selector: every module, the root included
    model.train()
    assert not any(m.training for m in model.modules())
    unpin_mode(model, "backbone")  # children of the pinned root follow the mode passed down
    assert pinned_modes(model) == {"": "eval", "head": "eval"}
    model.train()
    assert model.training is False and model.backbone[0].training is True


def test_unpin_selected_only():
    model = pinned_net()
    unpin_mode(model, "backbone.3")
    assert pinned_modes(model) == {"backbone.1": "eval"}


def test_pin_subtree_pins_every_module():
    model = Net()
    pin_mode(model, "backbone", mode="eval")
    assert set(pinned_modes(model)) == {"backbone"} | {f"backbone.{i}" for i in range(6)}


@pytest.mark.parametrize(
    ("bad", "error"),
    [("Eval", ModeError), (None, ArgumentTypeError), (False, ArgumentTypeError), (1, ArgumentTypeError)],
    ids=["case", "none", "bool", "int"],
)
def test_invalid_mode_changes_nothing(bad, error):
    model = Net()
    with pytest.raises(error, match="mode="):
        pin_mode(model, "backbone", mode=bad)
    assert pinned_modes(model) == {}


def test_pin_unknown_selector_changes_nothing():
    model = Net()
    with pytest.raises(SelectorError):
        pin_mode(model, ["backbone", "neck"])
    assert pinned_modes(model) == {}


@pytest.mark.parametrize("context,inside", [(eval_mode, False), (train_mode, True)], ids=["eval_mode", "train_mode"])
def test_mode_contexts_restore_exact_flags_and_respect_pins(context, inside):
    model = pinned_net()
    model.train()
    model.head.eval()  # an irregular map that model.train()/eval() could not restore
    before = training_map(model)
    with context(model) as same:
        assert same is model
        assert model.head.training is inside and model.backbone[0].training is inside
        assert model.backbone[1].training is False and model.backbone[3].training is True
    assert training_map(model) == before


def test_mode_context_restores_on_error():
    model = Net().train()
    before = training_map(model)
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert training_map(model) == before


@pytest.mark.slow
def test_pins_and_frozen_under_inductor_compile():
    from torchfreeze import Frozen

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model = nn.Sequential(nn.Linear(4, 4), Frozen(inner, mode="eval"), nn.Linear(4, 2))
    compiled = torch.compile(model)
    compiled.train()
    x = torch.randn(8, 4)
    stats = inner[1].running_mean.clone()
    out = compiled(x)
    out.sum().backward()
    assert inner[1].training is False and torch.equal(inner[1].running_mean, stats)
    assert inner[0].weight.grad is None and model[0].weight.grad is not None
    torch.testing.assert_close(out, model(x))
