"""ProgressiveFreezing: schedules (dict, FreezeOut, gradient-norm criterion), optimizer sync, exact resume, errors."""

from __future__ import annotations

import copy
import gc
import io
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from _helpers import requires_grad_map
from torchfreeze import (
    GradualUnfreezing,
    ProgressiveFreezing,
    check,
    freeze,
    freeze_state,
    guard,
    param_groups,
    pinned_modes,
)
from torchfreeze.errors import (
    ArgumentError,
    ArgumentTypeError,
    FreezeStateError,
    SelectorError,
    SharedParameterError,
)

GROUPS = ["layers.0", "layers.1", "layers.2", "head"]


class Stack(nn.Module):
    """Four layer groups: layers.0, layers.1, layers.2 (Linear, LayerNorm, Dropout), head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Dropout(0.1)) for _ in range(3)]
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> Any:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _data(unit: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + 10 * unit + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


def _train_unit(model: nn.Module, opt: torch.optim.Optimizer, unit: int, steps: range, lr: Any = None) -> None:
    for s in steps:
        torch.manual_seed(unit * 100 + s)  # dropout in the trainable part: same masks in both runs
        x, y = _data(unit, s)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if lr is not None:
            lr.step()


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _held(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    return (
        requires_grad_map(model),
        _held(model, opt),
        pinned_modes(model),
        [m.training for m in model.modules()],
        len(opt.state),
    )


# ------------------------------------------------------------------------------ schedules


def test_dict_schedule_freezes_at_least_k_groups_front_to_back_and_never_unfreezes() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"schedule\[4\]=1"):
        sched = ProgressiveFreezing(model, opt, {1: 1, 3: 2, 4: 1})  # the 4: 1 entry cannot unfreeze
    seen = [sched.frozen_groups]
    for _ in range(5):
        sched.step()
        seen.append(sched.frozen_groups)
    assert seen == [0, 1, 1, 2, 2, 2]
    assert requires_grad_map(model)["layers.1.0.weight"] is False
    assert requires_grad_map(model)["layers.2.0.weight"] is True
    assert sched.last == 5


@pytest.mark.parametrize(
    ("name", "t0", "power"),
    [("freezeout", None, 1), ("freezeout", 0.3, 1), ("freezeout-cubic", None, 3), ("freezeout-cubic", 0.6, 3)],
    ids=["linear-default", "linear-0.3", "cubic-default", "cubic-0.6"],
)
def test_freezeout_freezes_group_i_at_t_i_times_total(name: str, t0: Any, power: int) -> None:
    total, n = 20, len(GROUPS)
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ProgressiveFreezing(model, opt, name, total=total, t0=t0)  # type: ignore[arg-type]
    start = {"freezeout": 0.5, "freezeout-cubic": 0.8}[name] if t0 is None else t0
    expected = [(start + (1 - start) * i / (n - 1)) ** power * total for i in range(n - 1)]  # the head never
    assert sched.milestones == pytest.approx(expected, rel=1e-12)
    for count in range(1, total + 3):
        sched.step()
        assert sched.frozen_groups == sum(1 for m in expected if count >= m), count
    assert sched.frozen_groups == n - 1 and not requires_grad_map(model)["layers.2.0.weight"]
    assert requires_grad_map(model)["head.weight"]  # the head trains to the end


def test_freeze_last_true_lets_the_schedule_freeze_the_head() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ProgressiveFreezing(model, opt, {2: 4}, freeze_last=True)
    sched.step()
    sched.step()
    assert sched.frozen_groups == 4 and not any(requires_grad_map(model).values())
    assert _held(model, opt) == [[]]


def _set_grads(model: nn.Module, scale: dict[str, float]) -> None:
    for name, p in model.named_parameters():
        group = next(g for g in GROUPS if name.startswith(g + "."))
        p.grad = torch.full_like(p, scale[group]) if p.requires_grad else None


def test_grad_norm_freezes_the_frontmost_group_whose_gradient_norm_settled() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the test drives the gradients
    sched = ProgressiveFreezing(model, opt, "grad_norm", threshold=0.05)
    intervals = [
        {"layers.0": 1.0, "layers.1": 1.0, "layers.2": 1.0, "head": 1.0},
        {"layers.0": 1.01, "layers.1": 2.0, "layers.2": 1.0, "head": 1.0},  # layers.0 settled, layers.1 not
        {"layers.0": 1.0, "layers.1": 2.02, "layers.2": 5.0, "head": 1.0},  # layers.1 settled, layers.2 not
        {"layers.0": 1.0, "layers.1": 9.0, "layers.2": 5.1, "head": 1.0},  # layers.2 settled (head: never)
    ]
    seen = []
    for scales in intervals:
        for _ in range(3):  # three optimizer steps per interval: only the hook sees them
            _set_grads(model, scales)
            opt.step()
        sched.step()
        seen.append(sched.frozen_groups)
    assert seen == [0, 1, 2, 3]
    assert _held(model, opt) == [["head.weight", "head.bias"]]


def test_grad_norm_cascades_and_waits_for_the_groups_before() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = ProgressiveFreezing(model, opt, "grad_norm", threshold=0.05)
    for scales in (
        {"layers.0": 3.0, "layers.1": 1.0, "layers.2": 1.0, "head": 1.0},
        {"layers.0": 1.0, "layers.1": 1.0, "layers.2": 1.0, "head": 1.0},  # 1, 2 settled, 0 not: nothing
        {"layers.0": 1.0, "layers.1": 1.0, "layers.2": 1.0, "head": 1.0},  # 0 settled: 0, 1, 2 freeze at once
    ):
        _set_grads(model, scales)
        opt.step()
        sched.step()
    assert sched.frozen_groups == 3


def test_grad_norm_needs_optimizer_steps_and_a_previous_interval() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = ProgressiveFreezing(model, opt, "grad_norm")
    assert sched.threshold == 0.1
    for _ in range(3):
        sched.step()  # no optimizer step in between: no statistics, nothing freezes
    _set_grads(model, dict.fromkeys(GROUPS, 1.0))
    opt.step()
    sched.step()  # one interval only: no change to measure yet
    assert sched.frozen_groups == 0
    previous = sched.state_dict()["criterion"]["previous"]
    assert previous[:3] == pytest.approx([54**0.5] * 3)  # Linear(6, 6) + LayerNorm(6): 54 gradients of 1.0
    assert previous[3] is None  # the head is never a candidate


def test_the_criterion_hook_goes_away_with_the_scheduler() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ProgressiveFreezing(model, opt, "grad_norm")
    assert len(opt._optimizer_step_pre_hooks) == 1
    del sched
    gc.collect()
    assert len(opt._optimizer_step_pre_hooks) == 0


# ------------------------------------------------------------------------------ what freezing does


def test_frozen_groups_leave_the_optimizer_with_their_state_and_stay_bit_identical() -> None:
    model = Stack()
    opt = torch.optim.AdamW(param_groups(model, 1e-2, weight_decay=0.1), lr=1e-2)  # two groups
    n_groups = len(opt.param_groups)
    sched = ProgressiveFreezing(model, opt, {2: 1, 4: 3})
    frozen_at: dict[str, torch.Tensor] = {}
    with guard(model, opt) as g:
        for unit in range(6):
            _train_unit(model, opt, unit, range(2))
            sched.step()
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    frozen_at.setdefault(name, p.detach().clone())
                    assert p.grad is None
    assert g.checks > 0
    assert len(opt.param_groups) == n_groups  # groups kept, only emptied of frozen parameters
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in opt.state} <= held  # moments of frozen parameters deleted
    for name, before in frozen_at.items():
        assert torch.equal(model.get_parameter(name), before), name
    assert check(model, opt) == []


def test_the_frozen_prefix_is_pinned_to_eval_and_mode_none_leaves_modes_alone() -> None:
    model = Stack()
    sched = ProgressiveFreezing(model, torch.optim.SGD(model.parameters(), lr=0.1), {1: 2})
    sched.step()
    model.train()
    assert [m.training for i in (0, 1) for m in model.layers[i].modules()] == [False] * 8
    assert all(m.training for m in model.layers[2].modules()) and model.head.training
    plain = Stack()
    sched = ProgressiveFreezing(plain, torch.optim.SGD(plain.parameters(), lr=0.1), {1: 2}, mode=None)
    sched.step()
    assert pinned_modes(plain) == {} and all(m.training for m in plain.train().modules())


@pytest.mark.parametrize(
    "make_lr",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40),
    ],
    ids=["lambda-lr", "one-cycle"],
)
def test_an_attached_lr_scheduler_keeps_stepping_the_same_curve(make_lr: Callable[[Any], Any]) -> None:
    def run(progressive: bool) -> list[list[float]]:
        model = Stack()
        opt = torch.optim.SGD(param_groups(model, 0.05, lr_mult=2.0, groups=GROUPS), momentum=0.9)
        lr = make_lr(opt)
        sched = ProgressiveFreezing(model, opt, {1: 1, 2: 3}) if progressive else None
        lrs = []
        for unit in range(5):
            _train_unit(model, opt, unit, range(3), lr)
            lrs.append([g["lr"] for g in opt.param_groups])
            if sched is not None:
                sched.step()
        if sched is not None:
            assert sched.frozen_groups == 3 and len(opt.param_groups) == 4
        return lrs

    assert run(progressive=True) == run(progressive=False)


# ------------------------------------------------------------------------------ resume


def _build(schedule: Any, seed: int = 0, **options: Any) -> Any:
    model = Stack(seed)
    opt = torch.optim.AdamW(param_groups(model, 1e-2, weight_decay=0.01))
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.97**k)
    sched = ProgressiveFreezing(model, opt, schedule, **options)
    return model, opt, lr, sched


RESUME = {
    "dict": ({1: 1, 3: 2, 5: 3}, {}),
    "freezeout-cubic": ("freezeout-cubic", {"total": 6, "t0": 0.7}),
    "grad-norm": ("grad_norm", {"threshold": 0.25}),
}
N_UNITS, STEPS = 8, 3


def _run(parts: Any, units: range, stop_step: int | None = None) -> None:
    model, opt, lr, sched = parts
    for unit in units:
        steps = range(STEPS) if stop_step is None or unit != units[-1] else range(stop_step)
        _train_unit(model, opt, unit, steps, lr)
        if stop_step is None or unit != units[-1]:
            sched.step()


@pytest.mark.parametrize("stop", [(1, None), (3, None), (4, 1)], ids=["after-1", "after-3", "mid-unit-4"])
@pytest.mark.parametrize("kind", list(RESUME), ids=list(RESUME))
def test_resume_is_bit_identical_to_an_uninterrupted_run(kind: str, stop: tuple[int, int | None]) -> None:
    schedule, options = RESUME[kind]
    ref = _build(schedule, **options)
    _run(ref, range(N_UNITS))
    history = ref[3].frozen_groups
    assert history >= 2, "the schedule should have frozen something for the test to mean anything"

    units, mid = stop
    part = _build(schedule, **options)
    _run(part, range(units + (1 if mid is not None else 0)), stop_step=mid)
    saved = _roundtrip(
        {
            "model": part[0].state_dict(),
            "optimizer": part[1].state_dict(),
            "lr": part[2].state_dict(),
            "scheduler": part[3].state_dict(),
        }
    )
    del part
    fresh = _build(schedule, seed=123, **options)  # fresh objects, another initialisation
    model, opt, lr, sched = fresh
    model.load_state_dict(saved["model"])
    sched.load_state_dict(saved["scheduler"])  # freeze state back, frozen parameters out of the optimizer
    opt.load_state_dict(saved["optimizer"])
    lr.load_state_dict(saved["lr"])
    if mid is not None:
        _train_unit(model, opt, units, range(mid, STEPS), lr)
        sched.step()
        units += 1
    _run(fresh, range(units, N_UNITS))

    assert requires_grad_map(model) == requires_grad_map(ref[0])
    assert _held(model, opt) == _held(ref[0], ref[1])
    assert sched.state_dict() == ref[3].state_dict()
    for (name, a), (_, b) in zip(ref[0].state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref[1].param_groups]


def test_the_grad_norm_run_resumed_without_the_scheduler_state_diverges() -> None:
    """What the resume test guards against: a fresh scheduler forgets the criterion's last interval."""
    schedule, options = RESUME["grad-norm"]
    ref = _build(schedule, **options)
    _run(ref, range(N_UNITS))
    part = _build(schedule, **options)
    _run(part, range(3))
    fresh = _build(schedule, **options)
    fresh[0].load_state_dict(part[0].state_dict())
    fresh[3].load_state_dict(part[3].state_dict())
    fresh[1].load_state_dict(part[1].state_dict())
    fresh[3]._previous = [None] * 4  # lose the statistics only
    _run(fresh, range(3, N_UNITS))
    assert fresh[3].state_dict()["criterion"] != ref[3].state_dict()["criterion"]
    changed = [
        n for (n, a), (_, b) in zip(ref[0].state_dict().items(), fresh[0].state_dict().items()) if not torch.equal(a, b)
    ]
    assert changed  # a group froze one interval late: its weights moved once more


