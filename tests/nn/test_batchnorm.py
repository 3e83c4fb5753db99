"""freeze_batchnorm and FrozenBatchNorm1d/2d/3d."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import torchfreeze as tf
from _helpers import requires_grad_map
from torchfreeze import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
    freeze_to,
    pinned_modes,
    unfreeze,
)
from torchfreeze.errors import ArgumentError, ArgumentTypeError, SharedParameterError
from torchfreeze.nn.batchnorm import is_converted_batchnorm

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

LAYOUTS = [
    ("1d", nn.BatchNorm1d, FrozenBatchNorm1d, (8, 3)),
    ("1d-seq", nn.BatchNorm1d, FrozenBatchNorm1d, (8, 3, 5)),
    ("2d", nn.BatchNorm2d, FrozenBatchNorm2d, (4, 3, 5, 5)),
    ("3d", nn.BatchNorm3d, FrozenBatchNorm3d, (2, 3, 2, 3, 3)),
]


def trained_model(bn_type, shape):
    torch.manual_seed(0)
    conv = {2: nn.Identity(), 3: nn.Identity(), 4: nn.Conv2d(3, 3, 1), 5: nn.Identity()}[len(shape)]
    model = nn.Sequential(conv, bn_type(3), nn.ReLU())
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(*shape) * 2 + 1)
    return model


@pytest.mark.parametrize("bn_type,_,shape", [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_pinned_freeze_keeps_every_tensor_and_equals_eval(bn_type, _, shape):
    model = trained_model(bn_type, shape)
    x = torch.randn(*shape, requires_grad=True)
    expected = copy.deepcopy(model).eval()(x)
    freeze_batchnorm(model)
    model.train()
    before = {k: getattr(model[1], k).clone() for k in BN_TENSORS}
    out = model(x)
    out.sum().backward()
    for k in BN_TENSORS:
        assert torch.equal(getattr(model[1], k), before[k]), k
    assert torch.equal(out, expected)
    assert model[1].weight.grad is None and x.grad is not None
    assert pinned_modes(model) == {"1": "eval"}


@pytest.mark.parametrize("bn_type,frozen_type,shape", [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_convert_same_keys_same_output(bn_type, frozen_type, shape):
    model = trained_model(bn_type, shape)
    keys = list(model.state_dict())
    x = torch.randn(*shape)
    expected = copy.deepcopy(model).eval()(x)
    freeze_batchnorm(model, convert=True)
    assert type(model[1]) is frozen_type
    assert list(model.state_dict()) == keys
    assert list(model[1].parameters()) == []
    model.train()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # round trip: a plain BatchNorm checkpoint loads into the converted model and back
    plain = trained_model(bn_type, shape)
    model.load_state_dict(plain.state_dict())
    unfreeze(model)
    assert type(model[1]) is bn_type
    assert all(p.requires_grad for p in model[1].parameters())
    for k in BN_TENSORS:
        assert torch.equal(getattr(model[1], k), getattr(plain[1], k))


def test_convert_sync_batchnorm():
    model = nn.Sequential(nn.SyncBatchNorm(3))
    model[0].running_mean.fill_(0.5)
    freeze_batchnorm(model, convert=True)
    assert isinstance(model[0], FrozenBatchNorm2d)
    x = torch.randn(2, 3, 4, 4)
    reference = nn.BatchNorm2d(3).eval()
    reference.running_mean.fill_(0.5)
    torch.testing.assert_close(model(x), reference(x))
    unfreeze(model)
    assert type(model[0]) is nn.SyncBatchNorm


def test_selection_limits_which_batchnorms():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Sequential(nn.BatchNorm1d(2)))
    freeze_batchnorm(model, "1")
    assert model[0].weight.requires_grad and not model[1][0].weight.requires_grad


def test_affine_false_batchnorm():
    model = nn.Sequential(nn.BatchNorm1d(3, affine=False))
    freeze_batchnorm(model, convert=True)
    assert "weight" not in model.state_dict()
    assert model(torch.ones(2, 3)).shape == (2, 3)


def test_no_batchnorm_in_selection_changes_nothing():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    before = requires_grad_map(model)
    with pytest.raises(ArgumentError, match="no BatchNorm"):
        freeze_batchnorm(model, "0")
    assert requires_grad_map(model) == before and pinned_modes(model) == {}


def test_convert_without_running_stats_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ArgumentError, match="track_running_stats=False"):
        freeze_batchnorm(model, convert=True)
    assert type(model[0]) is nn.BatchNorm1d and model[0].weight.requires_grad


def test_convert_must_be_bool():
    with pytest.raises(ArgumentTypeError, match="convert="):
        freeze_batchnorm(nn.Sequential(nn.BatchNorm1d(2)), convert="yes")  # type: ignore[arg-type]


def test_frozen_batchnorm_dtype_and_deepcopy():
    bn = nn.BatchNorm2d(3).eval().to(torch.float64)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    assert frozen.running_var.dtype == torch.float64
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(copy.deepcopy(frozen)(x), bn(x))


def test_pinned_sync_batchnorm_keeps_tensors_and_equals_eval():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    x = torch.randn(2, 3, 4, 4)
    expected = copy.deepcopy(model).eval()(x)
    freeze_batchnorm(model)
    model.train()
    before = {k: getattr(model[1], k).clone() for k in BN_TENSORS}
    assert torch.equal(model(x), expected)
    for k in BN_TENSORS:
        assert torch.equal(getattr(model[1], k), before[k]), k


def test_convert_round_trip_keeps_eps_momentum_and_the_mode_passed_down():
    model = nn.Sequential(nn.Sequential(nn.BatchNorm2d(3, eps=1e-3, momentum=0.01))).train()
    model[0].eval()
    freeze_batchnorm(model, convert=True)
    unfreeze(model)
    bn = model[0][0]
    assert type(bn) is nn.BatchNorm2d and (bn.eps, bn.momentum) == (1e-3, 0.01)
    assert bn.training is False  # its parent is in eval


def test_convert_keeps_a_shared_layer_shared_and_is_idempotent():
    bn = nn.BatchNorm1d(2)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    keys = list(model.state_dict())
    freeze_batchnorm(model, "0", convert=True)
    assert isinstance(model[0], FrozenBatchNorm1d) and model[0] is model[2]
    freeze_batchnorm(model, convert=True)  # already converted: nothing to do, no error
    freeze_batchnorm(model)
    assert model[0] is model[2] and list(model.state_dict()) == keys
    unfreeze(model)
    assert type(model[0]) is nn.BatchNorm1d and model[0] is model[2]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: nn.Sequential(nn.BatchNorm1d(2), nn.LazyBatchNorm1d()), "lazy"),
        (lambda: nn.BatchNorm1d(2), "the model itself"),
    ],
    ids=["uninitialised-lazy", "model-is-the-batchnorm"],
)
def test_convert_refusals_change_nothing(make, match):
    model = make()
    before = [(type(m), id(m)) for m in model.modules()]
    with pytest.raises(ArgumentError, match=match):
        freeze_batchnorm(model, convert=True)
    assert [(type(m), id(m)) for m in model.modules()] == before
    assert all(p.requires_grad for p in model.parameters())


def test_pinned_freeze_of_an_uninitialised_lazy_batchnorm():
    model = nn.Sequential(nn.LazyBatchNorm1d())
    freeze_batchnorm(model)
    model.train()(torch.randn(4, 3))  # materialises in eval: statistics untouched
    assert not model[0].weight.requires_grad
    assert torch.equal(model[0].running_mean, torch.zeros(3))


# --- BatchNorm subclasses (issue 15.1): conversion never changes what the model computes ---------


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + activation in one module, calling BatchNorm's forward."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class BatchNormDrop2d(nn.BatchNorm2d):
    """BatchNorm + dropout."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(super().forward(x))


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """An extra buffer used by the forward."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.register_buffer("gain", torch.linspace(0.5, 2.0, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain.view(1, -1, 1, 1)


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's layout: a custom __init__ signature, F.batch_norm called directly, then drop and act."""

    def __init__(self, num_features: int, *, apply_act: bool = True, drop_rate: float = 0.0) -> None:
        super().__init__(num_features, eps=1e-3, momentum=0.05)
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training or self.running_mean is None
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training, self.momentum or 0.0, self.eps
        )
        return self.act(self.drop(x))


