"""Worker for tests/distributed/test_distributed.py: launched by torchrun with 2 processes (gloo, CPU).

``python _ddp_worker.py OUT_DIR SCENARIO [SCENARIO ...]`` runs each scenario in turn on every rank
and writes ``OUT_DIR/<scenario>.rank<r>.json`` (what the test asserts on); an exception in a
scenario is written to its report (``"error"``) and the next scenario runs. Scenario ``fail``
makes rank 1 die, to test that a failing rank ends the whole run.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from _models import Blocks, batch, counting_hook, trainable_bytes
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchfreeze
from torchfreeze.distributed import load_distributed, release, save_distributed, wrap
from torchfreeze.errors import ArgumentError


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


def _everywhere(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's copy of ``tensors`` (all_gather_object)."""
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, tensors)
    return gathered


def _same_everywhere(tensors: dict[str, torch.Tensor]) -> list[str]:
    gathered = _everywhere(tensors)
    return [n for n, t in tensors.items() if all(torch.equal(g[n], t) for g in gathered)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reduced_step(
    module: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int, sizes: list[int], *, set_to_none: bool
) -> int:
    """One training step of ``module`` on this rank's batch; returns the bytes DDP all-reduced in it."""
    x, y = batch(rank, step)
    sizes.clear()
    opt.zero_grad(set_to_none=set_to_none)
    nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    return sum(sizes)


def prepare(rank: int) -> dict[str, Any]:
    """Freeze before wrapping with prepare_for_distributed; a raw DDP; guard; all-reduced bytes."""
    model = torchfreeze.freeze(Model(), "backbone", mode="eval")
    torchfreeze.prepare_for_distributed(model)  # the Frozen use's parameters stop requiring grad
    start = _state(model)
    frozen_names = sorted(n for n in start if n.startswith(("backbone.", "adapter.")))  # state_dict keys
    ddp = DDP(model)  # find_unused_parameters=False: would fail on a grad-less requires_grad parameter
    sizes: list[int] = []
    counting_hook(sizes)(ddp)
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.1))
    ddp.train()  # type: ignore[no-untyped-call]
    per_step = []
    with torchfreeze.guard(model, opt):
        for step in range(3):
            per_step.append(_reduced_step(ddp, opt, rank, step, sizes, set_to_none=False))
    end = _state(model)
    trainable = [n for n, _ in torchfreeze.trainable_parameters(model)]
    return {
        "world": dist.get_world_size(),
        "frozen": frozen_names,
        "frozen_unchanged": [n for n in frozen_names if torch.equal(start[n], end[n])],
        "frozen_same_across_ranks": [n for n in _same_everywhere(end) if n in frozen_names],
        "trainable": trainable,
        "trainable_same_across_ranks": [n for n in _same_everywhere(end) if n in trainable],
        "trainable_changed": [n for n in trainable if not torch.equal(start[n], end[n])],
        "adapter_requires_grad": model.get_parameter("adapter.module.weight").requires_grad,
        "reduced_bytes": per_step,
        "trainable_bytes": trainable_bytes(model),
        "all_bytes": sum(t.numel() * t.element_size() for t in model.parameters()),
    }


def handle(rank: int) -> dict[str, Any]:
    """GradualUnfreezing through a wrap handle: re-wraps, reduces the trainable bytes, stays in sync."""
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    start = _state(model)
    sizes: list[int] = []
    h = wrap(model, on_wrap=counting_hook(sizes))
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.1))
    sched = torchfreeze.GradualUnfreezing(model, opt, {2: "blocks.3", 4: "blocks.2"})
    steps = []
    with torchfreeze.guard(model, opt):
        for step in range(6):
            reduced = _reduced_step(h, opt, rank, step, sizes, set_to_none=True)
            steps.append({"reduced": reduced, "trainable": trainable_bytes(model)})
            sched.step()
    end = _state(model)
    never = [n for n in start if n.startswith(("stem", "blocks.0", "blocks.1"))]
    unfrozen = [n for n in start if n.startswith(("blocks.2", "blocks.3"))]
    problems = [str(p) for p in torchfreeze.check(model, opt)]
    h.release()
    return {
        "steps": steps,
        "rewraps": h.rewraps,
        "same_across_ranks": sorted(_same_everywhere(end)),
        "all": sorted(end),
        "never_unfrozen_unchanged": [n for n in never if torch.equal(start[n], end[n])],
        "never_unfrozen": never,
        "unfrozen_changed": [n for n in unfrozen if not torch.equal(start[n], end[n])],
        "unfrozen": unfrozen,
        "check": problems,
    }


