"""Unfreezing while an LR scheduler runs (issue 10.1), at the current lr (15.2), with warm-up (15.3).

The reference for every scheduler is a *twin* run whose optimizer held the backbone group from
the start with the base lr the ladder gives it: after ``add_unfrozen(..., scheduler=)`` the new
group's lr (and momentum, for the cycling schedulers) must be the twin's, now and at every later
step. The table fails when torch adds a scheduler class it does not list.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as L

from torchfreeze import GradualUnfreezing, add_unfrozen, freeze, is_frozen, param_groups, unfreeze
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.training.schedulers import warmup_factor

Factory = Callable[[torch.optim.Optimizer, list[float]], Any]
Stepper = Callable[[Any, int], None]

HEAD_LR, RATIO = 0.1, 2.0  # param_groups(m, 0.1, lr_mult=2.0): head 0.1, backbone 0.05


def _plain_step(s: Any, i: int) -> None:
    s.step()


def _plateau_step(s: Any, i: int) -> None:
    s.step(1.0)  # a metric that never improves: reduce every step (patience=0)


def _linear_warmup(opt: torch.optim.Optimizer, lrs: list[float]) -> Any:
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=12)  # type: ignore[no-untyped-call]


#: scheduler class name -> (factory over the optimizer and the groups' base lrs, how to step it)
SCHEDULERS: dict[str, tuple[Factory, Stepper]] = {
    "LambdaLR": (lambda o, lrs: L.LambdaLR(o, lambda e: 0.9**e), _plain_step),
    "MultiplicativeLR": (lambda o, lrs: L.MultiplicativeLR(o, lambda e: 0.95), _plain_step),
    "StepLR": (lambda o, lrs: L.StepLR(o, 2, gamma=0.5), _plain_step),
    "MultiStepLR": (lambda o, lrs: L.MultiStepLR(o, [2, 5], gamma=0.5), _plain_step),
    "ConstantLR": (lambda o, lrs: L.ConstantLR(o, factor=0.5, total_iters=4), _plain_step),
    "LinearLR": (lambda o, lrs: L.LinearLR(o, start_factor=0.2, total_iters=5), _plain_step),
    "ExponentialLR": (lambda o, lrs: L.ExponentialLR(o, gamma=0.8), _plain_step),
    "SequentialLR": (
        lambda o, lrs: L.SequentialLR(
            o, [L.LinearLR(o, start_factor=0.5, total_iters=2), L.ExponentialLR(o, gamma=0.9)], milestones=[2]
        ),
        _plain_step,
    ),
    "PolynomialLR": (lambda o, lrs: L.PolynomialLR(o, total_iters=8, power=2.0), _plain_step),
    "CosineAnnealingLR": (lambda o, lrs: L.CosineAnnealingLR(o, T_max=6, eta_min=0.001), _plain_step),
    "ChainedScheduler": (
        lambda o, lrs: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=2), L.ExponentialLR(o, 0.9)]),
        _plain_step,
    ),
    "ReduceLROnPlateau": (
        lambda o, lrs: L.ReduceLROnPlateau(o, patience=0, factor=0.5, min_lr=[lr / 100 for lr in lrs]),
        _plateau_step,
    ),
    "CyclicLR": (lambda o, lrs: L.CyclicLR(o, [lr / 10 for lr in lrs], lrs, step_size_up=2), _plain_step),
    "CosineAnnealingWarmRestarts": (lambda o, lrs: L.CosineAnnealingWarmRestarts(o, T_0=3, eta_min=0.001), _plain_step),
    "OneCycleLR": (lambda o, lrs: L.OneCycleLR(o, max_lr=lrs, total_steps=12), _plain_step),
    "transformers-linear-warmup": (_linear_warmup, _plain_step),  # a LambdaLR
}


def test_table_covers_every_torch_scheduler() -> None:
    classes = {
        name
        for name, obj in vars(L).items()
        if inspect.isclass(obj) and issubclass(obj, L.LRScheduler) and obj not in (L.LRScheduler, L._LRScheduler)
    }
    assert classes <= set(SCHEDULERS), (
        f"new scheduler(s) in torch.optim.lr_scheduler: {sorted(classes - set(SCHEDULERS))}"
    )


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def _run(name: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = freeze(_model(), "0")
    opt = torch.optim.SGD(param_groups(model, HEAD_LR, lr_mult=RATIO), lr=HEAD_LR, momentum=0.9)
    return model, opt, SCHEDULERS[name][0](opt, [HEAD_LR])


def _twin(name: str) -> tuple[torch.optim.Optimizer, Any]:
    model = _model()
    groups = [
        {"params": model[1].parameters(), "lr": HEAD_LR},
        {"params": model[0].parameters(), "lr": HEAD_LR / RATIO},
    ]
    opt = torch.optim.SGD(groups, lr=HEAD_LR, momentum=0.9)
    return opt, SCHEDULERS[name][0](opt, [HEAD_LR, HEAD_LR / RATIO])


def _hyper(opt: torch.optim.Optimizer) -> list[tuple[float, float]]:
    return [(float(g["lr"]), float(g["momentum"])) for g in opt.param_groups]


def _close(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-15) for p, q in zip(a, b) for x, y in zip(p, q)
    )


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_unfrozen_group_follows_the_schedule_like_a_group_present_from_the_start(name: str) -> None:
    step = SCHEDULERS[name][1]
    model, opt, sched = _run(name)
    twin_opt, twin = _twin(name)
    for i in range(3):
        for o, s in ((opt, sched), (twin_opt, twin)):
            o.step()
            step(s, i)
    unfreeze(model, "0")
    assert add_unfrozen(model, opt, scheduler=sched) == ["0.weight", "0.bias"]
    assert _close(_hyper(opt), _hyper(twin_opt)), (name, _hyper(opt), _hyper(twin_opt))
    for i in range(3, 10):
        for o, s in ((opt, sched), (twin_opt, twin)):
            o.step()
            step(s, i)
        assert _close(_hyper(opt), _hyper(twin_opt)), (name, i, _hyper(opt), _hyper(twin_opt))
        assert len(sched.get_last_lr()) == 2


def test_issue_example_onecycle_no_longer_fails_inside_torch() -> None:
    m = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    freeze(m, "0")
    opt = torch.optim.SGD(param_groups(m, 0.1), lr=0.1)
    sched = L.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    gu = GradualUnfreezing(m, opt, {1: "0"}, lr=0.1, scheduler=sched)
    opt.step()
    sched.step()
    gu.step()
    opt.step()
    sched.step()  # was KeyError: 'max_lr'
    assert [g["max_lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert sched.get_last_lr()[0] == sched.get_last_lr()[1]


class Custom(L.LRScheduler):
    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [float(g["lr"]) for g in self.optimizer.param_groups]


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(lambda o: Custom(o), ArgumentError, "Custom.*create the scheduler after", id="unknown-class"),
        pytest.param(
            lambda o: L.StepLR(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), 1),
            ArgumentError,
            "another optimizer",
            id="other-optimizer",
        ),
        pytest.param(lambda o: "cosine", ArgumentTypeError, "lr_scheduler", id="not-a-scheduler"),
    ],
)
def test_a_scheduler_that_cannot_take_the_group_is_refused_before_anything_changes(
    make: Any, error: Any, match: str
) -> None:
    model = freeze(_model(), "0")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    sched = make(opt)
    unfreeze(model, "0")
    with pytest.raises(error, match=match):
        add_unfrozen(model, opt, scheduler=sched)
    assert len(opt.param_groups) == 1
    freeze(model, "0")
    gu = None
    if error is ArgumentError and match.startswith("Custom"):
        with pytest.raises(error, match=match):
            gu = GradualUnfreezing(model, opt, {1: "0"}, scheduler=sched)
    assert gu is None and model.get_parameter("0.weight").requires_grad is False and len(opt.param_groups) == 1


def test_a_group_added_behind_the_schedulers_back_is_refused_at_the_next_unfreeze() -> None:
    model = freeze(_model(), "0")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    sched = L.LambdaLR(opt, lambda e: 1.0)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    unfreeze(model, "0")
    with pytest.raises(ArgumentError, match="has 1 entries but the optimizer has 2"):
        add_unfrozen(model, opt, scheduler=sched)
    assert len(opt.param_groups) == 2


# ----------------------------------------------------------------------------------- resume


def _batch(i: int) -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(i))


def _build(name: str, warmup: int) -> tuple[nn.Module, torch.optim.Optimizer, Any, GradualUnfreezing]:
    model, opt, sched = _run(name)
    gu = GradualUnfreezing(model, opt, {2: "0"}, scheduler=sched, warmup=warmup, warmup_curve="geometric")
    return model, opt, sched, gu


def _unit(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, gu: GradualUnfreezing, name: str, i: int) -> None:
    model(_batch(i)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    SCHEDULERS[name][1](sched, i)
    gu.step()


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("warmup", [0, 3], ids=["no-warmup", "warmup3"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_resume_of_scheduler_optimizer_and_gradual_unfreezing_is_exact(name: str, warmup: int) -> None:
    model, opt, sched, gu = _build(name, warmup)
    for i in range(3):  # the backbone joins at unit 2 and is warming up at the save
        _unit(model, opt, sched, gu, name, i)
    saved = _roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gu": gu.state_dict()}
    )
    model2, opt2, sched2, gu2 = _build(name, warmup)  # a fresh process
    gu2.load_state_dict(saved["gu"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    model2.load_state_dict(saved["model"])
    for i in range(3, 8):
        _unit(model, opt, sched, gu, name, i)
        _unit(model2, opt2, sched2, gu2, name, i)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups], (name, i)
        assert sched.get_last_lr() == sched2.get_last_lr()
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)
    assert gu.state_dict() == gu2.state_dict()


# ----------------------------------------------------------------------------------- warm-up


@pytest.mark.parametrize(
    "curve, expected",
    [
        pytest.param("linear", [0.1, 0.4, 0.7, 1.0, 1.0], id="linear"),
        pytest.param("geometric", [0.1, 0.1 ** (2 / 3), 0.1 ** (1 / 3), 1.0, 1.0], id="geometric"),
    ],
)
def test_warmup_ramps_a_new_group_up_to_its_rung(curve: Any, expected: list[float]) -> None:
    model = freeze(_model(), "0")
    opt = torch.optim.SGD(param_groups(model, HEAD_LR, lr_mult=RATIO), lr=HEAD_LR)
    gu = GradualUnfreezing(model, opt, {1: "0"}, warmup=3, warmup_start=0.1, warmup_curve=curve)
    seen = []
    for _ in expected:
        gu.step()
        seen.append(opt.param_groups[1]["lr"] / (HEAD_LR / RATIO))
    assert seen == pytest.approx(expected, rel=1e-12)
    assert opt.param_groups[1]["lr"] == HEAD_LR / RATIO  # exactly the rung at the end


@pytest.mark.parametrize("name", ["StepLR", "OneCycleLR", "LambdaLR", "CyclicLR", "transformers-linear-warmup"])
def test_warmup_with_a_scheduler_is_the_twin_times_the_factor(name: str) -> None:
    model, opt, sched = _run(name)
    gu = GradualUnfreezing(model, opt, {1: "0"}, scheduler=sched, warmup=3, warmup_start=0.1)
    twin_opt, twin = _twin(name)
    for i in range(7):
        for o, s in ((opt, sched), (twin_opt, twin)):
            o.step()
            SCHEDULERS[name][1](s, i)
        gu.step()
        factor = min(1.0, 0.1 + 0.9 * i / 3)  # the group joined at unit 1: t = i
        assert opt.param_groups[1]["lr"] == pytest.approx(twin_opt.param_groups[1]["lr"] * factor, rel=1e-9), i
        assert opt.param_groups[0]["lr"] == pytest.approx(twin_opt.param_groups[0]["lr"], rel=1e-12)


def test_backbone_starts_at_a_tenth_of_the_heads_current_lr_like_lightning() -> None:
    """Lightning's BackboneFinetuning: the backbone starts at head_lr / 10 (the head's *current* lr)."""
    model = freeze(_model(), "0")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    sched = L.StepLR(opt, 1, gamma=0.7)
    gu = GradualUnfreezing(model, opt, {3: "0"}, scheduler=sched, warmup=4, warmup_start=0.1, warmup_curve="geometric")
    for _ in range(3):
        opt.step()
        sched.step()
        gu.step()
    head, backbone = (g["lr"] for g in opt.param_groups)
    assert backbone == pytest.approx(head / 10, rel=1e-12) and head == pytest.approx(0.1 * 0.7**3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"warmup": -1}, ArgumentError, "warmup=-1", id="negative"),
        pytest.param({"warmup": 2, "warmup_start": 0.0}, ArgumentError, "warmup_start=0.0", id="zero-start"),
        pytest.param({"warmup": 2, "warmup_start": 1.5}, ArgumentError, "warmup_start=1.5", id="start-above-one"),
        pytest.param({"warmup": 2, "warmup_curve": "cosine"}, ArgumentError, "warmup_curve", id="curve"),
        pytest.param({"warmup": 1.5}, ArgumentTypeError, r"GradualUnfreezing\(warmup=1.5\).*Fix:", id="float"),
        pytest.param({"warmup": True}, ArgumentTypeError, r"warmup=True.*Fix:", id="bool"),
        pytest.param({"warmup": 2, "warmup_start": "0.1"}, ArgumentTypeError, "warmup_start='0.1'", id="str-start"),
    ],
)
def test_bad_warmup_is_refused_before_anything_changes(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = freeze(_model(), "0")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        GradualUnfreezing(model, opt, {0: "0"}, **kwargs)
    assert model.get_parameter("0.weight").requires_grad is False and opt.state_dict() == state


# ----------------------------------------------------------------------------------- the docs


def test_docs_loop_scheduler_amp_gradual_unfreezing_and_resume_runs() -> None:
    """docs/training.md, "Schedulers, mixed precision and resuming": the loop runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    section = text[text.index("## Schedulers, mixed precision and resuming") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    namespace: dict[str, Any] = {"__name__": "docs_training_loop"}
    exec(compile(match.group(1), "docs/training.md loop", "exec"), namespace)  # its own asserts: exact resume
    model, optimizer, scheduler = namespace["resumed"][:3]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())  # fp16 storage undone
    assert model.frozen_storage_dtype is None
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["group2", "group2/no_decay", "unfrozen0", "unfrozen0/no_decay", "unfrozen1", "unfrozen1/no_decay"]
    assert len(scheduler.get_last_lr()) == len(optimizer.param_groups)
    lrs = [float(g["max_lr"]) for g in optimizer.param_groups[::2]]  # head, backbone.2, backbone.0
    assert lrs == pytest.approx([1e-2, 1e-2 / 2.6, 1e-2 / 2.6**2], rel=1e-12)