class RenamedBatchNorm2d(nn.BatchNorm2d):
    """Only the constructor changes (a signature BatchNorm2d's arguments do not fit): computes plain BatchNorm."""

    def __init__(self, channels: int, *, tag: str) -> None:
        super().__init__(channels, eps=1e-4)
        self.tag = tag


def _hooked(n: int) -> nn.Module:
    bn = nn.BatchNorm2d(n)
    bn.register_forward_hook(lambda module, args, out: out * 2)
    return bn


SUBCLASSES = [  # (id, build, converted in place?, stochastic in train mode?)
    ("activation", lambda: BatchNormAct2d(4), True, False),
    ("dropout", lambda: BatchNormDrop2d(4), True, True),
    ("extra-buffer", lambda: ScaledBatchNorm2d(4), True, False),
    ("timm-custom-init", lambda: TimmBatchNormAct2d(4, drop_rate=0.2), True, True),
    ("forward-hook", lambda: _hooked(4), True, False),
    ("custom-init-only", lambda: RenamedBatchNorm2d(4, tag="stem"), False, False),
]


def _subclass_model(build: object) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), build())  # type: ignore[operator]
    model.train()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        for _ in range(3):
            model(torch.randn(4, 3, 5, 5) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("build,in_place,stochastic", [c[1:] for c in SUBCLASSES], ids=[c[0] for c in SUBCLASSES])
def test_convert_a_subclass_keeps_outputs_keys_and_the_original_layer(build, in_place, stochastic):
    model = _subclass_model(build)
    layer, cls = model[1], type(model[1])
    params = dict(layer.named_parameters(recurse=False))
    x = torch.randn(2, 3, 5, 5)
    reference = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tf_freeze_all(model)
    freeze_batchnorm(model, convert=True)
    assert (model[1] is layer) == in_place and is_converted_batchnorm(model[1])
    assert list(model[1].parameters(recurse=False)) == []
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), reference)
    if not stochastic:  # frozen statistics: train mode computes what eval mode did
        assert torch.equal(model.train()(x), reference)
    model.eval()
    unfreeze(model)
    assert model[1] is layer and type(model[1]) is cls  # the very object: no constructor called
    assert dict(model[1].named_parameters(recurse=False)) == params  # the same parameter objects
    assert all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == list(state) and pinned_modes(model) == {}
    assert torch.equal(model(x), reference)
    assert model.train()[1].training  # follows its parent again


