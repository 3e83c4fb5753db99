"""Measure precompute_features on the issue-13 MLP (not a test): run time against the careful loop and the floor.

The workload of issue 13: a frozen backbone of 6 x (Linear(512, 512) + GELU), 40 batches of 64
inputs, a linear head trained with SGD, one thread, everything in one process. Reported (median
and interquartile range over interleaved rounds, see :func:`measure`):

* ``no_grad epoch``: the careful loop (backbone under ``no_grad`` in eval, then the head step), and
  the backbone's forward passes alone;
* ``first epoch``: ``precompute_features`` then one head epoch over its batches (what the first
  epoch of a linear probe costs on this path);
* ``precompute``: ``precompute_features`` in memory (the backbone once, ``verify=8``), and with a
  directory, writing the file and reusing it;
* ``epoch on precomputed``: a head epoch over ``ds.batches(64, shuffle=True)``, and over a
  ``DataLoader(ds, 64, shuffle=True)`` (per-item indexing and the default collate);
* ``floor``: a head epoch over features already in one tensor, ``index_select`` per batch.

Usage: ``.venv/bin/python scripts/measure_precompute.py [--rounds 15]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
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


def measure(cases: list[tuple[str, Callable[[], Any]]], rounds: int) -> list[tuple[str, float, float, float]]:
    """Median, interquartile range and minimum of each case, timed in interleaved rounds.

    One call of every case per round, the cases in turn, so that a change of the machine's load
    (other processes on a shared machine) reaches every case alike instead of one block of them.
    """
    times: list[list[float]] = [[] for _ in cases]
    for _, fn in cases:  # warm up
        fn()
    for _ in range(rounds):
        for k, (_, fn) in enumerate(cases):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    out = []
    for (name, _), ts in zip(cases, times, strict=True):
        q = statistics.quantiles(ts, n=4)
        out.append((name, statistics.median(ts), q[2] - q[0], min(ts)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed calls of each case")
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

    def forward_only() -> None:
        with torch.no_grad():
            for i in range(0, len(x), BATCH):
                bb(x[i : i + BATCH])

    def first_epoch() -> None:
        head_epoch(head, opt, precompute_features(bb, data, batch_size=BATCH).batches(BATCH, shuffle=True))

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
    cases = [
        ("no_grad epoch (careful loop)", no_grad_epoch),
        ("backbone forward only (no_grad, in order)", forward_only),
        ("first epoch: precompute + epoch on batches()", first_epoch),
        ("precompute_features, memory", lambda: precompute_features(bb, data, batch_size=BATCH)),
        (
            "precompute_features, memory, verify=0",
            lambda: precompute_features(bb, data, batch_size=BATCH, verify=0),
        ),
        (
            "precompute_features, new file",
            lambda: precompute_features(bb, data, batch_size=BATCH, directory=directory, salt=str(next(counter))),
        ),
        (
            "precompute_features, file reused",
            lambda: precompute_features(bb, data, batch_size=BATCH, directory=directory),
        ),
        (
            "epoch on ds.batches(64, shuffle=True)",
            lambda: head_epoch(head, opt, ds.batches(BATCH, shuffle=True)),
        ),
        (
            "epoch on DataLoader(ds, 64, shuffle=True)",
            lambda: head_epoch(head, opt, DataLoader(ds, BATCH, shuffle=True)),
        ),
        ("floor (tensor, index_select per batch)", floor_epoch),
    ]
    try:
        rows = measure(cases, args.rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    no_grad, floor, no_min, floor_min = rows[0][1], rows[-1][1], rows[0][3], rows[-1][3]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, {BATCHES} batches of {BATCH}, 6 x Linear({WIDTH}) + GELU"
    )
    print("ratios of medians (and of minima, the least disturbed runs on a shared machine)")
    print(f"{'what':45s} {'median ms':>10s} {'IQR ms':>8s} {'min ms':>8s} {'/ no_grad':>10s} {'/ floor':>8s}")
    for name, median, iqr, least in rows:
        ratios = f"{median / no_grad:5.2f} ({least / no_min:4.2f}) {median / floor:5.2f} ({least / floor_min:4.2f})"
        print(f"{name:45s} {median * 1e3:10.2f} {iqr * 1e3:8.2f} {least * 1e3:8.2f}  {ratios}")


if __name__ == "__main__":
    main()
