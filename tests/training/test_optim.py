"""param_groups / add_unfrozen."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import nn

from _helpers import Net, requires_grad_map
from torchfreeze import Frozen, add_unfrozen, check, freeze, freeze_to, param_groups, trainable_parameters, unfreeze
from torchfreeze.errors import ArgumentError, ArgumentTypeError, SelectorError
from torchfreeze.training.optim import drop_frozen


def _ids(groups: list[dict[str, Any]]) -> list[int]:
    return [id(p) for g in groups for p in g["params"]]


def _names(model: nn.Module, group: dict[str, Any]) -> Any:
    paths = {id(p): n for n, p in model.named_parameters()}
    return [paths[id(p)] for p in group["params"]]


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> Any:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_only_trainable_parameters_flag_and_frozen_use() -> None:
    inner = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), Frozen(inner), nn.Linear(4, 2))
    freeze(model, "0")
    groups = param_groups(model, 0.1)
    held = set(_ids(groups))
    assert held == {id(p) for _, p in trainable_parameters(model)}
    assert id(inner.weight) not in held and id(model[0].weight) not in held
    assert id(model[2].weight) in held


@pytest.mark.parametrize(
    "weight_decay, expected",
    [
        pytest.param(0.0, {"group0": 0.0}, id="no-decay-one-group"),
        pytest.param(0.1, {"group0": 0.1, "group0/no_decay": 0.0}, id="decay-split"),
    ],
)
def test_weight_decay_split(weight_decay: Any, expected: Any) -> None:
    model = Stack()
    groups = param_groups(model, 1e-3, weight_decay=weight_decay)
    assert {g["name"]: g["weight_decay"] for g in groups} == expected
    if weight_decay:
        no_decay = next(g for g in groups if g["name"].endswith("no_decay"))
        names = _names(model, no_decay)
        assert all(n.endswith("bias") or n.startswith("norm.") for n in names)
        assert "norm.weight" in names
        decay = next(g for g in groups if g["name"] == "group0")
        assert all(n.endswith("weight") and not n.startswith("norm") for n in _names(model, decay))


@pytest.mark.parametrize(
    "lr_mult, expected",
    [
        pytest.param(None, [1.0, 1.0, 1.0, 1.0], id="none"),
        pytest.param(2.0, [1 / 8, 1 / 4, 1 / 2, 1.0], id="ratio-2"),
        pytest.param((0.01, 1.0), [0.01, 0.01 ** (2 / 3), 0.01 ** (1 / 3), 1.0], id="slice-pair"),
    ],
)
def test_discriminative_learning_rates(lr_mult: Any, expected: Any) -> None:
    model = Stack()
    groups = param_groups(model, 1.0, lr_mult=lr_mult, groups=["layers.0", "layers.1", "layers.2", ["norm", "head"]])
    lrs = [g["lr"] for g in groups]
    assert lrs == pytest.approx(expected)
    # every trainable parameter exactly once, in model order inside each group
    assert sorted(_ids(groups)) == sorted(id(p) for p in model.parameters())


def test_default_layer_groups_with_lr_mult_uses_layer_groups() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    groups = param_groups(model, 1.0, lr_mult=10.0)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1, 1.0])


def test_uncovered_trainable_parameters_join_last_group() -> None:
    model = Stack()
    groups = param_groups(model, 1.0, groups=["layers.0", "layers.1"])
    assert len(groups) == 2
    last = _names(model, groups[-1])
    assert last[:2] == ["layers.1.weight", "layers.1.bias"]
    assert "head.weight" in last and "layers.2.weight" in last


def test_first_group_wins_for_overlapping_selectors_and_empty_groups_are_dropped() -> None:
    model = Stack()
    groups = param_groups(model, 1.0, lr_mult=2.0, groups=["layers", "layers.1", "head"])
    assert [g["name"] for g in groups] == ["group0", "group2"]
    assert [g["lr"] for g in groups] == [0.25, 1.0]
    assert _names(model, groups[1]) == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert len(_ids(groups)) == len(set(_ids(groups))) == 10


@pytest.mark.parametrize(
    "opt_cls",
    [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad],
    ids=lambda c: c.__name__,
)
def test_groups_work_with_optimizers_and_keep_names(opt_cls: Any) -> None:
    model = Stack()
    freeze(model, "layers.0")
    opt = opt_cls(param_groups(model, 0.01, weight_decay=0.01, lr_mult=2.0, groups=["layers.1", "layers.2", "head"]))
    assert [g["name"] for g in opt.param_groups][:2] == ["group0", "group0/no_decay"]
    assert check(model, opt) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"lr": 0.0}, ArgumentError, "lr=0.0", id="lr-zero"),
        pytest.param({"lr": float("nan")}, ArgumentError, "lr=nan", id="lr-nan"),
        pytest.param(
            {"lr": "1e-3"}, ArgumentTypeError, r"^param_groups\(lr='1e-3'\): expected a finite number", id="lr-str"
        ),
        pytest.param({"lr": None}, ArgumentTypeError, r"^param_groups\(lr=None\): .*got NoneType", id="lr-none"),
        pytest.param({"lr": [0.1]}, ArgumentTypeError, r"^param_groups\(lr=\[0\.1\]\): .*got list", id="lr-list"),
        pytest.param({"lr": torch.tensor(0.1)}, ArgumentTypeError, r"^param_groups\(lr=tensor", id="lr-tensor"),
        pytest.param({"lr": True}, ArgumentTypeError, r"^param_groups\(lr=True\): .*got bool", id="lr-bool"),
        pytest.param({"lr": 1e-3, "weight_decay": "0"}, ArgumentTypeError, r"weight_decay='0'", id="decay-str"),
        pytest.param({"lr": 1e-3, "lr_mult": "2.6"}, ArgumentTypeError, r"lr_mult='2\.6'", id="mult-str"),
        pytest.param({"lr": 1e-3, "weight_decay": -1.0}, ArgumentError, "weight_decay", id="negative-decay"),
        pytest.param({"lr": 1e-3, "lr_mult": 0.0}, ArgumentError, "lr_mult", id="mult-zero"),
        pytest.param({"lr": 1e-3, "lr_mult": (1.0, 2.0, 3.0)}, ArgumentError, "lr_mult", id="mult-triple"),
        pytest.param(
            {"lr": 1e-3, "lr_mult": -2.0, "groups": ["head"]}, ArgumentError, "lr_mult", id="mult-negative-one-group"
        ),
        pytest.param(
            {"lr": 1e-3, "lr_mult": (0.0, 1.0), "groups": ["head"]}, ArgumentError, "lr_mult", id="pair-zero-one-group"
        ),
        pytest.param(
            {"lr": 1e-3, "groups": "head"}, ArgumentTypeError, r"^param_groups\(groups='head'\)", id="groups-str"
        ),
        pytest.param({"lr": 1e-3, "groups": 5}, ArgumentTypeError, r"^param_groups\(groups=5\)", id="groups-int"),
        pytest.param({"lr": 1e-3, "groups": []}, ArgumentError, r"^param_groups\(groups=\[\]\)", id="groups-empty"),
        pytest.param(
            {"lr": 1e-3, "groups": ["layers.9"]},
            SelectorError,
            r"^param_groups\(groups='layers\.9'\)",
            id="unknown-selector",
        ),
    ],
)
def test_bad_input_raises_and_changes_nothing(kwargs: Any, error: Any, match: str) -> None:
    model = Stack()
    before = requires_grad_map(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match) as caught:
        param_groups(model, **kwargs)
    assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    assert "Fix:" in str(caught.value) and len(str(caught.value)) < 400
    assert requires_grad_map(model) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_everything_frozen_is_an_error() -> None:
    with pytest.raises(ArgumentError, match=r"^param_groups\(model=\.\.\.\): found no trainable parameter.*Fix: "):
        param_groups(freeze(Stack()), 1e-3)


# ------------------------------------------------------------------ add_unfrozen


def test_add_unfrozen_matches_by_identity_not_value() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    for p in model.parameters():
        nn.init.zeros_(p)
    freeze(model, "0")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    unfreeze(model, "0")
    added = add_unfrozen(model, opt)
    assert added == ["0.weight", "0.bias"]
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(set(held)) == 4
    assert add_unfrozen(model, opt) == []  # idempotent


def test_add_unfrozen_takes_the_ladder_not_the_constructor_defaults() -> None:
    """Issue 10.2: AdamW(param_groups(m, 0.1)) then unfreeze: lr 0.1 and the no-decay rule, not 1e-3/0.01."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    freeze(model, "0")
    opt = torch.optim.AdamW(param_groups(model, 0.1))
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.01  # what must NOT leak
    unfreeze(model, "0")
    assert add_unfrozen(model, opt) == ["0.weight", "0.bias"]
    new = opt.param_groups[-1]
    assert new["name"] == "unfrozen0" and new["lr"] == 0.1 and new["weight_decay"] == 0.0


