"""GradualUnfreezing: schedules, optimizer sync, exact resume."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import nn

from _helpers import requires_grad_map
from torchfreeze import GradualUnfreezing, check, freeze_state, freeze_to, layer_groups, load_freeze_state, param_groups
from torchfreeze.errors import ArgumentError, ArgumentTypeError, FreezeStateError, SelectorError


class Stack(nn.Module):
    """Four layer groups: layers.0, layers.1, layers.2, head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)) for _ in range(3)])
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> Any:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _data(unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + unit)
    return torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "adamw": lambda groups: torch.optim.AdamW(groups, weight_decay=0.01),
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=0.01),
}
SCHEDULES = {
    "preset": "one_group_per_epoch",
    "period-2": 2,
    "dict-selectors": {0: 1, 2: "layers.2", 3: ["layers.1", "layers.0"]},
}


def _build(opt_name: str, schedule: Any, seed: int = 0) -> Any:
    model = Stack(seed)
    freeze_to(model, -1)  # only the head trains at first
    opt = OPTIMIZERS[opt_name](param_groups(model, 1e-2, weight_decay=0.01))
    sched = GradualUnfreezing(model, opt, schedule, lr=5e-3)
    return model, opt, sched


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: GradualUnfreezing, units: Iterable[int]) -> Any:
    loss_fn = nn.CrossEntropyLoss()
    for unit in units:
        x, y = _data(unit)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _groups_structure(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        ({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]]) for g in opt.param_groups
    ]


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


N_UNITS = 7


@pytest.mark.parametrize("stop", [1, 2, 3, 5], ids=lambda k: f"stop-at-{k}")
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS), ids=list(OPTIMIZERS))
def test_resume_is_bit_identical_to_an_uninterrupted_run(opt_name: str, schedule: Any, stop: Any) -> None:
    ref_model, ref_opt, ref_sched = _build(opt_name, SCHEDULES[schedule])
    _train(ref_model, ref_opt, ref_sched, range(N_UNITS))

    model, opt, sched = _build(opt_name, SCHEDULES[schedule])
    _train(model, opt, sched, range(stop))
    saved = _roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "freeze": freeze_state(model),
        }
    )
    del model, opt, sched

    model2, opt2, sched2 = _build(opt_name, SCHEDULES[schedule], seed=123)  # fresh objects, other init
    model2.load_state_dict(saved["model"])
    sched2.load_state_dict(saved["scheduler"])  # restores the freeze state and the added groups
    opt2.load_state_dict(saved["optimizer"])
    assert freeze_state(model2) == saved["freeze"]
    _train(model2, opt2, sched2, range(stop, N_UNITS))

    assert requires_grad_map(model2) == requires_grad_map(ref_model)
    assert _groups_structure(model2, opt2) == _groups_structure(ref_model, ref_opt)
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name
    assert sched2.last == ref_sched.last == N_UNITS
    assert check(model2, opt2) == []


def test_naive_resume_without_scheduler_state_diverges() -> None:
    """The failure the resume test guards against: a fresh setup re-freezes what had been unfrozen."""
    model, opt, sched = _build("adamw", "one_group_per_epoch")
    _train(model, opt, sched, range(3))
    fresh, _, _ = _build("adamw", "one_group_per_epoch")
    assert requires_grad_map(fresh) != requires_grad_map(model)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        pytest.param("one_group_per_epoch", [1, 2, 3, 4, 4], id="preset"),
        pytest.param(2, [1, 1, 2, 2, 3], id="period-2"),
        pytest.param({1: 2, 3: 4}, [1, 2, 2, 4, 4], id="dict-counts"),
        pytest.param({2: "layers.1"}, [1, 1, 1, 1, 1], id="selector-not-contiguous"),
    ],
)
def test_schedule_semantics(schedule: Any, expected: Any) -> None:
    model = Stack()
    freeze_to(model, -1)
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    sched = GradualUnfreezing(model, opt, schedule)
    seen = []
    for _ in expected:
        seen.append(sched.trainable_groups)
        sched.step()
    assert seen == expected
    assert not [p for p in check(model, opt) if p.code == "trainable-not-in-optimizer"]


def test_selector_entry_unfreezes_it_and_adds_one_group_per_unfreeze() -> None:
    model = Stack()
    freeze_to(model, -1)
    opt = torch.optim.AdamW(param_groups(model, 1e-3, weight_decay=0.1), weight_decay=0.1)
    sched = GradualUnfreezing(model, opt, {1: "layers.1", 2: "layers.2"}, lr=1e-4)
    sched.step()
    assert model.get_parameter("layers.1.0.weight").requires_grad
    assert not model.get_parameter("layers.2.0.weight").requires_grad
    assert [g["name"] for g in opt.param_groups] == ["group0", "group0/no_decay", "unfrozen0", "unfrozen0/no_decay"]
    assert opt.param_groups[-1]["lr"] == 1e-4
    sched.step()
    assert [g["name"] for g in opt.param_groups][-2:] == ["unfrozen1", "unfrozen1/no_decay"]


