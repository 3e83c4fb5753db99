"""Shared models of the compose tests: a counting MLP and a backbone with the protocol methods.

Named ``_compose_models`` (not ``_models``): test directories share one import name space,
and ``tests/distributed/_models.py`` exists.
"""

from __future__ import annotations

import torch
from torch import nn

from _helpers import Counting


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Counting(nn.Linear(6, 5)), nn.ReLU(), Counting(nn.Linear(5, 2)))


class ProtocolBackbone(nn.Module):
    feature_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 3)
        self.b = nn.Linear(3, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not used by Composite
        raise AssertionError("Composite must call forward_features")

    def layer_groups(self) -> list[str]:
        return ["a", "b"]