def fsdp(rank: int) -> dict[str, Any]:
    """FSDP2: guard on DTensors, unfreezing mid-run, save_trainable gathered, load_trainable both ways."""
    from torch.distributed.fsdp import fully_shard

    out_dir = sys.argv[1]
    model = torchfreeze.freeze(Blocks(), "stem", "blocks.0", "blocks.1")
    plain_start = _state(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.1))
    report: dict[str, Any] = {"sharded": type(model.get_parameter("stem.weight")).__name__}
    with torchfreeze.guard(model, opt) as g:
        for step in range(4):
            if step == 2:
                torchfreeze.unfreeze(model, "blocks.1")
                torchfreeze.add_unfrozen(model, opt)
            x, y = batch(rank, step)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        report["guard_checks"] = g.checks
    local = model.get_parameter("stem.weight").to_local()  # type: ignore[operator]
    keep = local.detach().clone()
    with torchfreeze.guard(model) as g:
        if rank == 1:  # this rank's shard of a frozen weight moves
            with torch.no_grad():
                local.add_(0.5)
        try:
            g.verify()
            report["guard_caught"] = None
        except torchfreeze.errors.FrozenTensorChangedError as err:
            report["guard_caught"] = err.changes
    with torch.no_grad():
        local.copy_(keep)
    report["check"] = [str(p) for p in torchfreeze.check(model, opt)]
    report["summary_total"] = str(torchfreeze.summary(model)).splitlines()[-1]
    report["frozen_state"] = torchfreeze.freeze_state(model)["frozen"]
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # type: ignore[operator]
    report["frozen_unchanged"] = sorted(
        n for n in full if n.startswith(("stem", "blocks.0")) and torch.equal(full[n], plain_start[n])
    )
    report["changed"] = sorted(n for n in full if not torch.equal(full[n], plain_start[n]))
    path = os.path.join(out_dir, "fsdp.safetensors")
    torchfreeze.save_trainable(model, path)
    plain = torchfreeze.freeze(Blocks(), "stem", "blocks.0", "blocks.1")
    torchfreeze.load_trainable(plain, path)
    report["plain_loaded_equal"] = sorted(n for n, t in plain.state_dict().items() if torch.equal(t, full[n]))
    again = torchfreeze.freeze(Blocks(), "stem", "blocks.0", "blocks.1")
    for block in again.blocks:
        fully_shard(block)
    fully_shard(again)
    torchfreeze.load_trainable(again, path)
    mine = {k: v.to_local() for k, v in model.state_dict().items()}  # type: ignore[operator]
    report["sharded_loaded_equal"] = sorted(
        k
        for k, v in again.state_dict().items()
        if torch.equal(v.to_local(), mine[k])  # type: ignore[operator]
    )
    report["all"] = sorted(full)
    # a parameter left out of sharding cannot be unfrozen
    left = torchfreeze.freeze(Blocks(), "stem")
    fully_shard(left, ignored_params=set(left.stem.parameters()))
    try:
        torchfreeze.unfreeze(left, "stem")
        report["ignored_refused"] = None
    except ArgumentError as err:
        report["ignored_refused"] = str(err)
    report["ignored_still_frozen"] = not left.stem.weight.requires_grad
    return report


