"""FreezeRun, the implementation both trainer callbacks share: warm-up of unfrozen groups (issue 15.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchfreeze import is_frozen, pinned_modes
from torchfreeze.errors import ArgumentError, ArgumentTypeError, SelectorError
from torchfreeze.integrations.plan import FreezeRun


def _model_and_optimizer(run: FreezeRun) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    run.apply_plan(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run.attach(model, [opt])
    return model, opt


@pytest.mark.parametrize("curve", ["linear", "geometric"])
def test_warmup_reaches_the_schedule_and_ramps_the_new_group(curve: str) -> None:
    run = FreezeRun(freeze=["0"], schedule={1: "0"}, warmup=3, warmup_start=0.1, warmup_curve=curve)  # type: ignore[arg-type]
    _, opt = _model_and_optimizer(run)
    assert run.unfreezing is not None and run.unfreezing.warmup == 3
    run.advance_to(1)
    head_lr = opt.param_groups[0]["lr"]
    lrs = [opt.param_groups[-1]["lr"]]
    for count in (2, 3, 4):
        run.advance_to(count)
        lrs.append(opt.param_groups[-1]["lr"])
    assert lrs[0] == pytest.approx(0.1 * head_lr)
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(head_lr)


def test_without_warmup_the_new_group_starts_at_its_target() -> None:
    run = FreezeRun(freeze=["0"], schedule={1: "0"})
    _, opt = _model_and_optimizer(run)
    run.advance_to(1)
    assert opt.param_groups[-1]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


@pytest.mark.parametrize(
    "options",
    [{"warmup": -1}, {"warmup_start": 0.0}, {"warmup_start": 2.0}, {"warmup_curve": "cosine"}],
    ids=["negative-warmup", "zero-start", "start-above-one", "unknown-curve"],
)
def test_bad_warmup_options_are_refused_at_construction(options: dict[str, object]) -> None:
    with pytest.raises(ArgumentError, match="warmup"):
        FreezeRun(freeze=["0"], schedule={1: "0"}, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("schedule", "error"),
    [
        pytest.param("one_group_per_epch", ArgumentError, id="preset-typo"),
        pytest.param({-1: "0"}, ArgumentError, id="negative-key"),
        pytest.param({1.5: "0"}, ArgumentTypeError, id="float-key"),
        pytest.param([1], ArgumentTypeError, id="list"),
        pytest.param(0, ArgumentError, id="zero-period"),
    ],
)
def test_a_bad_schedule_fails_at_construction_not_inside_fit(schedule: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"FreezeRun\(schedule=.*Fix:"):
        FreezeRun(freeze=["0"], schedule=schedule)  # type: ignore[arg-type]


def test_a_run_that_cannot_start_leaves_the_model_as_it_was_before_the_plan() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    run = FreezeRun(freeze=["0", "1"], mode="eval", schedule={1: "9"})  # '9' names nothing
    run.apply_plan(model)
    assert pinned_modes(model) and is_frozen(model, "0")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(SelectorError):
        run.attach(model, [opt])
    assert pinned_modes(model) == {} and not is_frozen(model, "0") and not is_frozen(model, "1")