def test_state_dict_is_plain_data() -> None:
    model, opt, sched = _build("adamw", "one_group_per_epoch")
    _train(model, opt, sched, range(2))
    state = _roundtrip(sched.state_dict())
    assert state["last"] == 2 and state["format"] == "torchfreeze.gradual_unfreezing"
    assert state["added_groups"][0]["params"] == ["layers.2.0.weight"]


@pytest.mark.parametrize(
    "schedule, groups, error, match",
    [
        pytest.param(
            {1: "layers.7"}, None, SelectorError, r"^GradualUnfreezing\(schedule='layers\.7'\)", id="unknown-selector"
        ),
        pytest.param({1: 9}, None, ArgumentError, "model has 4", id="group-count-too-large"),
        pytest.param({-1: 2}, None, ArgumentError, "key -1", id="negative-key"),
        pytest.param({"1": 2}, None, ArgumentTypeError, "key '1'", id="string-key"),
        pytest.param({1.5: 2}, None, ArgumentTypeError, r"key 1\.5 is a float", id="float-key"),
        pytest.param("one_layer_per_day", None, ArgumentError, "preset", id="unknown-preset"),
        pytest.param(0, None, ArgumentError, "period", id="period-zero"),
        pytest.param({}, None, ArgumentError, r"^GradualUnfreezing\(schedule=\{\}\): the dict is empty", id="empty"),
        pytest.param(None, None, ArgumentTypeError, r"^GradualUnfreezing\(schedule=None\): .*got NoneType", id="none"),
        pytest.param([1, 2], None, ArgumentTypeError, r"^GradualUnfreezing\(schedule=\[1, 2\]\)", id="list"),
        pytest.param(1.5, None, ArgumentTypeError, r"^GradualUnfreezing\(schedule=1\.5\)", id="float"),
        pytest.param(True, None, ArgumentTypeError, r"^GradualUnfreezing\(schedule=True\)", id="bool"),
        pytest.param(
            1, [], ArgumentError, r"^GradualUnfreezing\(groups=\[\]\): names no layer group", id="groups-empty"
        ),
        pytest.param(
            {1: 2}, ["layers.0", "nope"], SelectorError, r"^GradualUnfreezing\(groups='nope'\)", id="unknown-group"
        ),
        pytest.param(
            {1: 2}, "layers.0", ArgumentTypeError, r"^GradualUnfreezing\(groups='layers\.0'\)", id="groups-str"
        ),
        pytest.param({0: 3}, None, ArgumentError, "lr=-1.0", id="bad-lr-with-entry-at-0"),
    ],
)
def test_bad_schedule_raises_and_changes_nothing(
    schedule: Any, groups: Any, error: type[Exception], match: str
) -> None:
    model = Stack()
    freeze_to(model, -1)
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    before = requires_grad_map(model), len(opt.param_groups)
    lr = -1.0 if "lr" in match else None
    with pytest.raises(error, match=match) as caught:
        GradualUnfreezing(model, opt, schedule, groups=groups, lr=lr)
    assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    assert "Fix:" in str(caught.value) and len(str(caught.value)) < 600
    assert "schedule=" not in str(caught.value) or "groups=" not in match  # the argument at fault is named
    assert (requires_grad_map(model), len(opt.param_groups)) == before


def test_step_that_the_optimizer_cannot_follow_changes_nothing() -> None:
    model = Stack()
    freeze_to(model, -1)
    opt = torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad])  # cannot take new groups
    sched = GradualUnfreezing(model, opt, "one_group_per_epoch")
    before = requires_grad_map(model), len(opt.param_groups), sched.last, freeze_state(model)
    with pytest.raises(ArgumentError, match="LBFGS"):
        sched.step()
    assert (requires_grad_map(model), len(opt.param_groups), sched.last, freeze_state(model)) == before


def test_layer_groups_of_the_test_model() -> None:
    assert layer_groups(Stack()) == [["layers.0"], ["layers.1"], ["layers.2"], ["head"]]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        pytest.param(lambda s: s.update(format="x"), ArgumentError, "state_dict", id="wrong-format"),
        pytest.param(lambda s: s.update(schedule_keys=[0, 5]), ArgumentError, "schedule keys", id="other-schedule"),
        pytest.param(lambda s: s["freeze_state"]["frozen"].append("encoder.weight"), FreezeStateError, "encoder.weight",
                     id="other-architecture"),
        pytest.param(lambda s: s.update(last=-3), ArgumentError, "last", id="negative-count"),
        pytest.param(lambda s: s.pop("freeze_state"), FreezeStateError, "freeze_state", id="no-freeze-state"),
        pytest.param(lambda s: s.update(added_groups=[{"params": 3}]), ArgumentError, "added_groups",
                     id="malformed-added-groups"),
        pytest.param(lambda s: s.update(version=99), ArgumentError, r"state\['version'\]=99: .*Fix: ",
                     id="unknown-version"),
        pytest.param(lambda s: s.update(version=True), ArgumentError, r"state\['version'\]=True", id="bool-version"),
    ],
)  # fmt: skip
def test_bad_scheduler_state_changes_nothing(mutate: Any, error: Any, match: str) -> None:
    model, opt, sched = _build("adamw", "one_group_per_epoch")
    _train(model, opt, sched, range(2))
    state = _roundtrip(sched.state_dict())
    mutate(state)
    model2, opt2, sched2 = _build("adamw", "one_group_per_epoch")
    before = requires_grad_map(model2), len(opt2.param_groups), sched2.last
    with pytest.raises(error, match=match) as caught:
        sched2.load_state_dict(state)
    assert isinstance(caught.value, ValueError) and "Fix" in str(caught.value)
    assert (requires_grad_map(model2), len(opt2.param_groups), sched2.last) == before