def _resume_run(
    rank: int, shard: bool, steps: range, ckpt: str | None = None, load: str | None = None
) -> dict[str, torch.Tensor]:
    """Train ``steps`` (optionally after loading ``load``, optionally saving to ``ckpt``); the full weights."""
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        forward: Callable[[torch.Tensor], torch.Tensor] = model
        h = None
    else:
        h = wrap(model)
        forward = h
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.1))
    lr = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    sched = torchfreeze.GradualUnfreezing(model, opt, {2: "blocks.3", 4: "blocks.2"}, scheduler=lr)
    if load is not None:
        load_distributed(load, model, opt, schedule=sched, scheduler=lr)
    for step in steps:
        x, y = batch(rank, step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        sched.step()
        lr.step()
    if ckpt is not None:
        save_distributed(ckpt, model, opt, schedule=sched, scheduler=lr, ignore_frozen_params=True)
    if h is not None:
        h.release()
    return {k: (v.full_tensor() if shard else v).detach().clone() for k, v in model.state_dict().items()}  # type: ignore[operator]


def _resume(rank: int, shard: bool) -> dict[str, Any]:
    ckpt = os.path.join(sys.argv[1], "dcp-fsdp" if shard else "dcp-ddp")
    whole = _resume_run(rank, shard, range(8))
    _resume_run(rank, shard, range(5), ckpt=ckpt)
    resumed = _resume_run(rank, shard, range(5, 8), load=ckpt)
    return {
        "all": sorted(whole),
        "identical": sorted(k for k in whole if torch.equal(whole[k], resumed[k])),
        "same_across_ranks": sorted(_same_everywhere(resumed)),
    }


def dcp_ddp(rank: int) -> dict[str, Any]:
    """DCP resume under a wrap handle (DDP) after two mid-run unfreezes: bit-identical."""
    return _resume(rank, shard=False)


def dcp_fsdp(rank: int) -> dict[str, Any]:
    """DCP resume of an FSDP2 model (sharded checkpoint) after two mid-run unfreezes: bit-identical."""
    return _resume(rank, shard=True)


def compiled(rank: int) -> dict[str, Any]:
    """torch.compile inside a wrap handle: trains, one recompile per unfreeze, bytes follow, ranks in sync."""
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(len(gm.graph.nodes))  # one entry per (re)compilation
        return gm.forward

    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    start = _state(model)
    sizes: list[int] = []
    h = wrap(torch.compile(model, backend=backend), on_wrap=counting_hook(sizes))
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.1))
    sched = torchfreeze.GradualUnfreezing(model, opt, {3: "blocks.3"})
    steps = []
    for step in range(6):
        reduced = _reduced_step(h, opt, rank, step, sizes, set_to_none=True)
        steps.append({"reduced": reduced, "trainable": trainable_bytes(model), "compiles": len(graphs)})
        sched.step()
    end = _state(model)
    h.release()
    return {
        "steps": steps,
        "rewraps": h.rewraps,
        "all": sorted(end),
        "same_across_ranks": sorted(_same_everywhere(end)),
        "frozen_unchanged": sorted(
            n
            for n in start
            if n.startswith(("stem", "blocks.0", "blocks.1", "blocks.2")) and torch.equal(start[n], end[n])
        ),
        "changed": sorted(n for n in start if not torch.equal(start[n], end[n])),
    }


def misuse(rank: int) -> dict[str, Any]:
    """Every change of requires_grad under a live raw DDP is refused on every rank, nothing changed."""
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    ddp = DDP(model)
    opt = torch.optim.SGD(torchfreeze.param_groups(model, 0.1))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    attempts: dict[str, Callable[[], Any]] = {
        "freeze-ddp": lambda: torchfreeze.freeze(ddp, "head"),
        "unfreeze-ddp": lambda: torchfreeze.unfreeze(ddp, "blocks.3"),
        "unfreeze-inner": lambda: torchfreeze.unfreeze(model, "blocks.3"),
        "gradual-unfreezing": lambda: torchfreeze.GradualUnfreezing(ddp, opt, {1: "blocks.3"}),
    }
    refused = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            refused[name] = ""
        except ArgumentError as err:
            refused[name] = str(err)
    x, y = batch(rank, 0)
    nn.functional.cross_entropy(ddp(x), y).backward()  # the DDP still trains as built
    opt.step()
    release(ddp)
    return {"refused": refused, "unchanged": before == {n: p.requires_grad for n, p in model.named_parameters()}}


def fail(rank: int) -> dict[str, Any]:
    """Rank 1 dies; rank 0 waits in a collective (the run must end, not hang)."""
    if rank == 1:
        raise SystemExit(3)
    dist.barrier()
    return {}


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "prepare": prepare,
    "handle": handle,
    "fsdp": fsdp,
    "dcp_ddp": dcp_ddp,
    "dcp_fsdp": dcp_fsdp,
    "compiled": compiled,
    "misuse": misuse,
    "fail": fail,
}


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    for name in names:
        try:
            report = SCENARIOS[name](rank)
        except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as err:
            # the other rank may wait in a collective: end this process, torchrun then ends the run
            report = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(), "rank": rank}
            with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(report, f)
            sys.stderr.write(report["traceback"])
            sys.stderr.flush()
            os._exit(1)
        report["rank"] = rank
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
