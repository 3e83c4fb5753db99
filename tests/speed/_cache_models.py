"""Modules shared by the feature-cache tests (tests/speed/test_{cache,keys,storage,entry,refusal}.py)."""

from __future__ import annotations

import torch
from torch import nn


def frozen_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4))
    return m.requires_grad_(False).eval()


def trainable_param() -> nn.Module:
    m = frozen_mlp()
    m[3].bias.requires_grad_(True)
    return m