def test_add_unfrozen_keeps_the_lr_mult_spread_and_the_decay_split() -> None:
    model = Stack()
    freeze_to(model, 2)  # layers.0, layers.1 frozen; layers.2 and head (norm+head) train
    groups = ["layers.0", "layers.1", "layers.2", ["norm", "head"]]
    opt = torch.optim.AdamW(param_groups(model, 0.8, weight_decay=0.05, lr_mult=2.0, groups=groups))
    reference = {
        g["name"]: g["lr"] for g in param_groups(unfreeze(copy.deepcopy(model)), 0.8, lr_mult=2.0, groups=groups)
    }
    unfreeze(model)
    added = add_unfrozen(model, opt, groups=groups)
    assert added == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    new = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups[-4:]}
    assert new == {
        "unfrozen0/group0": (reference["group0"], 0.05),
        "unfrozen0/group0/no_decay": (reference["group0"], 0.0),
        "unfrozen0/group1": (reference["group1"], 0.05),
        "unfrozen0/group1/no_decay": (reference["group1"], 0.0),
    }
    assert reference["group0"] == 0.1 and reference["group1"] == 0.2  # 0.8 / 2**3, 0.8 / 2**2


def test_add_unfrozen_ladder_needs_matching_groups() -> None:
    model = Stack()
    freeze_to(model, 2)
    opt = torch.optim.SGD(param_groups(model, 0.8, lr_mult=2.0, groups=["layers.0", "layers.1", "layers"]), lr=0.1)
    before = [list(g["params"]) for g in opt.param_groups]
    unfreeze(model)
    with pytest.raises(ArgumentError, match="groups="):
        add_unfrozen(model, opt)  # layer_groups(model) has another length
    assert [list(g["params"]) for g in opt.param_groups] == before


