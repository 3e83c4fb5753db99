"""foldable_pairs: which Conv/Linear -> BatchNorm pairs a model has (fx trace, else Sequential), and why not."""

from __future__ import annotations

import torch
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