def tf_freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@pytest.mark.parametrize("build,in_place,_", [c[1:] for c in SUBCLASSES], ids=[c[0] for c in SUBCLASSES])
def test_converted_subclass_loads_a_checkpoint_and_converts_back_with_its_values(build, in_place, _):
    model = _subclass_model(build)
    freeze_batchnorm(model, convert=True)
    other = _subclass_model(build)
    with torch.no_grad():
        other[1].running_mean.add_(1.0)
        other[1].weight.mul_(2.0)
    model.load_state_dict(other.state_dict())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(model.eval()(x), other(x))
    unfreeze(model)
    for k, v in other.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("cls", [BatchNormAct2d, nn.BatchNorm2d], ids=["in-place", "swapped"])
def test_converted_layer_survives_deepcopy_and_pickle(cls):
    model = _subclass_model(lambda: cls(4))
    freeze_batchnorm(model, convert=True)
    x = torch.randn(2, 3, 5, 5)
    reference = model(x)
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        twin = copy_of(model)
        assert is_converted_batchnorm(twin[1]) and torch.equal(twin(x), reference)
        unfreeze(twin)
        assert type(twin[1]) is cls and twin[1].weight.requires_grad
        with torch.no_grad():
            twin[1].weight.add_(1.0)  # the copy's own tensors: the original model does not move
        assert torch.equal(model(x), reference)
    assert is_converted_batchnorm(model[1])  # the original is untouched


def test_a_pinned_batchnorm_converted_then_unfrozen_follows_its_parent():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    freeze_batchnorm(model)  # pinned eval (origin: freeze) ...
    freeze_batchnorm(model, convert=True)  # ... then converted: the kept layer still holds that pin
    unfreeze(model)
    assert type(model[1]) is nn.BatchNorm2d and pinned_modes(model) == {}
    assert model.train()[1].training and not model.eval()[1].training


def test_the_issue_example_keeps_the_relu_and_unfreezes():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4)).eval()
    x = torch.randn(2, 3, 5, 5)
    ref = m(x)
    freeze_batchnorm(m, convert=True)
    assert torch.equal(m(x), ref) and (m(x) >= 0).all()
    unfreeze(m)
    assert type(m[1]) is BatchNormAct2d and torch.equal(m(x), ref)


