"""Small models shared by the distributed tests (in-process and torchrun workers).

No ``from __future__ import annotations`` here: DDP checks the annotations of a
communication hook at run time, so they must be real objects.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import torchfreeze


class Blocks(nn.Module):
    """An embedding-free stack: ``stem``, four ``blocks`` and a ``head``; the same weights on every rank."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(4)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(self.stem(x)))
        return out


class WithFrozenUse(nn.Module):
    """A trainable ``pre`` and ``head`` around a ``Frozen`` adapter whose parameters still require grad."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(6, 8)
        self.adapter = torchfreeze.Frozen(nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.adapter(self.pre(x))))
        return out


def batch(rank: int, step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank- and step-specific data (replicas see different batches, as under DDP)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters (what DDP should all-reduce per step)."""
    return sum(p.numel() * p.element_size() for _, p in torchfreeze.trainable_parameters(model))


def counting_hook(sizes: list[int]) -> Callable[[nn.parallel.DistributedDataParallel], None]:
    """An ``on_wrap`` that registers an all-reduce hook appending each bucket's byte count to ``sizes``."""

    def hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        sizes.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]

    def register(ddp: nn.parallel.DistributedDataParallel) -> None:
        ddp.register_comm_hook(None, hook)

    return register
