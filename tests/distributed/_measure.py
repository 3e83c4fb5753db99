"""Measure the bytes DDP and FSDP2 move per step for a partly frozen model (torchrun, 2 processes, gloo).

Run: ``torchrun --standalone --nproc_per_node=2 tests/distributed/_measure.py`` (rank 0 prints a
Markdown table). Not a test: docs/distributed.md quotes its output. Bytes are counted exactly (a
DDP communication hook; FSDP2's ``all_gather_single`` / ``reduce_scatter_single`` calls wrapped
for the measurement only), per optimizer step, after one warm-up step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _models import Blocks, batch, counting_hook, trainable_bytes

import torchfreeze
from torchfreeze.distributed import wrap

WIDTH = 256
FROZEN = ("stem", "blocks.0", "blocks.1", "blocks.2")  # blocks.3 and the head train
COUNTS: dict[str, int] = {"all_gather": 0, "reduce_scatter": 0}


def _counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        # the whole buffer: all-gather's output, reduce-scatter's input (the larger tensor argument)
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        COUNTS[name] += max(t.numel() * t.element_size() for t in tensors)
        return fn(*args, **kwargs)

    return call


dist.all_gather_single = _counted("all_gather", dist.all_gather_single)  # type: ignore[attr-defined]
dist.reduce_scatter_single = _counted("reduce_scatter", dist.reduce_scatter_single)  # type: ignore[attr-defined]


def _model(frozen: bool) -> nn.Module:
    model = Blocks(WIDTH)
    return torchfreeze.freeze(model, *FROZEN) if frozen else model


def _local_bytes(tensors: Any) -> int:
    from torchfreeze._core.wrappers import local_tensor

    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors if t is not None)


def _steps(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], rank: int) -> dict[str, int]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for step in range(2):
        if step == 1:
            COUNTS.update(all_gather=0, reduce_scatter=0)
        x, y = batch(rank, step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward(x), y).backward()
        grads = _local_bytes(p.grad for p in model.parameters())
        opt.step()
    return {**COUNTS, "grad": grads, "params": _local_bytes(model.parameters())}


def ddp(rank: int, frozen: bool) -> dict[str, int]:
    model = _model(frozen)
    sizes: list[int] = []
    h = wrap(model, on_wrap=counting_hook(sizes))
    out = _steps(model, lambda x: h(x), rank)  # type: ignore[no-any-return]
    out["all_reduce"] = sum(sizes) // 2  # two steps counted; the same every step
    h.release()
    return out


def fsdp(rank: int, layout: str) -> dict[str, int]:
    from torch.distributed.fsdp import fully_shard

    model = _model(layout != "full")
    kwargs: dict[str, Any] = {"reshard_after_forward": layout != "no-reshard"}
    if layout == "frozen-group":  # one group for the whole frozen part, one per trainable block
        frozen_part = [model.stem, *list(model.blocks)[:3]]
        fully_shard(frozen_part, **kwargs)  # type: ignore[arg-type]
        fully_shard(model.blocks[3], **kwargs)
        fully_shard(model, **kwargs)
    elif layout == "ignored":  # the frozen part left out of sharding: replicated, never communicated
        ignored = {p for (p,) in [(p,) for n, p in model.named_parameters() if n.startswith(FROZEN)]}
        fully_shard(model.blocks[3], **kwargs)
        fully_shard(model, ignored_params=ignored, **kwargs)
    else:  # one group per block (the usual recipe), frozen or not
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    return _steps(model, model, rank)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    total = sum(p.numel() * p.element_size() for p in Blocks(WIDTH).parameters())
    rows = [
        ("DDP, nothing frozen", ddp(rank, False)),
        ("DDP, frozen before wrap (wrap handle)", ddp(rank, True)),
        ("FSDP2 per block, nothing frozen", fsdp(rank, "full")),
        ("FSDP2 per block, frozen part in its own blocks", fsdp(rank, "per-block")),
        ("FSDP2 per block, reshard_after_forward=False", fsdp(rank, "no-reshard")),
        ("FSDP2 one group for the frozen part", fsdp(rank, "frozen-group")),
        ("FSDP2 frozen part in ignored_params", fsdp(rank, "ignored")),
    ]
    if rank == 0:
        trained = trainable_bytes(_model(True))
        print(f"model {total:,} B of parameters, {trained:,} B trainable when frozen (world size 2, fp32)")
        print(
            "| layout | all-reduce B/step | all-gather B/step | reduce-scatter B/step | local grad B | local param B |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, r in rows:
            print(
                f"| {name} | {r.get('all_reduce', 0):,} | {r['all_gather']:,} | {r['reduce_scatter']:,} "
                f"| {r['grad']:,} | {r['params']:,} |"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
