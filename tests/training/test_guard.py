"""guard (runtime bit-identity of frozen tensors) and check (static lint)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _helpers import Net
from torchfreeze import Frozen, add_unfrozen, check, freeze, freeze_batchnorm, guard, param_groups, pin_mode, unfreeze
from torchfreeze.errors import ArgumentError, FrozenTensorChanged
from torchfreeze.training import Problem
from torchfreeze.training.guard import CODES, _bit_equal


def _step(model, opt, x=None):
    x = torch.randn(8, 4) if x is None else x
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


# ------------------------------------------------------------------ guard


def test_correct_training_passes_and_checks_every_step():
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


def test_weight_decay_on_a_zero_grad_frozen_parameter_is_caught_at_the_step():
    model = freeze(Net(), "backbone", mode="eval")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)  # frozen ones included
    model.train()
    with pytest.raises(FrozenTensorChanged) as info:
        with guard(model, opt):
            model(torch.randn(8, 4)).sum().backward()
            model.backbone[0].weight.grad = torch.zeros_like(model.backbone[0].weight)  # the trap
            opt.step()
    err = info.value
    assert set(err.changes) == {"backbone.0.weight"}
    expected = float((model.backbone[0].weight.detach() / (1 - 0.05) * 0.05).abs().max())
    assert err.changes["backbone.0.weight"] == pytest.approx(expected, rel=1e-5)
    assert "backbone.0.weight" in str(err) and "after optimizer step" in str(err)
    assert isinstance(err, RuntimeError)


def test_batchnorm_statistics_of_a_frozen_layer_are_watched_without_optimizer():
    model = freeze(Net(), "backbone")  # not pinned: BN runs in train mode
    model.train()
    with pytest.raises(FrozenTensorChanged) as info:
        with guard(model):
            model(torch.randn(8, 4))
    assert {"backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"} <= set(
        info.value.changes
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
def test_pinned_or_converted_batchnorm_passes(setup):
    model = setup(Net()).train()
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1, momentum=0.9)
    with guard(model, opt) as g:
        for _ in range(2):
            _step(model, opt)
    assert g.checks == 3


def test_pinned_eval_batchnorm_with_trainable_affine_keeps_its_statistics_watched():
    model = pin_mode(Net(), "backbone.1", mode="eval").train()
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    with guard(model, opt) as g:
        assert "backbone.1.running_mean" in g.names and "backbone.1.weight" not in g.names
        _step(model, opt)


def test_frozen_use_parameters_are_watched_even_with_requires_grad():
    inner = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), Frozen(inner))
    with pytest.raises(FrozenTensorChanged, match="1.module.weight"):
        with guard(model) as g:
            assert inner.weight.requires_grad and "1.module.weight" in g.names
            inner.weight.data.add_(0.25)  # a write autograd does not see
    # largest change reported exactly
    with pytest.raises(FrozenTensorChanged, match="0.25"):
        with guard(model):
            inner.weight.data.add_(0.25)


def test_nan_in_a_frozen_tensor_is_not_a_change_but_sign_of_zero_is():
    a = torch.tensor([float("nan"), 1.0])
    assert _bit_equal(a, a.clone())
    assert not _bit_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    model = freeze(nn.Sequential(nn.Linear(2, 2)))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with guard(model):
        pass


def test_unfreezing_inside_the_guard_is_not_a_false_alarm_and_new_freezes_are_watched():
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
        with pytest.raises(FrozenTensorChanged, match="head.weight"):
            model.head.weight.data.mul_(2)
            g.verify()


def test_exception_in_block_is_not_masked_and_hooks_are_removed():
    model = freeze(Net(), "backbone")
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    with pytest.raises(KeyError):
        with guard(model, opt) as g:
            model.backbone[0].weight.data.add_(1)  # would be reported at exit
            raise KeyError("user error")
    assert g.checks == 0
    _step(model, opt)
    assert g.checks == 0


@pytest.mark.parametrize(
    "optimizer",
    [pytest.param("adam", id="str"), pytest.param([1, 2], id="list-of-int")],
)
def test_guard_bad_optimizer(optimizer):
    with pytest.raises(ArgumentError, match="optimizer"):
        guard(Net(), optimizer)


def test_guard_bad_model():
    with pytest.raises(ArgumentError, match="nn.Module"):
        guard({"w": torch.zeros(1)})


# ------------------------------------------------------------------ check


def _frozen_with_grad():
    model = freeze(Net(), "backbone", mode="eval")
    model.backbone[0].weight.grad = torch.zeros_like(model.backbone[0].weight)
    return model, None


def _frozen_with_state():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt)
    freeze(model, "backbone", mode="eval")
    return model, opt


def _bn_updates():
    return freeze(Net(), "backbone.0", "backbone.1", "backbone.4"), None


def _dropout_live():
    return freeze(Net(), "backbone").train(), None


def _shared():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.ReLU(), Frozen(lin)), None


def _missing_in_optimizer():
    model = freeze(Net(), "backbone", mode="eval")
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    unfreeze(model, "backbone.4")
    return model, opt


CASES = {
    "frozen-grad-not-none": (_frozen_with_grad, ("backbone.0.weight",)),
    "frozen-param-has-optimizer-state": (_frozen_with_state, ("backbone.0.weight", "backbone.4.bias")),
    "bn-stats-update-while-frozen": (_bn_updates, ("backbone.1",)),
    "train-mode-in-frozen-subtree": (_dropout_live, ("backbone", "backbone.3")),
    "shared-frozen-and-trainable": (_shared, ("0.weight", "2.module.weight")),
    "trainable-not-in-optimizer": (_missing_in_optimizer, ("backbone.4.weight", "backbone.4.bias")),
}


def test_every_code_has_a_case():
    assert set(CASES) == set(CODES)


@pytest.mark.parametrize("code", list(CASES), ids=list(CASES))
def test_each_trap_is_reported_with_names_and_a_fix(code):
    make, names = CASES[code]
    model, opt = make()
    found = [p for p in check(model, opt) if p.code == code]
    assert len(found) == 1, check(model, opt)
    problem = found[0]
    assert set(names) <= set(problem.names)
    assert problem.fix and "\n" not in problem.fix and problem.message
    assert str(problem).startswith(f"[{code}]")


def test_check_changes_nothing():
    model, opt = _frozen_with_state()
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    check(model, opt)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before[0].items())
    assert str(opt.state_dict()) == str(before[1])


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda: (freeze(Net(), "backbone", mode="eval"), "groups"), id="feature-extractor"),
        pytest.param(lambda: (freeze_batchnorm(freeze(Net(), "backbone.0"), "backbone"), "groups"), id="bn-frozen"),
        pytest.param(lambda: (Net(), "groups"), id="nothing-frozen"),
        pytest.param(lambda: (freeze(Net(), "backbone", train_bn=True, mode="eval"), "groups"), id="train-bn"),
    ],
)
def test_clean_setups_have_no_problems(setup):
    model, _ = setup()
    opt = torch.optim.AdamW(param_groups(model, 1e-3, weight_decay=0.01))
    model.train()
    _step(model, opt)
    assert check(model, opt) == []


def test_applying_the_fix_clears_the_problem():
    model = freeze(Net(), "backbone.0", "backbone.1", "backbone.4").train()
    assert [p.code for p in check(model)] == ["bn-stats-update-while-frozen", "train-mode-in-frozen-subtree"]
    freeze_batchnorm(model, "backbone.1")
    assert [p.code for p in check(model)] == ["train-mode-in-frozen-subtree"]  # dropout still live
    freeze(model, "backbone", mode="eval")
    assert check(model) == []
    model, opt = _missing_in_optimizer()
    add_unfrozen(model, opt)
    assert check(model, opt) == []


def test_deliberately_pinned_train_dropout_is_not_reported():
    model = freeze(Net(), "backbone", mode="eval")
    pin_mode(model, "backbone.3", mode="train")  # Monte-Carlo dropout on purpose
    assert check(model.train()) == []


def test_problem_is_frozen_dataclass():
    p = Problem("x", ("a",), "m", "f")
    with pytest.raises(Exception):
        p.code = "y"  # type: ignore[misc]


def test_check_bad_optimizer():
    with pytest.raises(ArgumentError, match="optimizer"):
        check(Net(), optimizer="sgd")  # type: ignore[arg-type]


def test_whole_model_frozen_fix_names_no_selector():
    model = freeze(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))).train()
    (problem,) = check(model)
    assert problem.code == "train-mode-in-frozen-subtree" and problem.names == ("", "1")
    assert "freeze(model, mode='eval')" in problem.fix
    freeze(model, mode="eval")
    assert check(model) == []