#: what is not a scheduler state at all: a wrong type, whatever its value
NOT_A_SCHEDULER_STATE = [
    pytest.param(None, "NoneType", id="none"),
    pytest.param([], "list", id="list"),
    pytest.param("state.pt", "str", id="path"),
]


@pytest.mark.parametrize(("state", "kind"), NOT_A_SCHEDULER_STATE)
def test_scheduler_state_of_the_wrong_type(state: Any, kind: str) -> None:
    model, opt, sched = _build("adamw", "one_group_per_epoch")
    before = requires_grad_map(model), len(opt.param_groups), sched.last
    with pytest.raises(ArgumentTypeError) as caught:
        sched.load_state_dict(state)
    message = str(caught.value)
    assert isinstance(caught.value, TypeError)
    assert message.startswith("GradualUnfreezing.load_state_dict(state=") and f"got {kind}. Fix: " in message
    assert (requires_grad_map(model), len(opt.param_groups), sched.last) == before


def test_optimizer_state_must_be_loaded_after_the_scheduler() -> None:
    model, opt, sched = _build("adamw", "one_group_per_epoch")
    _train(model, opt, sched, range(2))
    saved = _roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
    _, opt2, sched2 = _build("adamw", "one_group_per_epoch")
    with pytest.raises(ValueError, match="parameter groups"):
        opt2.load_state_dict(saved["opt"])  # too early: the unfrozen groups do not exist yet
    sched2.load_state_dict(saved["sched"])
    opt2.load_state_dict(saved["opt"])


def test_freeze_state_alone_restores_the_map() -> None:
    model, opt, sched = _build("adamw", 1)
    _train(model, opt, sched, range(2))
    fresh = Stack()
    load_freeze_state(fresh, freeze_state(model))
    assert requires_grad_map(fresh) == requires_grad_map(model)


def test_tied_model_needs_shared_policy_and_keeps_tie_frozen_until_both_groups_unfreeze() -> None:
    from _helpers import TiedLM
    from torchfreeze.errors import SharedParameterError

    model = TiedLM()
    groups = [["embed"], ["body"], ["lm_head"]]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(SharedParameterError):
        GradualUnfreezing(model, optimizer, "one_group_per_epoch", groups=groups)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    schedule = GradualUnfreezing(model, optimizer, "one_group_per_epoch", groups=groups, shared="freeze")
    assert not model.lm_head.weight.requires_grad  # tied to the still-frozen embedding
    schedule.step()
    assert all(p.requires_grad for p in model.body.parameters()) and not model.embed.weight.requires_grad
    schedule.step()
    assert model.embed.weight.requires_grad


@pytest.mark.parametrize(
    "model, optimizer, match",
    [
        pytest.param(lambda: [nn.Linear(2, 2)], lambda m: "sgd", r"GradualUnfreezing\(model=", id="not-a-module"),
        pytest.param(Stack, lambda m: "sgd", r"GradualUnfreezing\(optimizer=", id="not-an-optimizer"),
    ],
)
def test_wrong_types_are_type_errors(model: nn.Module, optimizer: Any, match: str) -> None:
    built = model()
    with pytest.raises(ArgumentTypeError, match=match):
        GradualUnfreezing(built, optimizer(built), "one_group_per_epoch")


def test_unknown_shared_policy_is_refused_before_anything_changes() -> None:
    model = freeze_to(Stack(), -1)
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    before = requires_grad_map(model)
    with pytest.raises(ArgumentError, match="shared"):
        GradualUnfreezing(model, opt, "one_group_per_epoch", shared="share")  # type: ignore[arg-type]
    assert requires_grad_map(model) == before


def test_overlapping_groups_are_refused_and_nothing_changes() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    before = requires_grad_map(model)
    with pytest.raises(ArgumentError, match=r"GradualUnfreezing\(groups=.*is in group 0 .* and in group 1"):
        GradualUnfreezing(model, torch.optim.SGD(model.parameters(), lr=0.1), {1: 1}, groups=["0", "0", "2"])
    assert requires_grad_map(model) == before
