"""DDP lifecycle in a gloo world of one: changes under a live DDP are refused; the wrap handle re-wraps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _models import Blocks, WithFrozenUse, batch, counting_hook, trainable_bytes
from torch import nn

import torchfreeze
from torchfreeze._core.wrappers import live_ddp
from torchfreeze.distributed import DDPHandle, release, wrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError

DDP = nn.parallel.DistributedDataParallel


def _snapshot(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


MISUSES: dict[str, Callable[[nn.Module, nn.Module], Any]] = {
    "freeze-the-ddp": lambda model, ddp: torchfreeze.freeze(ddp, "head"),
    "unfreeze-the-ddp": lambda model, ddp: torchfreeze.unfreeze(ddp, "blocks.3"),
    "unfreeze-the-inner-model": lambda model, ddp: torchfreeze.unfreeze(model, "blocks"),
    "freeze-to": lambda model, ddp: torchfreeze.freeze_to(model, 1),
    "load-freeze-state": lambda model, ddp: torchfreeze.load_freeze_state(
        model, torchfreeze.freeze_state(torchfreeze.unfreeze(Blocks()))
    ),
    "gradual-unfreezing": lambda model, ddp: torchfreeze.GradualUnfreezing(
        ddp, torch.optim.SGD(torchfreeze.param_groups(model, 0.1)), {1: "blocks.3"}
    ),
}


@pytest.mark.parametrize("misuse", list(MISUSES), ids=list(MISUSES))
def test_a_change_under_a_live_raw_ddp_is_refused_naming_the_supported_path(world_of_one: None, misuse: str) -> None:
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    ddp = DDP(model)
    torchfreeze.check(ddp)  # torchfreeze has seen the DDP
    before = _snapshot(model)
    with pytest.raises(ArgumentError, match=r"live DistributedDataParallel.*torchfreeze\.distributed\.wrap"):
        MISUSES[misuse](model, ddp)
    assert _snapshot(model) == before
    release(ddp)
    assert live_ddp(model) == []


def test_after_release_the_model_may_change_again(world_of_one: None) -> None:
    model = torchfreeze.freeze(Blocks(), "blocks")
    ddp = DDP(model)
    torchfreeze.check(ddp)
    assert release(ddp) is model
    torchfreeze.unfreeze(model, "blocks.3")
    assert model.get_parameter("blocks.3.0.weight").requires_grad


def _step(handle: DDPHandle, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(0, step)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(handle(x), y).backward()
    opt.step()


def test_handle_rewraps_on_unfreeze_and_reduces_exactly_the_trainable_bytes(world_of_one: None) -> None:
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    sizes: list[int] = []
    handle = wrap(model, on_wrap=counting_hook(sizes))
    opt = torch.optim.SGD(torchfreeze.param_groups(model, 0.1))
    first = handle.ddp
    reduced = []
    for step in range(4):
        if step == 2:
            torchfreeze.unfreeze(model, "blocks.3")
            torchfreeze.add_unfrozen(model, opt)
        sizes.clear()
        _step(handle, opt, step)
        reduced.append((sum(sizes), trainable_bytes(model)))
        assert handle.reduced_names() == [n for n, _ in torchfreeze.trainable_parameters(model)]
    assert [r for r, _ in reduced] == [t for _, t in reduced]
    assert reduced[0][0] < reduced[3][0]  # the unfrozen block joined the reduction
    assert handle.rewraps == 1 and handle.ddp is not first
    assert first is not None
    with pytest.raises(ArgumentError, match="replaced"):
        first(batch(0, 0)[0])
    assert torchfreeze.check(model, opt) == []
    handle.release()


def test_gradual_unfreezing_through_the_handle_rewraps_each_time(world_of_one: None) -> None:
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    handle = wrap(model)
    opt = torch.optim.SGD(torchfreeze.param_groups(model, 0.1))
    sched = torchfreeze.GradualUnfreezing(handle, opt, {1: "blocks.3", 2: "blocks.2"})  # the handle is a module
    for step in range(3):
        _step(handle, opt, step)
        sched.step()
    assert handle.rewraps == 2
    assert handle.reduced_names() == [n for n, _ in torchfreeze.trainable_parameters(model)]
    assert torchfreeze.check(model, opt) == []
    handle.release()


def test_verbs_given_the_handle_see_the_model_with_canonical_names(world_of_one: None) -> None:
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    handle = wrap(model)
    assert torchfreeze.freeze_state(handle) == torchfreeze.freeze_state(model)
    assert torchfreeze.select(handle, "blocks.3") == ["blocks.3"]
    torchfreeze.unfreeze(handle, "blocks.3")
    assert handle.rewraps == 1 and "blocks.3.0.weight" in handle.reduced_names()
    assert handle.train(False) is handle and not model.training and handle.ddp is not None
    assert not handle.ddp.training
    with pytest.raises(ArgumentError, match="already built"):
        wrap(handle)
    handle.release()


def test_handle_leaves_frozen_uses_out_of_the_reduction(world_of_one: None) -> None:
    model = WithFrozenUse()  # no prepare_for_distributed: the adapter still requires grad
    handle = wrap(model)
    assert handle.reduced_names() == ["pre.weight", "pre.bias", "head.weight", "head.bias"]
    opt = torch.optim.SGD(torchfreeze.param_groups(model, 0.1))
    _step(handle, opt, 0)  # DDP does not wait for the adapter's gradient
    assert model.get_parameter("adapter.module.weight").grad is None
    assert torchfreeze.check(handle.ddp) == []  # type: ignore[arg-type]
    handle.release()


def test_everything_frozen_runs_unwrapped_until_something_trains(world_of_one: None) -> None:
    model = torchfreeze.freeze(Blocks())
    handle = wrap(model)
    assert handle.ddp is None and handle.reduced_names() == []
    assert handle(batch(0, 0)[0]).shape == (8, 3)
    torchfreeze.unfreeze(model, "head")  # nothing was live: no refusal, and no re-wrap needed
    assert handle.ddp is None
    handle.rewrap()
    assert handle.reduced_names() == ["head.weight", "head.bias"]
    handle.release()


def test_wrap_argument_errors(world_of_one: None) -> None:
    model = Blocks()
    with pytest.raises(ArgumentTypeError, match=r"wrap\(model="):
        wrap([model])  # type: ignore[arg-type]
    ddp = DDP(model)
    with pytest.raises(ArgumentError, match="already built"):
        wrap(ddp)
    with pytest.raises(ArgumentTypeError, match="on_wrap"):
        wrap(model, on_wrap=3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="first argument"):
        wrap(model, module=model)
    with pytest.raises(ArgumentTypeError, match="DistributedDataParallel"):
        release(model)  # type: ignore[arg-type]


def test_wrap_needs_a_process_group() -> None:
    with pytest.raises(ArgumentError, match="init_process_group"):
        wrap(Blocks())