DECREASING = {
    "below-the-one-before": ({1: 2, 3: 1}, "schedule[3]=1", "schedule[1]=2"),
    "below-an-earlier-one": ({0: 2, 2: 2, 5: 0}, "schedule[5]=0", "schedule[0]=2"),
    "keys-out-of-order": ({4: 1, 2: 2}, "schedule[4]=1", "schedule[2]=2"),
}


@pytest.mark.parametrize("case", list(DECREASING), ids=list(DECREASING))
def test_a_dict_entry_below_an_earlier_one_warns_that_groups_never_unfreeze(case: str) -> None:
    schedule, entry, earlier = DECREASING[case]
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning) as record:
        sched = ProgressiveFreezing(model, opt, schedule)
    message = str(record[0].message)
    assert len(record) == 1 and record[0].filename == __file__, message  # points at the caller's line
    assert entry in message and earlier in message and "never unfreeze" in message, message
    most = 0
    for count in range(1, 7):  # the entry is a no-op: the count of frozen groups never goes down
        sched.step()
        most = max([most, *(v for k, v in schedule.items() if k <= count)])
        assert sched.frozen_groups == most, (count, sched.frozen_groups)


@pytest.mark.parametrize("schedule", [{1: 1, 3: 2}, {1: 1, 3: 1}, {2: 1, 0: 0}], ids=["rising", "flat", "zero-first"])
def test_a_dict_schedule_that_never_goes_down_does_not_warn(schedule: dict[int, int]) -> None:
    model = Stack()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProgressiveFreezing(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule)


