"""freeze / unfreeze / freeze_to / layer_groups / queries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _helpers import Net, TiedLM, requires_grad_map, tensors_snapshot, training_map
from torchfreeze import (
    Frozen,
    freeze,
    freeze_to,
    frozen_parameters,
    is_frozen,
    layer_groups,
    pin_mode,
    pinned_modes,
    trainable_parameters,
    unfreeze,
)
from torchfreeze.errors import (
    ArgumentError,
    ArgumentTypeError,
    ModeError,
    SelectorError,
    SelectorTypeError,
    SharedParameterError,
)


def test_freeze_sets_flag_and_clears_grad_without_touching_modes(net):
    net(torch.randn(4, 4)).sum().backward()
    before = training_map(net)
    freeze(net, "backbone")
    assert all(not p.requires_grad and p.grad is None for p in net.backbone.parameters())
    assert all(p.requires_grad and p.grad is not None for p in net.head.parameters())
    assert training_map(net) == before


def test_freeze_returns_model_and_whole_model_default(net):
    assert freeze(net) is net
    assert is_frozen(net)
    assert list(trainable_parameters(net)) == []
    assert {id(p) for _, p in frozen_parameters(net)} == {id(p) for p in net.parameters()}


def test_unfreeze_is_the_inverse(net):
    before = requires_grad_map(net)
    unfreeze(freeze(net, "backbone", mode="eval"), "backbone")
    assert requires_grad_map(net) == before
    assert pinned_modes(net) == {}
    net.train()
    assert all(m.training for m in net.modules())


def test_mode_pins_selected_modules_and_unfreeze_removes_only_its_pins(net):
    pin_mode(net, "backbone.3", mode="train")  # a user pin (MC dropout) inside the frozen part
    freeze(net, "backbone.0", "backbone.1", mode="eval")
    net.train()
    assert not net.backbone[0].training and not net.backbone[1].training
    assert net.backbone[3].training and net.head.training
    net.eval()
    assert net.backbone[3].training
    unfreeze(net, "backbone")
    assert pinned_modes(net) == {"backbone.3": "train"}


def test_freeze_mode_keeps_pins_it_did_not_set_and_unfreeze_leaves_them():
    model = Net()
    inner = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1))
    model.head = nn.Sequential(Frozen(inner, mode="train"), nn.Linear(8, 3))
    pin_mode(model, "backbone.3", mode="train")  # Monte-Carlo dropout inside the backbone
    before = pinned_modes(model)
    freeze(model, mode="eval", shared="freeze")
    assert {n: before[n] for n in before} == {n: pinned_modes(model)[n] for n in before}
    model.eval()
    assert model.backbone[3].training and inner[1].training and not model.backbone[0].training
    unfreeze(model)
    assert pinned_modes(model) == before


def test_train_bn_keeps_norm_layers_trainable_and_unpinned(net):
    freeze(net, "backbone", train_bn=True, mode="eval")
    assert all(p.requires_grad for p in net.backbone[1].parameters())
    assert not net.backbone[0].weight.requires_grad
    assert "backbone.1" not in pinned_modes(net)
    net.train()
    assert net.backbone[1].training and not net.backbone[0].training


def test_is_frozen_queries(net):
    freeze(net, "backbone.0")
    assert is_frozen(net, "backbone.0")
    assert not is_frozen(net, "backbone")
    assert is_frozen(net, "backbone.2")  # a ReLU: no parameters, vacuously frozen
    assert is_frozen(net, "**.bias") is False


def test_is_frozen_counts_frozen_uses():
    inner = nn.Linear(2, 2)
    model = nn.Sequential(Frozen(inner), nn.Linear(2, 2))
    assert is_frozen(model, "0") and inner.weight.requires_grad


# tied / shared parameters -----------------------------------------------------------------------


def test_shared_error_names_both_paths_and_changes_nothing(tied_lm):
    before = requires_grad_map(tied_lm)
    with pytest.raises(SharedParameterError) as info:
        freeze(tied_lm, "embed")
    message = str(info.value)
    assert "'embed.weight'" in message and "'lm_head.weight'" in message
    assert "shared='freeze'" in message and "'lm_head'" in message
    assert isinstance(info.value, ValueError)
    assert requires_grad_map(tied_lm) == before


def test_shared_freeze_freezes_every_use(tied_lm):
    freeze(tied_lm, "embed", shared="freeze")
    assert not tied_lm.lm_head.weight.requires_grad


def test_selecting_both_uses_is_not_an_error(tied_lm):
    freeze(tied_lm, ["embed", "lm_head"])
    assert not tied_lm.embed.weight.requires_grad


def test_shared_use_through_frozen_is_not_a_conflict():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, Frozen(shared))
    freeze(model, "0")
    assert not shared.weight.requires_grad


def test_unfreeze_checks_sharing_too(tied_lm):
    freeze(tied_lm, shared="freeze")
    with pytest.raises(SharedParameterError, match="unfreeze"):
        unfreeze(tied_lm, "lm_head")
    assert not tied_lm.embed.weight.requires_grad


# errors leave the model unchanged ---------------------------------------------------------------


def _net_loss(model: nn.Module) -> torch.Tensor:
    return model(torch.randn(4, 4)).sum()


def _lm_loss(model: nn.Module) -> torch.Tensor:
    return model(torch.randint(0, 7, (2, 3))).sum()


ERRORS = [
    ("no-match", Net, _net_loss, dict(selectors=("backbone", "decoder"), mode="eval"), SelectorError),
    ("wrong-type", Net, _net_loss, dict(selectors=("backbone", 42), mode="eval"), SelectorTypeError),
    ("invalid-mode", Net, _net_loss, dict(selectors=("backbone",), mode="frozen"), ModeError),
    ("invalid-shared", Net, _net_loss, dict(selectors=("backbone",), shared="ignore"), ArgumentError),
    ("invalid-train-bn", Net, _net_loss, dict(selectors=("backbone",), train_bn="yes"), ArgumentTypeError),
    ("shared-parameter", TiedLM, _lm_loss, dict(selectors=("body", "embed"), mode="eval"), SharedParameterError),
]


def _state(model: nn.Module) -> tuple:
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return requires_grad_map(model), training_map(model), pinned_modes(model), tensors_snapshot(model), grads


@pytest.mark.parametrize("make,loss,kwargs,error", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_invalid_freeze_changes_nothing(make, loss, kwargs, error):
    """Each error path, with a valid part before the invalid one: flags, modes, pins, tensors and grads stay."""
    model = make()
    loss(model).backward()  # .grad present: a partial freeze would have dropped some
    kwargs = dict(kwargs)
    selectors = kwargs.pop("selectors")
    before = _state(model)
    with pytest.raises(error) as info:
        freeze(model, *selectors, **kwargs)
    assert "Fix: " in str(info.value)
    after = _state(model)
    assert after[:3] == before[:3]
    for got, want in ((after[3], before[3]), (after[4], before[4])):
        assert got.keys() == want.keys()
        assert all((got[k] is None and want[k] is None) or torch.equal(got[k], want[k]) for k in want)


def test_freeze_twice_and_unfreeze_of_the_never_frozen_are_no_ops(net):
    freeze(net, "backbone")
    frozen_map = requires_grad_map(net)
    freeze(net, "backbone")
    assert requires_grad_map(net) == frozen_map
    fresh = Net()
    before = requires_grad_map(fresh), training_map(fresh)
    unfreeze(fresh, "head")
    assert (requires_grad_map(fresh), training_map(fresh)) == before


def test_lazy_parameters_can_be_frozen_before_materialisation():
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    freeze(model, "0")
    unfreeze(model, "1")
    model(torch.randn(2, 5)).sum().backward()
    assert not model[0].weight.requires_grad and model[0].weight.grad is None
    assert model[1].weight.grad is not None
    assert [n for n, _ in trainable_parameters(model)] == ["1.weight", "1.bias"]


def test_parameter_registered_on_the_root():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.lin = nn.Linear(2, 2)

    model = freeze(Scaled(), "scale")
    assert not model.scale.requires_grad and model.lin.weight.requires_grad
    assert is_frozen(model, "scale") and not is_frozen(model)


def test_shared_submodule_under_two_names():
    block = nn.Linear(2, 2)
    model = nn.Sequential(block, nn.ReLU(), block)
    with pytest.raises(SharedParameterError, match="'2.weight'"):
        freeze(model, "0")
    assert block.weight.requires_grad
    freeze(model, block)  # the module object selects every path
    assert not block.weight.requires_grad and is_frozen(model, "2")


# frozen weights stay bit-identical under optimizers with state --------------------------------

OPTIMIZERS = [
    ("sgd-momentum-wd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)),
    ("adamw-wd", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("make_optimizer", [c[1] for c in OPTIMIZERS], ids=[c[0] for c in OPTIMIZERS])
def test_frozen_bit_identical_after_training_then_freezing(make_optimizer):
    model = Net()
    optimizer = make_optimizer(model.parameters())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):  # stale gradients and optimizer state exist before freezing
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    freeze(model, "backbone")
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    head = model.head.weight.detach().clone()
    for _ in range(5):
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), n
    assert not torch.equal(model.head.weight, head)


def test_plain_requires_grad_false_is_not_enough_with_stale_grad():
    """The trap freeze() closes: a zero .grad left behind still moves weights under weight decay."""
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    for p in model.backbone.parameters():
        p.requires_grad_(False)  # plain PyTorch: .grad is still a zero tensor
    before = model.backbone[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.backbone[0].weight, before)


# invariants on random module trees --------------------------------------------------------------


@st.composite
def trees(draw, level=0):
    if level >= 3 or (level > 0 and draw(st.booleans())):
        kind = draw(st.sampled_from(["linear", "norm", "relu"]))
        return {"linear": nn.Linear(2, 2), "norm": nn.LayerNorm(2), "relu": nn.ReLU()}[kind]
    count = draw(st.integers(min_value=1, max_value=3))
    return nn.Sequential(*[draw(trees(level=level + 1)) for _ in range(count)])


@settings(max_examples=60, deadline=None)
@given(tree=trees(), data=st.data())
def test_freeze_then_unfreeze_restores_exact_map(tree, data):
    names = [n for n, _ in tree.named_modules() if n]  # '' is not a selector: no selector is the whole model
    initially_frozen = data.draw(st.lists(st.sampled_from(names), max_size=2))
    if initially_frozen:
        freeze(tree, initially_frozen)
    selected = data.draw(st.sampled_from(names))
    # the selection's own map restores to trainable; everything outside stays as it was
    unfreeze(tree, selected)
    before = requires_grad_map(tree)
    mode = data.draw(st.sampled_from([None, "eval", "train"]))
    train_bn = data.draw(st.booleans())
    freeze(tree, selected, mode=mode, train_bn=train_bn)
    unfreeze(tree, selected)
    assert requires_grad_map(tree) == before
    assert pinned_modes(tree) == {}


# layer groups and freeze_to ----------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(5, 4)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.pooler = nn.Linear(4, 4)


class CustomGroups(nn.Sequential):
    def layer_groups(self):
        return [["0", "1"], "2"]


GROUPS = [
    ("sequential", nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), [["0"], ["2"]]),
    (
        "transformer-like",
        Encoder(),
        [["embeddings"], ["encoder.layer.0"], ["encoder.layer.1"], ["encoder.layer.2"], ["pooler"]],
    ),
    ("single-child-descends", nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), [["0.0"], ["0.1"]]),
    ("custom-method", CustomGroups(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)), [["0", "1"], ["2"]]),
    ("net", Net(), [["backbone.0", "backbone.1"], ["backbone.4"], ["head"]]),  # a norm stays with its layer
    (
        "submodule-named-layer_groups",
        nn.ModuleDict({"layer_groups": nn.Linear(2, 2), "head": nn.Linear(2, 1)}),
        [["layer_groups"], ["head"]],
    ),
    ("no-parameters", nn.Sequential(nn.ReLU()), []),
]


@pytest.mark.parametrize("model,expected", [c[1:] for c in GROUPS], ids=[c[0] for c in GROUPS])
def test_layer_groups(model, expected):
    assert layer_groups(model) == expected


@pytest.mark.parametrize("n,frozen", [(0, []), (1, ["0"]), (2, ["0", "1"]), (-1, ["0", "1"]), (3, ["0", "1", "2"])])
def test_freeze_to(n, frozen):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    freeze(model)  # freeze_to also unfreezes the rest
    freeze_to(model, n)
    assert [name for name in ("0", "1", "2") if is_frozen(model, name)] == frozen


#: bad n= / groups= of freeze_to: (kwargs, class, message pattern); a wrong type is an ArgumentTypeError
FREEZE_TO_ERRORS = [
    pytest.param({"n": 4}, ArgumentError, r"^freeze_to\(n=4\): expected an int between -3 and 3.*Fix: ", id="too-many"),
    pytest.param({"n": -4}, ArgumentError, r"^freeze_to\(n=-4\)", id="too-negative"),
    pytest.param({"n": 1.5}, ArgumentTypeError, r"^freeze_to\(n=1\.5\): expected an int .*got float\. Fix: ", id="float"),
    pytest.param({"n": True}, ArgumentTypeError, r"^freeze_to\(n=True\): .*got bool", id="bool"),
    pytest.param({"n": 1, "groups": 5}, ArgumentTypeError, r"^freeze_to\(groups=5\): expected a list of selectors.*Fix: ", id="groups-int"),
    pytest.param({"n": 1, "groups": "01"}, ArgumentTypeError, r"^freeze_to\(groups='01'\)", id="groups-str"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "error", "match"), FREEZE_TO_ERRORS)
def test_freeze_to_bad_arguments_change_nothing(kwargs, error, match):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    before = requires_grad_map(model)
    with pytest.raises(error, match=match) as caught:
        freeze_to(model, **kwargs)
    assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    assert requires_grad_map(model) == before


def test_freeze_to_unfreezes_the_rest_like_unfreeze():
    from torchfreeze import freeze_batchnorm

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2), nn.BatchNorm1d(2))
    freeze(model, mode="eval")
    freeze_batchnorm(model, convert=True)
    freeze_to(model, 1, groups=[["0", "1"], ["2", "3"]])
    assert type(model[3]) is nn.BatchNorm1d and model[3].weight.requires_grad  # swapped back
    assert type(model[1]).__name__ == "FrozenBatchNorm1d"  # the frozen side stays converted
    assert set(pinned_modes(model)) == {"", "0"}  # pins of the unfrozen groups removed ("1" was swapped)


def test_freeze_to_shared_conflict_changes_nothing():
    model = TiedLM()
    groups = [["embed"], ["body"], ["lm_head"]]
    before = requires_grad_map(model)
    with pytest.raises(SharedParameterError):
        freeze_to(model, 2, groups=groups)
    assert requires_grad_map(model) == before


def test_freeze_to_shared_freeze_keeps_a_tie_across_sides_frozen():
    model = TiedLM()
    freeze(model, shared="freeze")
    freeze_to(model, 2, groups=[["embed"], ["body"], ["lm_head"]], shared="freeze")
    assert not model.embed.weight.requires_grad  # tied to the frozen embedding: stays frozen
    assert not any(p.requires_grad for p in model.body.parameters())
    freeze_to(model, 0, groups=[["embed"], ["body"], ["lm_head"]], shared="freeze")
    assert all(p.requires_grad for p in model.parameters())


def test_shared_error_message_wording(tied_lm):
    with pytest.raises(SharedParameterError, match="the call would silently freeze that use too"):
        freeze(tied_lm, "embed")
