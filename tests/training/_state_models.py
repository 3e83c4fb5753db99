"""Models shared by the freeze-state and checkpoint tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from torchfreeze import Frozen, freeze, freeze_batchnorm, pin_mode


class Model(nn.Module):
    def __init__(self, seed: int = 0, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width))
        self.proj = Frozen(nn.Linear(width, width))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.drop(self.proj(self.backbone(x)))) * self.scale
        return out


class Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)


SETUPS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "freeze-eval": lambda m: freeze(m, "backbone", mode="eval"),
    "freeze-plain": lambda m: freeze(m, "backbone.0", "backbone.3"),
    "freeze-bn": lambda m: freeze_batchnorm(freeze(m, "backbone.0"), "backbone"),
    "convert-bn": lambda m: freeze_batchnorm(freeze(m, "backbone.0", "backbone.3"), "backbone", convert=True),
    "user-pin": lambda m: pin_mode(freeze(m, "backbone"), "drop", mode="train"),
    "nothing": lambda m: m,
}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, bit-equal values."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