# ------------------------------------------------------------------------------ errors


def _model_opt() -> tuple[Stack, torch.optim.Optimizer]:
    model = Stack()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


BAD_ARGUMENTS: dict[str, tuple[Callable[[nn.Module, Any], Any], type[Exception], str]] = {
    "unknown-schedule-name": (lambda m, o: ProgressiveFreezing(m, o, "frezeout", total=3), ArgumentError, "schedule="),
    "schedule-of-wrong-type": (lambda m, o: ProgressiveFreezing(m, o, [1, 2]), ArgumentTypeError, "schedule="),  # type: ignore[arg-type]
    "int-schedule": (lambda m, o: ProgressiveFreezing(m, o, 2), ArgumentTypeError, "schedule="),  # type: ignore[arg-type]
    "empty-dict": (lambda m, o: ProgressiveFreezing(m, o, {}), ArgumentError, "empty"),
    "freezes-the-head": (lambda m, o: ProgressiveFreezing(m, o, {1: 4}), ArgumentError, "freeze_last=True"),
    "more-groups-than-exist": (
        lambda m, o: ProgressiveFreezing(m, o, {1: 5}, freeze_last=True),
        ArgumentError,
        "there are 4",
    ),
    "negative-key": (lambda m, o: ProgressiveFreezing(m, o, {-1: 1}), ArgumentError, "negative"),
    "negative-count": (lambda m, o: ProgressiveFreezing(m, o, {1: -1}), ArgumentError, "negative"),
    "string-key": (lambda m, o: ProgressiveFreezing(m, o, {"1": 1}), ArgumentTypeError, "int keys"),  # type: ignore[dict-item]
    "selector-value": (lambda m, o: ProgressiveFreezing(m, o, {1: "layers.0"}), ArgumentTypeError, "int values"),  # type: ignore[dict-item]
    "threshold-string": (
        lambda m, o: ProgressiveFreezing(m, o, "grad_norm", threshold="0.1"),  # type: ignore[arg-type]
        ArgumentTypeError,
        "threshold=",
    ),
    "threshold-negative": (
        lambda m, o: ProgressiveFreezing(m, o, "grad_norm", threshold=-1.0),
        ArgumentError,
        "threshold=",
    ),
    "threshold-for-a-dict": (
        lambda m, o: ProgressiveFreezing(m, o, {1: 1}, threshold=0.1),
        ArgumentError,
        "threshold=",
    ),
    "total-missing": (lambda m, o: ProgressiveFreezing(m, o, "freezeout"), ArgumentError, "total="),
    "total-string": (lambda m, o: ProgressiveFreezing(m, o, "freezeout", total="10"), ArgumentTypeError, "total="),  # type: ignore[arg-type]
    "total-zero": (lambda m, o: ProgressiveFreezing(m, o, "freezeout", total=0), ArgumentError, "total="),
    "t0-above-one": (lambda m, o: ProgressiveFreezing(m, o, "freezeout", total=4, t0=1.5), ArgumentError, "t0="),
    "t0-for-grad-norm": (lambda m, o: ProgressiveFreezing(m, o, "grad_norm", t0=0.5), ArgumentError, "t0="),
    "interval": (lambda m, o: ProgressiveFreezing(m, o, {1: 1}, interval="batch"), ArgumentError, "interval="),  # type: ignore[arg-type]
    "mode-value": (lambda m, o: ProgressiveFreezing(m, o, {1: 1}, mode="frozen"), ArgumentError, "mode="),  # type: ignore[arg-type]
    "mode-type": (lambda m, o: ProgressiveFreezing(m, o, {1: 1}, mode=1), ArgumentTypeError, "mode="),  # type: ignore[arg-type]
    "freeze-last-type": (
        lambda m, o: ProgressiveFreezing(m, o, {1: 1}, freeze_last="yes"),  # type: ignore[arg-type]
        ArgumentTypeError,
        "freeze_last=",
    ),
    "shared": (lambda m, o: ProgressiveFreezing(m, o, {1: 1}, shared="all"), ArgumentError, "shared="),  # type: ignore[arg-type]
    "groups-empty": (lambda m, o: ProgressiveFreezing(m, o, {1: 1}, groups=[]), ArgumentError, "groups="),
    "groups-string": (lambda m, o: ProgressiveFreezing(m, o, {1: 1}, groups="layers"), ArgumentTypeError, "groups="),
    "groups-typo": (
        lambda m, o: ProgressiveFreezing(m, o, {1: 1}, groups=["layer.0", "head"]),
        SelectorError,
        "groups",
    ),
    "one-group-freezeout": (
        lambda m, o: ProgressiveFreezing(m, o, "freezeout", total=3, groups=["head"]),
        ArgumentError,
        "groups=",
    ),
    "optimizer-of-wrong-type": (lambda m, o: ProgressiveFreezing(m, "sgd", {1: 1}), ArgumentTypeError, "optimizer="),  # type: ignore[arg-type]
    "lbfgs": (
        lambda m, o: ProgressiveFreezing(m, torch.optim.LBFGS(m.parameters()), {1: 1}),
        ArgumentError,
        "LBFGS",
    ),
    "not-a-module": (lambda m, o: ProgressiveFreezing([m], o, {1: 1}), ArgumentTypeError, "model="),  # type: ignore[arg-type]
    "optimizer-of-another-model": (
        lambda m, o: ProgressiveFreezing(m, torch.optim.SGD(Stack(1).parameters(), lr=0.1), {1: 1}),
        ArgumentError,
        "optimizer=",
    ),
    "groups-repeated": (
        lambda m, o: ProgressiveFreezing(m, o, {1: 1}, groups=["layers.0", "layers.0", "head"]),
        ArgumentError,
        "groups=",
    ),
    "groups-nested": (
        lambda m, o: ProgressiveFreezing(m, o, {1: 1}, groups=["layers", "layers.1", "head"]),
        ArgumentError,
        "groups=",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS), ids=list(BAD_ARGUMENTS))
