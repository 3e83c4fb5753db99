"""One training step, shared by the guard and check tests."""

from __future__ import annotations

import torch
from torch import nn


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor | None = None) -> None:
    """Forward a batch (default: 8 random rows of 4 features), backward the sum, step, zero the grads."""
    x = torch.randn(8, 4) if x is None else x
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
