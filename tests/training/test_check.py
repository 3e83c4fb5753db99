"""check: static lint of the known traps around frozen parameters."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _train_loop import step as _step
from torch import nn

from _helpers import Net
from torchfreeze import Frozen, add_unfrozen, check, freeze, freeze_batchnorm, param_groups, pin_mode, unfreeze
from torchfreeze.errors import ArgumentTypeError
from torchfreeze.training import CODES, Problem

Case = tuple[nn.Module, "torch.optim.Optimizer | None"]


def _frozen_with_grad() -> Any:
    model = freeze(Net(), "backbone", mode="eval")
    weight = model.get_parameter("backbone.0.weight")
    weight.grad = torch.zeros_like(weight)
    return model, None


def _frozen_with_state() -> Any:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt)
    freeze(model, "backbone", mode="eval")
    return model, opt


def _spectral_norm_frozen() -> Any:  # issue 11, item 3: the power iteration rewrites weight_u/weight_v
    return freeze(nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)), nn.Linear(4, 2)), "0"), None


def _bn_updates() -> Any:
    return freeze(Net(), "backbone.0", "backbone.1", "backbone.4"), None


def _dropout_live() -> Any:
    return freeze(Net(), "backbone").train(), None


def _shared() -> Any:
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.ReLU(), Frozen(lin)), None


def _missing_in_optimizer() -> Any:
    model = freeze(Net(), "backbone", mode="eval")
    opt = torch.optim.SGD(model.get_submodule("head").parameters(), lr=0.1)
    unfreeze(model, "backbone.4")
    return model, opt


def _ddp_of(model: nn.Module) -> nn.Module:
    """A live DDP over ``model`` in a world of one (the group is gone again when it returns)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return nn.parallel.DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()


def _ddp_not_reducing() -> Any:
    model = freeze(Net(), "backbone", mode="eval")
    ddp = _ddp_of(model)
    model.get_parameter("backbone.4.weight").requires_grad = True  # behind torchfreeze's back
    return ddp, None


def _ddp_reducing_frozen() -> Any:
    model = Net()
    ddp = _ddp_of(model)
    model.get_parameter("backbone.0.weight").requires_grad = False  # behind torchfreeze's back
    return ddp, None


def _frozen_use_requiring_grad() -> Any:
    return _ddp_of(nn.Sequential(nn.Linear(4, 4), Frozen(nn.Linear(4, 4)))), None


def _optimizer_nothing_trainable() -> Any:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before everything was frozen
    return freeze(model), opt


def _replaced_after_recording() -> Any:
    from torchfreeze import freeze_state

    model = freeze(Net(), "backbone", mode="eval")
    state = freeze_state(model)
    model.get_submodule("backbone")[0] = nn.Linear(4, 8)  # m[0] = new_layer: the new one trains
    return model, None, {"state": state}


class _Encoder(nn.Module):
    """A parent that skips its layers at random (LayerDrop), as Hugging Face's encoders do."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.norm = nn.LayerNorm(4)
        self.layerdrop = 0.5


def _layerdrop_over_pinned_layers() -> Any:
    model = nn.Sequential(nn.Linear(4, 4), _Encoder())
    for p in model[1].layers.parameters():
        p.requires_grad_(False)
    pin_mode(model, "1.layers", mode="eval")  # the layers are pinned, their parent is not
    return model.train(), None


class _Switched(nn.Module):
    """A Hugging Face style feature encoder: its own switch makes its input require grad in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self._requires_grad = True

    def _freeze_parameters(self) -> None:
        for p in self.parameters():
            p.requires_grad = False
        self._requires_grad = False