def test_bad_arguments_raise_a_library_error_naming_the_fix_and_change_nothing(case: str) -> None:
    model, opt = _model_opt()
    _train_unit(model, opt, 0, range(1))  # momentum state exists
    before = _snapshot(model, opt)
    call, error, words = BAD_ARGUMENTS[case]
    with pytest.raises(error) as info:
        call(model, opt)
    message = str(info.value)
    assert words in message and "Fix:" in message and len(message) < 600, message
    assert _snapshot(model, opt) == before


def test_an_optimizer_of_another_model_is_refused_and_neither_changes() -> None:
    model, other = Stack(), Stack(1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    _train_unit(other, opt, 0, range(1))
    before = (_snapshot(model, torch.optim.SGD(model.parameters(), lr=0.1)), _snapshot(other, opt))
    with pytest.raises(ArgumentError) as info:
        ProgressiveFreezing(model, opt, {1: 1})
    message = str(info.value)
    assert "optimizer=SGD" in message and "parameters of `model`" in message and "Fix:" in message, message
    assert (_snapshot(model, torch.optim.SGD(model.parameters(), lr=0.1)), _snapshot(other, opt)) == before
    assert all(p.requires_grad for p in model.parameters()) and len(opt.state) == len(list(other.parameters()))


def test_an_optimizer_holding_some_of_the_model_is_accepted() -> None:
    model = Stack()
    opt = torch.optim.SGD([*model.head.parameters(), *Stack(1).parameters()], lr=0.1)  # the head, and more
    ProgressiveFreezing(model, opt, {1: 1}).step()
    assert not requires_grad_map(model)["layers.0.0.weight"]


@pytest.mark.parametrize(
    ("groups", "path", "first", "second"),
    [
        (["layers.0", "layers.0", "head"], "layers.0.0.weight", "group 0 ('layers.0')", "group 1 ('layers.0')"),
        (["layers", "layers.1", "head"], "layers.1.0.weight", "group 0 ('layers')", "group 1 ('layers.1')"),
        (["layers.0", "head", "head"], "head.weight", "group 1 ('head')", "group 2 ('head')"),
    ],
    ids=["repeated", "nested", "repeated-head"],
)
def test_overlapping_groups_are_refused_naming_the_parameter_and_both_groups(
    groups: list[str], path: str, first: str, second: str
) -> None:
    model, opt = _model_opt()
    before = _snapshot(model, opt)
    with pytest.raises(ArgumentError) as info:
        ProgressiveFreezing(model, opt, {1: 1}, groups=groups)
    message = str(info.value)
    assert repr(path) in message and first in message and second in message and "Fix:" in message, message
    assert _snapshot(model, opt) == before


# one expectation and one example per number option, whatever was wrong with the value
OPTION_VALUES: dict[str, tuple[str, dict[str, Any], str, str, list[tuple[Any, type[Exception]]]]] = {
    "t0": (
        "freezeout",
        {"total": 4},
        "expected a fraction of training in (0, 1]",
        "Fix: pass e.g. t0=0.5.",
        [
            (float("nan"), ArgumentError),
            (float("inf"), ArgumentError),
            (0, ArgumentError),
            (-0.5, ArgumentError),
            (1.5, ArgumentError),
            ("0.5", ArgumentTypeError),
            (True, ArgumentTypeError),
            (torch.tensor(0.5), ArgumentTypeError),
        ],
    ),
    "threshold": (
        "grad_norm",
        {},
        "expected a relative change > 0",
        "Fix: pass e.g. threshold=0.1.",
        [
            (float("nan"), ArgumentError),
            (float("inf"), ArgumentError),
            (0.0, ArgumentError),
            (-1.0, ArgumentError),
            ("0.1", ArgumentTypeError),
            (False, ArgumentTypeError),
        ],
    ),
    "total": (
        "freezeout",
        {},
        "expected the length of training in units, an int >= 1",
        "Fix: pass e.g. total=10.",
        [(0, ArgumentError), (-3, ArgumentError), ("10", ArgumentTypeError), (10.0, ArgumentTypeError)],
    ),
}


@pytest.mark.parametrize(
    ("option", "index"),
    [(name, i) for name, (_, _, _, _, values) in OPTION_VALUES.items() for i in range(len(values))],
)
def test_every_error_of_a_number_option_says_the_same_expectation_and_example(option: str, index: int) -> None:
    schedule, extra, expected, fix, values = OPTION_VALUES[option]
    value, error = values[index]
    model, opt = _model_opt()
    before = _snapshot(model, opt)
    with pytest.raises((ArgumentError, ArgumentTypeError)) as info:  # the exact type is checked below
        ProgressiveFreezing(model, opt, schedule, **extra, **{option: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert type(info.value) is error, message
    assert message.startswith(f"ProgressiveFreezing({option}=") and expected in message and fix in message, message
    assert "1e-3" not in message  # not another option's example
    assert _snapshot(model, opt) == before


class Tied(nn.Module):
    """The first block's weight is tied to the third's: freezing one group alone would cut the tie."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(3)])
        self.layers[2].weight = self.layers[0].weight
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> Any:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_a_tie_across_a_reachable_boundary_is_refused_at_construction() -> None:
    groups = ["layers.0", "layers.1", "layers.2", "head"]
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _snapshot(model, opt)
    with pytest.raises(SharedParameterError, match=r"shared='freeze'"):
        ProgressiveFreezing(model, opt, "freezeout", total=4, groups=groups)
    assert _snapshot(model, opt) == before
    ProgressiveFreezing(model, opt, {2: 3}, groups=groups)  # the prefix that keeps both uses is fine
    sched = ProgressiveFreezing(model, opt, {1: 1}, groups=groups, shared="freeze")
    sched.step()
    assert not model.layers[2].weight.requires_grad and model.layers[2].bias.requires_grad


LOAD_ERRORS: dict[str, tuple[Callable[[dict[str, Any]], Any], type[Exception], str]] = {
    "not-a-dict": (lambda s: [s], ArgumentTypeError, "expected the dict"),
    "gradual-unfreezing-state": (
        lambda s: (lambda m: GradualUnfreezing(m, torch.optim.SGD(m.parameters(), lr=0.1), {1: 1}))(
            Stack()
        ).state_dict(),
        ArgumentError,
        "format",
    ),
    "other-schedule": (
        lambda s: {**s, "schedule": {**s["schedule"], "entries": [[1, 2]]}},
        ArgumentError,
        "same arguments",
    ),
    "negative-last": (lambda s: {**s, "last": -1}, ArgumentError, "last"),
    "frozen-out-of-range": (lambda s: {**s, "frozen": 4}, ArgumentError, "frozen"),
    "criterion-short": (lambda s: {**s, "criterion": {**s["criterion"], "sums": [0.0]}}, ArgumentError, "criterion"),
    "criterion-nan": (
        lambda s: {**s, "criterion": {**s["criterion"], "previous": [float("nan")] * 4}},
        ArgumentError,
        "criterion",
    ),
    "freeze-state-of-another-model": (
        lambda s: {**s, "freeze_state": freeze_state(freeze(nn.Linear(2, 2)))},
        FreezeStateError,
        "freeze_state",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS), ids=list(LOAD_ERRORS))
def test_load_state_dict_refuses_a_state_that_does_not_fit_and_changes_nothing(case: str) -> None:
    model, opt = _model_opt()
    sched = ProgressiveFreezing(model, opt, {1: 1, 2: 2})
    sched.step()
    state = copy.deepcopy(sched.state_dict())
    fresh, fresh_opt = _model_opt()
    target = ProgressiveFreezing(fresh, fresh_opt, {1: 1, 2: 2})
    before = (_snapshot(fresh, fresh_opt), target.state_dict())
    make, error, words = LOAD_ERRORS[case]
    with pytest.raises(error, match=words):
        target.load_state_dict(make(state))
    assert (_snapshot(fresh, fresh_opt), target.state_dict()) == before


# ------------------------------------------------------------------------------ distributed


def test_a_raw_live_ddp_is_refused(world_of_one: None) -> None:
    from torchfreeze.distributed import release

    model = Stack()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _snapshot(model, opt)
    with pytest.raises(ArgumentError, match=r"live DistributedDataParallel.*torchfreeze\.distributed\.wrap"):
        ProgressiveFreezing(ddp, opt, {1: 1})
    assert _snapshot(model, opt) == before
    release(ddp)


def test_through_a_wrap_handle_ddp_stops_reducing_the_frozen_groups(world_of_one: None) -> None:
    from torchfreeze.distributed import wrap

    model = Stack()
    handle = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ProgressiveFreezing(handle, opt, {1: 1, 2: 3})  # the handle is a module
    for unit in range(3):
        _train_unit(handle, opt, unit, range(2))
        sched.step()
    assert handle.rewraps == 2
    assert handle.reduced_names() == ["head.weight", "head.bias"]
    assert check(model, opt) == []
    handle.release()
