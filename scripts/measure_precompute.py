"""Measure precompute_features on the issue-13 MLP (not a test): run time against the careful loop and the floor.

The workload of issue 13: a frozen backbone of 6 x (Linear(512, 512) + GELU), 40 batches of 64
inputs, a linear head trained with SGD, one thread, everything in one process. Reported (median
and interquartile range of ``torch.utils.benchmark.Timer.blocked_autorange``):

* ``no_grad epoch``: the careful loop (backbone under ``no_grad`` in eval, then the head step);
* ``precompute``: ``precompute_features`` in memory (the backbone once, ``verify=8``), and with a
  directory, writing the file and reusing it;
* ``epoch on precomputed``: a head epoch over ``ds.batches(64, shuffle=True)``, and over a
  ``DataLoader(ds, 64, shuffle=True)`` (per-item indexing and the default collate);
* ``floor``: a head epoch over features already in one tensor, ``index_select`` per batch.

Usage: ``.venv/bin/python scripts/measure_precompute.py [--min-run-time 2.0]``
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.data import DataLoader, TensorDataset

from torchfreeze import freeze
from torchfreeze.speed import precompute_features

BATCH, BATCHES, WIDTH, CLASSES = 64, 40, 512, 10


def backbone() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    return freeze(nn.Sequential(*layers), mode="eval")


def head_epoch(head: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[Any]) -> None:
    for features, target in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(head(features), target).backward()
        opt.step()


def measure(name: str, fn: Callable[[], Any], min_run_time: float) -> tuple[str, float, float]:
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return name, m.median, m.iqr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * BATCHES, WIDTH, generator=g)
    y = torch.randint(0, CLASSES, (BATCH * BATCHES,), generator=g)
    data = TensorDataset(x, y)
    bb = backbone()
    head = nn.Linear(WIDTH, CLASSES)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)

    def no_grad_epoch() -> None:
        order = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            with torch.no_grad():
                features = bb(x[idx])
            head_epoch(head, opt, [(features, y[idx])])

    ds = precompute_features(bb, data, batch_size=BATCH)
    features = ds.features.clone()

    def floor_epoch() -> None:
        order = torch.randperm(len(features))
        head_epoch(
            head,
            opt,
            (
                (features.index_select(0, order[i : i + BATCH]), y[order[i : i + BATCH]])
                for i in range(0, len(x), BATCH)
            ),
        )

    directory = tempfile.mkdtemp(prefix="measure-precompute-")
    counter = iter(range(1 << 30))
    rows = [
        measure("no_grad epoch (careful loop)", no_grad_epoch, args.min_run_time),
        measure(
            "precompute_features, memory", lambda: precompute_features(bb, data, batch_size=BATCH), args.min_run_time
        ),
        measure(
            "precompute_features, memory, verify=0",
            lambda: precompute_features(bb, data, batch_size=BATCH, verify=0),
            args.min_run_time,
        ),
        measure(
            "precompute_features, new file",
            lambda: precompute_features(bb, data, batch_size=BATCH, directory=directory, salt=str(next(counter))),
            args.min_run_time,
        ),
        measure(
            "precompute_features, file reused",
            lambda: precompute_features(bb, data, batch_size=BATCH, directory=directory),
            args.min_run_time,
        ),
        measure(
            "epoch on ds.batches(64, shuffle=True)",
            lambda: head_epoch(head, opt, ds.batches(BATCH, shuffle=True)),
            args.min_run_time,
        ),
        measure(
            "epoch on DataLoader(ds, 64, shuffle=True)",
            lambda: head_epoch(head, opt, DataLoader(ds, BATCH, shuffle=True)),
            args.min_run_time,
        ),
        measure("floor (tensor, index_select per batch)", floor_epoch, args.min_run_time),
    ]
    no_grad, floor = rows[0][1], rows[-1][1]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, {BATCHES} batches of {BATCH}, 6 x Linear({WIDTH}) + GELU"
    )
    print(f"{'what':45s} {'median ms':>10s} {'IQR ms':>8s} {'/ no_grad':>10s} {'/ floor':>8s}")
    for name, median, iqr in rows:
        print(f"{name:45s} {median * 1e3:10.2f} {iqr * 1e3:8.2f} {median / no_grad:10.2f} {median / floor:8.2f}")


if __name__ == "__main__":
    main()