@pytest.mark.parametrize("warmup", [1, 2])
def test_a_group_warming_up_is_never_the_reference_of_the_next_one(warmup: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    freeze(model, "0", "1")
    opt = torch.optim.SGD(param_groups(model, 0.8, lr_mult=2.0), lr=0.8)
    gu = GradualUnfreezing(model, opt, {1: "1", 2: "0"}, warmup=warmup, warmup_start=0.1)
    gu.step()
    gu.step()  # "0" joins while "1" is (or just stopped) warming up
    start = warmup_factor(1, warmup, 0.1, "linear")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.8, 0.4 * start, 0.2 * 0.1], rel=1e-12)


def test_issue_example_adamw_gradual_unfreezing_takes_the_ladder_not_adamw_defaults() -> None:
    """Issue 10.2 as reported: the unfrozen group got AdamW's lr 0.001 and weight decay 0.01."""
    m = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    freeze(m, "0")
    opt = torch.optim.AdamW(param_groups(m, 0.1))
    GradualUnfreezing(m, opt, {1: "0"}).step()
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.0), (0.1, 0.0)]


def _cosine_floor_setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    freeze(model, "0")
    return model, torch.optim.SGD(param_groups(model, 0.1), lr=0.1)


def test_a_cosine_floor_inside_a_chain_is_refused_before_anything_changes() -> None:
    model, opt = _cosine_floor_setup()
    groups = len(opt.param_groups)
    chained = L.ChainedScheduler([L.CosineAnnealingLR(opt, T_max=10, eta_min=0.01), L.ExponentialLR(opt, gamma=0.9)])
    match = r"eta_min=0\.01 inside a ChainedScheduler.*Fix:"
    with pytest.raises(ArgumentError, match=match):
        GradualUnfreezing(model, opt, {1: "0"}, scheduler=chained)
    assert len(opt.param_groups) == groups and is_frozen(model, "0")
    unfreeze(model, "0")
    with pytest.raises(ArgumentError, match=match):  # add_unfrozen refuses it too, leaving the optimizer alone
        add_unfrozen(model, opt, scheduler=chained)
    assert len(opt.param_groups) == groups


def test_a_cosine_floor_outside_a_chain_is_accepted() -> None:
    model, opt = _cosine_floor_setup()
    groups = len(opt.param_groups)
    gu = GradualUnfreezing(model, opt, {1: "0"}, scheduler=L.CosineAnnealingLR(opt, T_max=10, eta_min=0.01))
    gu.step()
    assert len(opt.param_groups) > groups and not is_frozen(model, "0")
