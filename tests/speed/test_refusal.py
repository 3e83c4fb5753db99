"""Tests of what the feature cache refuses: trainable parameters, random and statistics-changing layers, inputs that require grad."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _cache_models import frozen_mlp, trainable_param
from torch import nn

import torchfreeze as tf
from torchfreeze.speed import cache_features, cache_refusal_reasons


def dropout_train() -> nn.Module:
    m = frozen_mlp()
    m[2].train()
    return m


def bn_train() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).requires_grad_(False).train()


def bn_no_stats() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False)).requires_grad_(False).eval()


@pytest.mark.parametrize(
    ("build", "named"),
    [
        pytest.param(trainable_param, "'3.bias' is trainable", id="trainable-parameter"),
        pytest.param(dropout_train, "'2' (Dropout", id="dropout-in-train-mode"),
        pytest.param(bn_train, "'1' (BatchNorm1d) is in train mode", id="batchnorm-updating"),
        pytest.param(bn_no_stats, "track_running_stats=False", id="batchnorm-batch-stats"),
    ],
)
def test_refuses_naming_the_reason_and_changes_nothing(build: object, named: str) -> None:
    module = build()  # type: ignore[operator]
    flags = [p.requires_grad for p in module.parameters()]
    modes = [m.training for m in module.modules()]
    state = copy.deepcopy(module.state_dict())
    with pytest.raises(tf.errors.CacheRefusedError, match="cannot cache") as info:
        cache_features(module)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)
    assert [p.requires_grad for p in module.parameters()] == flags
    assert [m.training for m in module.modules()] == modes
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_dropout = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.attention_dropout, self.training)


@pytest.mark.parametrize(
    ("layer", "named"),
    [
        pytest.param(nn.LSTM(2, 2, num_layers=2, dropout=0.3), "dropout=0.3", id="lstm"),
        pytest.param(nn.MultiheadAttention(4, 2, dropout=0.2), "dropout=0.2", id="attention"),
        pytest.param(FunctionalDropout(), "attention_dropout=0.1", id="functional-dropout"),
        pytest.param(nn.RReLU(), "RReLU, lower=", id="rrelu"),
    ],
)
def test_other_random_layers_in_train_mode_are_refused(layer: nn.Module, named: str) -> None:
    layer.requires_grad_(False).train()
    assert named in cache_refusal_reasons(layer)[0]
    assert cache_refusal_reasons(layer.eval()) == []


def test_parameter_shared_with_a_use_outside_frozen_is_refused() -> None:
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(tf.Frozen(lin), lin)  # the second use trains lin
    assert "'1.weight' is trainable" in cache_refusal_reasons(shared)[0]
    assert cache_refusal_reasons(nn.Sequential(tf.Frozen(nn.Linear(3, 3)))) == []


def test_dropout_with_p_zero_is_deterministic() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)).requires_grad_(False).train()
    assert cache_refusal_reasons(m) == []


def test_instance_norm_is_per_sample_unless_it_tracks_statistics_in_train_mode() -> None:
    plain = nn.Sequential(nn.Conv1d(2, 2, 1), nn.InstanceNorm1d(2)).requires_grad_(False).train()
    assert cache_refusal_reasons(plain) == []
    tracking = nn.Sequential(nn.InstanceNorm1d(2, track_running_stats=True)).train()
    assert "updates its running statistics" in cache_refusal_reasons(tracking)[0]
    assert cache_refusal_reasons(tracking.eval()) == []


def test_unfreeze_after_wrapping_is_refused_at_call_time() -> None:
    inner = frozen_mlp()
    cached = cache_features(inner)
    cached(torch.randn(2, 6))
    inner[0].weight.requires_grad_(True)
    with pytest.raises(tf.errors.CacheRefusedError, match="'0.weight' is trainable"):
        cached(torch.randn(2, 6))


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_replaced_wrapped_module_never_returns_the_old_entries(on_disk: bool, tmp_path: Path) -> None:
    cached = cache_features(frozen_mlp(seed=0), directory=tmp_path if on_disk else None)
    x = torch.randn(3, 6)
    before = cached(x)
    cached.module = frozen_mlp(seed=1)
    expected = cached.module(x)
    assert not torch.allclose(expected, before)
    torch.testing.assert_close(cached(x), expected)
    cached.module = trainable_param()
    with pytest.raises(tf.errors.CacheRefusedError, match="replaced after cache_features"):
        cached(x)


def test_input_that_requires_grad_is_refused() -> None:
    cached = cache_features(frozen_mlp())
    x = torch.randn(2, 6, requires_grad=True)
    with pytest.raises(tf.errors.CacheRefusedError, match="requires grad"):
        cached(x)
    with torch.no_grad():
        cached(x)  # fine without autograd
