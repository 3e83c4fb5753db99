"""Worker for tests/test_distributed.py: launched by torchrun with 2 processes (gloo, CPU).

Builds a model with a frozen backbone part and a ``Frozen`` use, prepares it with
``torchfreeze.prepare_for_distributed``, trains 3 steps under DDP with rank-specific data,
and writes a JSON report (per rank) that the test asserts on.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchfreeze


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank
        self.pre = nn.Linear(6, 8)
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.adapter = torchfreeze.Frozen(nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.adapter(self.backbone(torch.relu(self.pre(x)))))
        return out


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = torchfreeze.freeze(Model(), "backbone", mode="eval")
    torchfreeze.prepare_for_distributed(model)  # the Frozen use's parameters stop requiring grad
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    frozen_names = sorted(
        [n for n, _ in torchfreeze.frozen_parameters(model)]
        + ["backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"]
    )
    ddp = DDP(model)  # find_unused_parameters=False: would fail on a grad-less requires_grad parameter
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.1))
    loss_fn = nn.CrossEntropyLoss()
    ddp.train()  # type: ignore[no-untyped-call]
    with torchfreeze.guard(model, opt):
        for step in range(3):
            g = torch.Generator().manual_seed(100 * rank + step)  # different data per rank
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad(set_to_none=False)
            loss_fn(ddp(x), y).backward()
            opt.step()
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # gather every rank's final tensors on every rank
    gathered: list[dict[str, torch.Tensor]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, end)
    report = {
        "rank": rank,
        "world": world,
        "frozen": frozen_names,
        "frozen_unchanged": [n for n in frozen_names if torch.equal(start[n], end[n])],
        "frozen_same_across_ranks": [n for n in frozen_names if all(torch.equal(g[n], end[n]) for g in gathered)],
        "trainable": [n for n, _ in torchfreeze.trainable_parameters(model)],
        "trainable_same_across_ranks": [
            n for n, _ in torchfreeze.trainable_parameters(model) if all(torch.equal(g[n], end[n]) for g in gathered)
        ],
        "trainable_changed": [
            n for n, _ in torchfreeze.trainable_parameters(model) if not torch.equal(start[n], end[n])
        ],
        "adapter_requires_grad": model.get_parameter("adapter.module.weight").requires_grad,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