class WithEma(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        self.head = nn.Linear(3, 2)
        self.ema = copy.deepcopy(self.head)  # frozen copy registered after the head


def test_frozen_group_after_the_head_takes_no_rung() -> None:
    """Issue 10.2: a frozen EMA copy after the head must not shift the ladder (head gets lr)."""
    model = freeze(WithEma(), "ema")
    groups = param_groups(model, 1.0, lr_mult=2.0, groups=["blocks.0", "blocks.1", "head", "ema"])
    assert {g["name"]: g["lr"] for g in groups} == {"group0": 0.25, "group1": 0.5, "group2": 1.0}
    groups = param_groups(model, 1.0, lr_mult=(0.01, 1.0), groups=["blocks.0", "blocks.1", "head", "ema"])
    assert {g["name"]: g["lr"] for g in groups}["group2"] == 1.0


def test_added_group_starts_at_the_current_lr_after_decay() -> None:
    """Issue 15.2: after a StepLR decay the new backbone group must not train 3x faster than the head."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    freeze(model, "0")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    s = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)
    for _ in range(3):
        opt.step()
        s.step()
    unfreeze(model, "0")
    add_unfrozen(model, opt, scheduler=s)
    head, backbone = (g["lr"] for g in opt.param_groups)
    assert backbone == head == pytest.approx(0.1 * 0.7**3)
    assert opt.param_groups[1]["initial_lr"] == 0.1
    opt.step()
    s.step()
    assert s.get_last_lr()[1] == pytest.approx(0.1 * 0.7**4)


def test_add_unfrozen_warns_when_a_scheduler_is_attached_but_not_passed() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    freeze(model, "0")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    unfreeze(model, "0")
    with pytest.warns(UserWarning, match="scheduler="):
        add_unfrozen(model, opt)


def test_add_unfrozen_lr_is_exact_and_without_param_groups_copies_the_groups() -> None:
    model = Stack()
    freeze_to(model, 3)
    opt = torch.optim.AdamW([{"params": list(model.head.parameters()), "lr": 0.3, "weight_decay": 0.02}])
    unfreeze(model, "layers.2")
    add_unfrozen(model, opt)
    new = opt.param_groups[-2:]
    assert [g["name"] for g in new] == ["unfrozen0", "unfrozen0/no_decay"]
    assert [g["lr"] for g in new] == [0.3, 0.3] and [g["weight_decay"] for g in new] == [0.02, 0.0]
    unfreeze(model, "layers.1")
    add_unfrozen(model, opt, lr=1e-5)
    assert opt.param_groups[-1]["name"] == "unfrozen1/no_decay" and opt.param_groups[-1]["lr"] == 1e-5
    assert check(model, opt) == []


def test_add_unfrozen_new_parameters_really_train() -> None:
    model = Stack()
    freeze(model, "layers")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    unfreeze(model, "layers.2")
    add_unfrozen(model, opt)
    before = model.get_parameter("layers.2.weight").detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.get_parameter("layers.2.weight"))
    assert model.layers[0].weight.grad is None


@pytest.mark.parametrize(
    "make_opt, lr, error, match",
    [
        pytest.param(lambda m: torch.optim.LBFGS(m.head.parameters()), None, ArgumentError, "LBFGS", id="lbfgs"),
        pytest.param(
            lambda m: torch.optim.SGD(m.head.parameters(), lr=0.1), -1.0, ArgumentError, "lr=-1.0", id="bad-lr"
        ),
        pytest.param(lambda m: "sgd", None, ArgumentTypeError, "Optimizer", id="not-an-optimizer"),
    ],
)
def test_add_unfrozen_bad_input_leaves_optimizer_alone(make_opt: Any, lr: Any, error: Any, match: str) -> None:
    model = Stack()
    opt = make_opt(model)
    groups_before = None if isinstance(opt, str) else [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(error, match=match):
        add_unfrozen(model, opt, lr=lr)
    if groups_before is not None:
        assert [list(g["params"]) for g in opt.param_groups] == groups_before


def test_invariant_after_add_unfrozen_optimizer_holds_exactly_trainable_plus_old() -> None:
    model = Net()
    freeze(model, "backbone")
    opt = torch.optim.Adam(param_groups(model, 1e-3))
    for sel in ("backbone.4", "backbone.1", "backbone.0"):
        unfreeze(model, sel)
        add_unfrozen(model, opt)
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert {id(p) for _, p in trainable_parameters(model)} <= held
        assert not [p for p in check(model, opt) if p.code == "trainable-not-in-optimizer"]


# ------------------------------------------------------------------ invariants

from hypothesis import given, settings
from hypothesis import strategies as st

_PARTS = ["layers.0", "layers.1", "layers.2", "norm", "head", "layers.1.bias", "head.weight"]


@settings(max_examples=50, deadline=None)
@given(
    frozen=st.lists(st.sampled_from(_PARTS), unique=True, max_size=4),
    groups=st.one_of(st.none(), st.lists(st.sampled_from(_PARTS), min_size=1, max_size=4)),
    weight_decay=st.sampled_from([0.0, 0.1]),
    lr_mult=st.sampled_from([None, 2.0, (0.1, 1.0)]),
)
def test_groups_hold_each_trainable_parameter_exactly_once(
    frozen: list[str], groups: list[str] | None, weight_decay: float, lr_mult: Any
) -> None:
    model = Stack()
    if frozen:
        freeze(model, *frozen)
    trainable = {id(p) for _, p in trainable_parameters(model)}
    if not trainable:
        return
    result = param_groups(model, 0.1, weight_decay=weight_decay, lr_mult=lr_mult, groups=groups)
    ids = _ids(result)
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert all(g["params"] for g in result)
    assert all(g["lr"] <= 0.1 + 1e-12 for g in result)
    torch.optim.AdamW(result)  # any optimizer accepts it


def test_add_unfrozen_with_the_0_1_argument_order_names_the_swap() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(ArgumentTypeError, match="swapped"):
        add_unfrozen(opt, model)  # type: ignore[arg-type]
    assert len(opt.param_groups) == 1


def test_param_groups_non_module_is_a_type_error() -> None:
    with pytest.raises(ArgumentTypeError, match=r"param_groups\(model="):
        param_groups([nn.Linear(2, 2)], 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("groups", "error"),
    [("bert", ArgumentTypeError), (5, ArgumentTypeError), ([], ArgumentError)],
    ids=["string", "int", "empty"],
)
def test_add_unfrozen_refuses_groups_of_the_wrong_kind_before_changing_anything(groups, error) -> None:
    model = Stack()
    opt = torch.optim.SGD(param_groups(model, 0.1, lr_mult=2.0), lr=0.1)
    before = [list(g["params"]) for g in opt.param_groups]
    unfreeze(model)
    with pytest.raises(error, match=r"add_unfrozen\(groups="):
        add_unfrozen(model, opt, groups=groups)
    assert [list(g["params"]) for g in opt.param_groups] == before


# ------------------------------------------------------------------------------ drop_frozen


def test_drop_frozen_removes_frozen_parameters_and_their_state_by_identity_keeping_the_groups() -> None:
    model, other = Stack(), nn.Linear(3, 3)
    opt = torch.optim.AdamW([*param_groups(model, 0.1, weight_decay=0.1), {"params": list(other.parameters())}])
    model(torch.randn(4, 3)).sum().backward()
    other(torch.randn(4, 3)).sum().backward()
    opt.step()
    lists = [g["params"] for g in opt.param_groups]
    freeze(model, "layers")
    freeze(other)  # another model's frozen parameters: not this call's business
    removed = drop_frozen(model, opt)
    assert sorted(removed) == [f"layers.{i}.{k}" for i in range(3) for k in ("bias", "weight")]
    assert [g["params"] for g in opt.param_groups] == lists and len(opt.param_groups) == 3  # same lists, emptied
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in [*model.norm.parameters(), *model.head.parameters(), *other.parameters()]}
    assert {id(p) for p in opt.state} == held
    assert drop_frozen(model, opt) == []  # idempotent
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # an emptied group steps fine
    assert check(model, opt) == []


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        pytest.param(lambda m, o: drop_frozen([m], o), ArgumentTypeError, "drop_frozen(model=", id="not-a-module"),
        pytest.param(
            lambda m, o: drop_frozen(m, "adam"), ArgumentTypeError, "drop_frozen(optimizer=", id="not-an-optimizer"
        ),
        pytest.param(
            lambda m, o: drop_frozen(m, torch.optim.LBFGS(m.parameters())), ArgumentError, "LBFGS", id="lbfgs"
        ),
    ],
)
def test_drop_frozen_refuses_bad_arguments_before_changing_anything(call: Any, error: Any, words: str) -> None:
    model = freeze(Stack(), "layers")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(error, match=re.escape(words)):
        call(model, opt)
    assert [list(g["params"]) for g in opt.param_groups] == before