def test_unfreeze_that_fails_validation_leaves_converted_layers_and_flags_alone():
    model = nn.Sequential(nn.Linear(3, 4), TimmBatchNormAct1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight = nn.Parameter(torch.randn(4, 4))  # tied across the selection
    freeze_batchnorm(model, convert=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SharedParameterError):
        unfreeze(model, "0", "1")
    assert is_converted_batchnorm(model[1]) and not any(p.requires_grad for p in model.parameters())
    assert pinned_modes(model) == {"1": "eval"}


class TimmBatchNormAct1d(nn.BatchNorm1d):
    def __init__(self, n: int, *, act: bool = True) -> None:
        super().__init__(n)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def test_a_subclass_can_be_the_model_itself():
    layer = BatchNormAct2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    reference = layer(x)
    freeze_batchnorm(layer, convert=True)
    assert torch.equal(layer.train()(x), reference) and list(layer.parameters(recurse=False)) == []
    unfreeze(layer)
    assert layer.weight.requires_grad and layer.train().training  # the pin is gone


def test_plain_batchnorm_converts_back_to_the_same_object_and_parameters():
    model = nn.Sequential(nn.BatchNorm2d(3))
    bn, weight = model[0], model[0].weight
    bn.extra_note = "kept"  # an attribute the constructor knows nothing about
    freeze_batchnorm(model, convert=True)
    assert type(model[0]) is FrozenBatchNorm2d
    with torch.no_grad():
        model[0].running_var.fill_(4.0)
    unfreeze(model)
    assert model[0] is bn and model[0].weight is weight and bn.extra_note == "kept"
    assert torch.equal(bn.running_var, torch.full((3,), 4.0)) and weight.requires_grad


# --- drop-in compatibility with torchvision / detectron2 (issue 15.4) -------------------------------


def test_repr_matches_torchvision():
    assert repr(FrozenBatchNorm2d(32)) == "FrozenBatchNorm2d(32, eps=1e-05)"
    model = freeze_batchnorm(nn.Sequential(nn.BatchNorm2d(8, eps=1e-3)), convert=True)
    assert repr(model[0]) == "FrozenBatchNorm2d(8, eps=0.001)"
    assert repr(FrozenBatchNorm1d(2, affine=False)) == "FrozenBatchNorm1d(2, eps=1e-05, affine=False)"


def _torchvision_state(n: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """What torchvision.ops.misc.FrozenBatchNorm2d (and detectron2's) state_dict holds: four buffers."""
    g = torch.Generator().manual_seed(3)
    return {
        prefix + "weight": torch.rand(n, generator=g) + 0.5,
        prefix + "bias": torch.randn(n, generator=g),
        prefix + "running_mean": torch.randn(n, generator=g),
        prefix + "running_var": torch.rand(n, generator=g) + 0.5,
    }


def test_a_torchvision_frozen_batchnorm_state_dict_loads():
    state = _torchvision_state(5, "1.")
    model = nn.Sequential(nn.Conv2d(2, 5, 1), FrozenBatchNorm2d(5))
    model[1].num_batches_tracked.fill_(7)
    model.load_state_dict({**nn.Conv2d(2, 5, 1).state_dict(prefix="0."), **state})  # strict
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(model[1], name), state["1." + name])
    assert int(model[1].num_batches_tracked) == 7  # not in torchvision's format: kept
    # torchvision's forward: x * (w * rsqrt(rv + eps)) + (b - rm * scale)
    x = torch.randn(2, 5, 3, 3)
    scale = state["1.weight"] * (state["1.running_var"] + 1e-5).rsqrt()
    shift = state["1.bias"] - state["1.running_mean"] * scale
    torch.testing.assert_close(model[1](x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


def test_a_state_dict_missing_statistics_is_still_refused():
    with pytest.raises(RuntimeError, match="running_var"):
        FrozenBatchNorm2d(3).load_state_dict({"weight": torch.ones(3), "bias": torch.zeros(3)})


# --- freeze_to(train_bn=...) (issue 15.4) -----------------------------------------------------------


def _grouped_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.LazyLinear(2),
    )


@pytest.mark.parametrize(
    "kwargs,bn_trains",
    [({}, False), ({"train_bn": False}, False), ({"train_bn": True}, True)],
    ids=["default", "train_bn-false", "train_bn-true"],
)
def test_freeze_to_train_bn(kwargs, bn_trains):
    model = _grouped_cnn()
    model(torch.randn(1, 3, 2, 2))
    freeze_to(model, 2, groups=["0", "1", "3"], **kwargs)
    flags = requires_grad_map(model)
    assert not flags["0.0.weight"] and not flags["1.0.bias"] and flags["3.weight"]
    assert flags["0.1.weight"] is bn_trains and flags["1.1.bias"] is bn_trains


def test_freeze_to_train_bn_converts_frozen_groups_norms_back_and_checks_its_type():
    model = _grouped_cnn()
    model(torch.randn(1, 3, 2, 2))
    freeze_batchnorm(model, convert=True)
    before = requires_grad_map(model)
    with pytest.raises(ArgumentTypeError, match="train_bn"):
        freeze_to(model, 1, groups=["0", "1", "3"], train_bn="yes")  # type: ignore[arg-type]
    assert requires_grad_map(model) == before and isinstance(model[0][1], FrozenBatchNorm2d)
    freeze_to(model, 1, groups=["0", "1", "3"], train_bn=True)
    assert type(model[0][1]) is nn.BatchNorm2d and model[0][1].weight.requires_grad
    assert not model[0][0].weight.requires_grad and model[1][0].weight.requires_grad


def test_freeze_state_records_a_subclass_converted_in_place():
    def build() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.Conv2d(4, 2, 1))

    model = build()
    freeze_batchnorm(model, convert=True)
    state = tf.freeze_state(model)
    assert state["converted_norms"] == ["1"]
    fresh = tf.load_freeze_state(build(), state)
    assert type(fresh[1]) is BatchNormAct2d and is_converted_batchnorm(fresh[1])
    assert list(fresh[1].parameters(recurse=False)) == [] and list(fresh.state_dict()) == list(model.state_dict())
