"""foldable_pairs: which Conv/Linear -> BatchNorm pairs a model has (fx trace, else Sequential), and why not."""

from __future__ import annotations

import torch
import torch.fx
from _resnet import BasicBlock, TinyResNet, trained_resnet
from torch import nn

import torchfreeze as tf
from torchfreeze.nn.foldable import foldable_pairs


class Traced(nn.Module):
    """Not a Sequential: the pair is found through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Untraceable(nn.Module):
    """Control flow on a tensor value: symbolic tracing fails, the Sequential children are used."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def test_pairs_from_a_trace() -> None:
    assert [(c, b) for c, b, _ in foldable_pairs(Traced())] == [("conv", "bn")]


def test_a_model_that_does_not_trace_falls_back_to_sequential_children() -> None:
    model = Untraceable()
    assert [(c, b) for c, b, _ in foldable_pairs(model)] == [("body.0", "body.1")]
    tf.freeze(model)
    tf.freeze_batchnorm(model)
    assert foldable_pairs(model) == [("body.0", "body.1", None)]


def test_reasons_until_frozen_and_pinned() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    [(_, _, reason)] = foldable_pairs(model)
    assert reason is not None and "'0.weight' is trainable" in reason
    tf.freeze(model)
    [(_, _, reason)] = foldable_pairs(model)
    assert reason is not None and "not pinned to eval" in reason
    tf.freeze_batchnorm(model)
    assert foldable_pairs(model) == [("0", "1", None)]


def test_converted_batchnorm_is_foldable_and_untracked_statistics_are_not() -> None:
    model = tf.freeze_batchnorm(tf.freeze(nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3))), convert=True)
    assert foldable_pairs(model) == [("0", "1", None)]
    untracked = tf.freeze(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)))
    [(_, _, reason)] = foldable_pairs(untracked)
    assert reason is not None and "track_running_stats=False" in reason


def test_frozen_batchnorm_forward_traces_with_torch_fx() -> None:
    model = tf.freeze_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), convert=True)
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    traced = torch.fx.symbolic_trace(model)  # plain torch.fx: FrozenBatchNorm2d is not a leaf there
    assert any(n.op == "call_function" and "frozen_batch_norm" in str(n.target) for n in traced.graph.nodes)
    x = torch.randn(2, 2, 4, 4)
    assert torch.equal(traced(x), model(x))
    xg = x.clone().requires_grad_(True)  # the other branch, taken at run time, not at trace time
    torch.testing.assert_close(traced(xg), model(x))
    traced(xg).sum().backward()
    assert xg.grad is not None


class Stochastic(nn.Module):
    """The top-level forward does not trace; its blocks do (ResNet blocks calling self.bn1(self.conv1(x)))."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([BasicBlock(3, 4, 2), BasicBlock(4, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if x.mean() > 0:  # control flow on a value
                x = block(x)
        return x


def test_pairs_inside_blocks_of_a_model_that_does_not_trace() -> None:
    model = Stochastic()
    tf.freeze_batchnorm(tf.freeze(model), convert=True)
    pairs = foldable_pairs(model)
    assert [(c, b) for c, b, _ in pairs] == [
        ("blocks.0.downsample.0", "blocks.0.downsample.1"),
        ("blocks.0.conv1", "blocks.0.bn1"),
        ("blocks.0.conv2", "blocks.0.bn2"),
        ("blocks.1.conv1", "blocks.1.bn1"),
        ("blocks.1.conv2", "blocks.1.bn2"),
    ]
    assert all(reason is None for _, _, reason in pairs)


def test_same_pairs_converted_or_not_on_a_resnet() -> None:
    pinned = tf.freeze_batchnorm(tf.freeze(trained_resnet()))
    converted = tf.freeze_batchnorm(tf.freeze(trained_resnet()), convert=True)
    assert foldable_pairs(pinned) == foldable_pairs(converted)
    assert len(foldable_pairs(converted)) == TinyResNet.PAIRS
