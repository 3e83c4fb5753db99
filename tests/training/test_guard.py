"""guard: runtime bit-identity of frozen tensors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _train_loop import step as _step
from torch import nn

from _helpers import Net
from torchfreeze import Frozen, add_unfrozen, freeze, freeze_batchnorm, guard, param_groups, pin_mode, unfreeze
from torchfreeze.errors import ArgumentTypeError, FrozenTensorChanged, FrozenTensorChangedError
from torchfreeze.training.guard import _bit_equal


def _changes(err: FrozenTensorChangedError) -> dict[str, float]:
    """The ``changes`` mapping that ``guard`` attaches to its error (name -> largest absolute change)."""
    changes: dict[str, float] = vars(err)["changes"]
    return changes


def test_correct_training_passes_and_checks_every_step() -> None:
    model = freeze(Net(), "backbone", mode="eval")
    opt = torch.optim.AdamW(param_groups(model, 1e-2, weight_decay=0.1))
    model.train()
    with guard(model, opt) as g:
        assert set(g.names) == {
            "backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
            "backbone.4.weight", "backbone.4.bias",
            "backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked",
        }  # fmt: skip
        for _ in range(3):
            _step(model, opt)
    assert g.checks == 4  # three steps + exit
    assert g.names == []  # snapshot released at exit
    _step(model, opt)  # hook removed
    assert g.checks == 4


def test_weight_decay_on_a_zero_grad_frozen_parameter_is_caught_at_the_step() -> None:
    model = freeze(Net(), "backbone", mode="eval")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)  # frozen ones included
    model.train()
    with pytest.raises(FrozenTensorChangedError) as info:
        with guard(model, opt):
            model(torch.randn(8, 4)).sum().backward()
            weight = model.get_parameter("backbone.0.weight")
            weight.grad = torch.zeros_like(weight)  # the trap
            opt.step()
    err = info.value
    changes = _changes(err)
    assert set(changes) == {"backbone.0.weight"}
    expected = float((model.get_parameter("backbone.0.weight").detach() / (1 - 0.05) * 0.05).abs().max())
    assert changes["backbone.0.weight"] == pytest.approx(expected, rel=1e-5)
    assert "backbone.0.weight" in str(err) and "after optimizer step" in str(err)
    assert isinstance(err, RuntimeError)


def test_batchnorm_statistics_of_a_frozen_layer_are_watched_without_optimizer() -> None:
    model = freeze(Net(), "backbone")  # not pinned: BN runs in train mode
    model.train()
    with pytest.raises(FrozenTensorChangedError) as info:
        with guard(model):
            model(torch.randn(8, 4))
    assert {"backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"} <= set(
        _changes(info.value)
    )
    assert "freeze_batchnorm" in str(info.value)


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda m: freeze(m, "backbone", mode="eval"), id="freeze-eval"),
        pytest.param(lambda m: freeze_batchnorm(freeze(m, "backbone"), "backbone"), id="freeze-batchnorm"),
        pytest.param(lambda m: freeze_batchnorm(freeze(m, "backbone"), "backbone", convert=True), id="convert"),
    ],
)
def test_pinned_or_converted_batchnorm_passes(setup: Any) -> None:
    model = setup(Net()).train()
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1, momentum=0.9)
    with guard(model, opt) as g:
        for _ in range(2):
            _step(model, opt)
    assert g.checks == 3


def test_pinned_eval_batchnorm_with_trainable_affine_keeps_its_statistics_watched() -> None:
    model = pin_mode(Net(), "backbone.1", mode="eval").train()
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    with guard(model, opt) as g:
        assert "backbone.1.running_mean" in g.names and "backbone.1.weight" not in g.names
        _step(model, opt)


def test_frozen_use_parameters_are_watched_even_with_requires_grad() -> None:
    inner = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), Frozen(inner))
    with pytest.raises(FrozenTensorChangedError, match="1.module.weight"):
        with guard(model) as g:
            assert inner.weight.requires_grad and "1.module.weight" in g.names
            inner.weight.data.add_(0.25)  # a write autograd does not see
    # largest change reported exactly
    with pytest.raises(FrozenTensorChangedError, match="0.25"):
        with guard(model):
            inner.weight.data.add_(0.25)


def test_nan_in_a_frozen_tensor_is_not_a_change_but_sign_of_zero_is() -> None:
    a = torch.tensor([float("nan"), 1.0])
    assert _bit_equal(a, a.clone())
    assert not _bit_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    model = freeze(nn.Sequential(nn.Linear(2, 2)))
    with torch.no_grad():
        model.get_parameter("0.weight")[0, 0] = float("nan")
    with guard(model):
        pass


def test_unfreezing_inside_the_guard_is_not_a_false_alarm_and_new_freezes_are_watched() -> None:
    model = freeze(Net(), "backbone", mode="eval").train()
    opt = torch.optim.Adam(param_groups(model, 1e-2))
    with guard(model, opt) as g:
        _step(model, opt)
        unfreeze(model, "backbone.4")
        add_unfrozen(model, opt)
        _step(model, opt)  # backbone.4 moves: allowed now
        freeze(model, "head")
        _step(model, opt)
        assert "head.weight" in g.names and "backbone.4.weight" not in g.names
        with pytest.raises(FrozenTensorChangedError, match="head.weight"):
            model.get_parameter("head.weight").data.mul_(2)
            g.verify()


def test_exception_in_block_is_not_masked_and_hooks_are_removed() -> None:
    model = freeze(Net(), "backbone")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    with pytest.raises(KeyError):
        with guard(model, opt) as g:
            model.get_parameter("backbone.0.weight").data.add_(1)  # would be reported at exit
            raise KeyError("user error")
    assert g.checks == 0
    _step(model, opt)
    assert g.checks == 0


@pytest.mark.parametrize(
    "optimizer",
    [pytest.param("adam", id="str"), pytest.param([1, 2], id="list-of-int")],
)
def test_guard_bad_optimizer(optimizer: Any) -> None:
    with pytest.raises(ArgumentTypeError, match="optimizer"):
        guard(Net(), optimizer)


def test_guard_bad_model() -> None:
    with pytest.raises(ArgumentTypeError, match="nn.Module"):
        guard({"w": torch.zeros(1)})  # type: ignore[arg-type]


def test_old_error_name_still_catches() -> None:
    model = freeze(nn.Linear(2, 2))
    with pytest.raises(FrozenTensorChanged):
        with guard(model):
            model.get_parameter("weight").data.add_(1.0)


def test_lazy_parameters_join_the_watch_once_materialised() -> None:
    model = freeze(nn.Sequential(nn.LazyLinear(2)))
    with guard(model) as g:
        assert g.names == []  # nothing to snapshot yet
        model(torch.ones(1, 3))
        g.verify()  # snapshots the weights it now has
        assert g.names == ["0.weight", "0.bias"]
        with pytest.raises(FrozenTensorChangedError, match="0.weight"):
            model.get_parameter("0.weight").data.add_(1.0)
            g.verify()