def _forced_gradients() -> Any:
    model = nn.Sequential(_Switched(), nn.Linear(2, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)  # frozen by hand: the switch stays on
    return model.train(), None


CASES = {
    "stochastic-depth-over-frozen": (_layerdrop_over_pinned_layers, ("1", "1.layers.0", "1.layers.1")),
    "frozen-module-forces-grad": (_forced_gradients, ("0",)),
    "frozen-grad-not-none": (_frozen_with_grad, ("backbone.0.weight",)),
    "frozen-param-has-optimizer-state": (_frozen_with_state, ("backbone.0.weight", "backbone.4.bias")),
    "bn-stats-update-while-frozen": (_bn_updates, ("backbone.1",)),
    "train-mode-in-frozen-subtree": (_dropout_live, ("backbone", "backbone.3")),
    "shared-frozen-and-trainable": (_shared, ("0.weight", "2.module.weight")),
    "trainable-not-in-optimizer": (_missing_in_optimizer, ("backbone.4.weight", "backbone.4.bias")),
    "ddp-trainable-not-reduced": (_ddp_not_reducing, ("backbone.4.weight",)),
    "ddp-frozen-reduced": (_ddp_reducing_frozen, ("backbone.0.weight",)),
    "frozen-use-requires-grad": (_frozen_use_requiring_grad, ("1.module.weight", "1.module.bias")),
    "optimizer-holds-nothing-trainable": (_optimizer_nothing_trainable, ()),
    "requires-grad-but-recorded-frozen": (_replaced_after_recording, ("backbone.0.weight", "backbone.0.bias")),
    "frozen-module-updates-buffers": (_spectral_norm_frozen, ("0.weight_u", "0.weight_v")),
}


def test_every_code_has_a_case() -> None:
    assert set(CASES) == set(CODES)


@pytest.mark.parametrize("code", list(CASES), ids=list(CASES))
def test_each_trap_is_reported_with_names_and_a_fix(code: str) -> None:
    make, names = CASES[code]
    model, opt, *extra = make()
    kwargs = extra[0] if extra else {}  # e.g. the recorded freeze state
    found = [p for p in check(model, opt, **kwargs) if p.code == code]
    assert len(found) == 1, check(model, opt, **kwargs)
    problem = found[0]
    assert set(names) <= set(problem.names)
    assert problem.fix and "\n" not in problem.fix and problem.message
    assert str(problem).startswith(f"[{code}]")


def test_check_changes_nothing() -> None:
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
def test_clean_setups_have_no_problems(setup: Any) -> None:
    model, _ = setup()
    opt = torch.optim.AdamW(param_groups(model, 1e-3, weight_decay=0.01))
    model.train()
    _step(model, opt)
    assert check(model, opt) == []


def test_applying_the_fix_clears_the_problem() -> None:
    model = freeze(Net(), "backbone.0", "backbone.1", "backbone.4").train()
    assert [p.code for p in check(model)] == ["bn-stats-update-while-frozen", "train-mode-in-frozen-subtree"]
    freeze_batchnorm(model, "backbone.1")
    assert [p.code for p in check(model)] == ["train-mode-in-frozen-subtree"]  # dropout still live
    freeze(model, "backbone", mode="eval")
    assert check(model) == []
    model, opt = _missing_in_optimizer()
    add_unfrozen(model, opt)
    assert check(model, opt) == []


def test_deliberately_pinned_train_dropout_is_not_reported() -> None:
    model = freeze(Net(), "backbone", mode="eval")
    pin_mode(model, "backbone.3", mode="train")  # Monte-Carlo dropout on purpose
    assert check(model.train()) == []


def test_problem_is_frozen_dataclass() -> None:
    p = Problem("x", ("a",), "m", "f")
    with pytest.raises(Exception):
        p.code = "y"  # type: ignore[misc]


def test_check_bad_optimizer() -> None:
    with pytest.raises(ArgumentTypeError, match="optimizer"):
        check(Net(), optimizer="sgd")  # type: ignore[arg-type]


def test_whole_model_frozen_fix_names_no_selector() -> None:
    model = freeze(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))).train()
    (problem,) = check(model)
    assert problem.code == "train-mode-in-frozen-subtree" and problem.names == ("", "1")
    assert "freeze(model, mode='eval')" in problem.fix
    freeze(model, mode="eval")
    assert check(model) == []


def test_check_bad_model() -> None:
    with pytest.raises(ArgumentTypeError, match="check\\(model="):
        check([nn.Linear(2, 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "name"),
    [
        pytest.param(lambda: nn.MultiheadAttention(4, 2, dropout=0.1), "1", id="attention"),
        pytest.param(
            lambda: nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.1), "1.self_attn", id="encoder"
        ),
        pytest.param(lambda: nn.LSTM(4, 4, num_layers=2, dropout=0.1), "1", id="rnn"),
    ],
)
def test_dropout_inside_attention_and_rnn_is_seen_in_a_frozen_subtree(make: Callable[[], nn.Module], name: str) -> None:
    model = freeze(nn.Sequential(make(), nn.Linear(4, 4)), "0").train()  # a feature extractor: frozen first
    (problem,) = check(model)
    assert problem.code == "train-mode-in-frozen-subtree"
    assert problem.names[0] == "0" and name.replace("1", "0", 1) in problem.names[1:]
    pin_mode(model, "0", mode="eval")  # pinned eval: the frozen features are deterministic
    assert check(model.train()) == []


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: freeze(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 4)), "2"), id="after"),
        pytest.param(
            lambda: freeze(
                nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)), nn.Linear(4, 2)), "1"
            ),
            id="joint-training-through-a-frozen-block",
        ),
    ],
)
def test_dropout_in_a_frozen_part_behind_a_trainable_one_is_a_choice(make: Callable[[], nn.Module]) -> None:
    """Issue 9: with trainable parts before it, dropout in a frozen part regularises (pytorch/audio#1286)."""
    assert check(make().train()) == []


def test_layerdrop_over_frozen_layers_of_a_feature_extractor_is_reported() -> None:
    model = nn.Sequential(_Encoder(), nn.Linear(4, 2))
    freeze(model, "0.layers")  # no pin: reported because nothing trainable comes before the layers
    codes = [p.code for p in check(model.train())]
    assert "stochastic-depth-over-frozen" in codes
    freeze(model, "0.layers", mode="eval")  # the preset pins the parent too
    assert model.train()[0].training is False and model[0].norm.training is True
    assert "stochastic-depth-over-frozen" not in [p.code for p in check(model)]


def test_freezing_turns_the_models_own_gradient_switch_off_and_back_on() -> None:
    model, _ = _forced_gradients()
    freeze(model, "0")
    assert model[0]._requires_grad is False and check(model) == []
    unfreeze(model, "0")
    assert model[0]._requires_grad is True


def test_functional_dropout_attribute_is_seen() -> None:
    class Attention(nn.Module):  # a Hugging Face style layer: dropout is a float, applied functionally
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.attention_dropout = 0.1

    model = freeze(nn.Sequential(Attention(), nn.Linear(4, 4)), "0").train()
    (problem,) = check(model)
    assert problem.code == "train-mode-in-frozen-subtree" and problem.names == ("0", "0")
