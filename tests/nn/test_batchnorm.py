"""freeze_batchnorm and FrozenBatchNorm1d/2d/3d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _helpers import requires_grad_map
from torchfreeze import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
    pinned_modes,
    unfreeze,
)
from torchfreeze.errors import ArgumentError

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
    with pytest.raises(ArgumentError, match="convert="):
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
