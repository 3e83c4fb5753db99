"""Measure the feature cache against the careful no_grad loop and the floor (issue 13, section 1).

The issue's MLP case: a frozen 6 x (Linear(512, 512) + GELU) backbone, 40 batches of 64,
a linear head trained with SGD, one thread. Per epoch, interleaved in one process:

* ``no_grad``: the backbone under ``torch.no_grad()`` on every batch (the careful loop);
* ``first``: a fresh ``cache_features`` wrapper's first epoch (every row a miss);
* ``cached``: the second epoch of that cache (every row a hit), ``cached_3rd`` the third
  (the same batches again: served by the whole-batch shortcut);
* ``floor``: features computed once, looked up by batch index with ``index_select``;
* ``cached_shuffled`` / ``floor_shuffled``: the same with the rows reshuffled into new
  batches every epoch (a ``DataLoader(shuffle=True)``: every row hits, no batch repeats);
* ``floor+hash``: the shuffled floor plus one xxh3 pass over each batch's input, the least
  that any content key costs.

Each repeat starts a fresh cache (``first``), so ``cached`` is always a second epoch.

Prints the medians (and the spread), the ratios cached/floor and first/no_grad, and a
breakdown of one hit batch. Times are the process's CPU time (``time.process_time``) by
default: on a shared machine, wall time also counts the time other processes hold the
cores (``--clock wall`` for wall time). Run:
``.venv/bin/python scripts/measure_cache.py [--repeats 15] [--clock cpu|wall] [--no-xxhash]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from torchfreeze.speed import FeatureCache, cache_features
from torchfreeze.speed.keys import HAVE_XXHASH, batch_key, fast_signature, row_keys_fast

DIM, LAYERS, BATCH, BATCHES, CLASSES = 512, 6, 64, 40, 10


def backbone() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(DIM, DIM), nn.GELU()]
    return nn.Sequential(*layers).requires_grad_(False).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-xxhash", action="store_true", help="as without the xxhash package (SHA-256 rows)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ns = parser.parse_args()
    clock = time.process_time if ns.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    if ns.no_xxhash:
        from torchfreeze.speed import _hashing as keys

        keys._xxhash = None
    torch.manual_seed(0)
    data = torch.randn(BATCH * BATCHES, DIM)
    labels = torch.randint(0, CLASSES, (BATCH * BATCHES,))
    batches = [torch.arange(i * BATCH, (i + 1) * BATCH) for i in range(BATCHES)]
    xs = [data[idx] for idx in batches]
    ys = [labels[idx] for idx in batches]
    bb = backbone()
    with torch.no_grad():
        feats = bb(data)
    head = nn.Linear(DIM, CLASSES)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step(f: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(head(f), y).backward()
        opt.step()

    def epoch_no_grad() -> None:
        for x, y in zip(xs, ys):
            with torch.no_grad():
                f = bb(x)
            step(f, y)

    def epoch_floor() -> None:
        for idx, y in zip(batches, ys):
            step(feats.index_select(0, idx), y)

    state: dict[str, nn.Module] = {}

    def epoch_first() -> None:
        cached = state["cache"] = cache_features(bb)
        for x, y in zip(xs, ys):
            step(cached(x), y)

    def epoch_cached() -> None:
        cached = state["cache"]
        for x, y in zip(xs, ys):
            step(cached(x), y)

    shuffled: dict[str, list[Tensor]] = {}

    def reshuffle() -> None:  # not timed: the data loader's work in both variants
        order = torch.randperm(BATCH * BATCHES)
        shuffled["idx"] = [order[i : i + BATCH] for i in range(0, BATCH * BATCHES, BATCH)]
        shuffled["x"] = [data[i] for i in shuffled["idx"]]
        shuffled["y"] = [labels[i] for i in shuffled["idx"]]

    def epoch_cached_shuffled() -> None:
        cached = state["cache"]
        for x, y in zip(shuffled["x"], shuffled["y"]):
            step(cached(x), y)

    def epoch_floor_shuffled() -> None:
        for idx, y in zip(shuffled["idx"], shuffled["y"]):
            step(feats.index_select(0, idx), y)

    def epoch_floor_hash() -> None:  # the floor plus one pass over each batch's input bytes (what keying costs)
        for x, idx, y in zip(shuffled["x"], shuffled["idx"], shuffled["y"]):
            batch_key([x], salt=b"floor")
            step(feats.index_select(0, idx), y)

    runs: dict[str, Callable[[], None]] = {
        "no_grad": epoch_no_grad,
        "first": epoch_first,
        "cached": epoch_cached,
        "cached_3rd": epoch_cached,
        "floor": epoch_floor,
        "cached_shuffled": epoch_cached_shuffled,
        "floor_shuffled": epoch_floor_shuffled,
        "floor+hash": epoch_floor_hash,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    reshuffle()
    for fn in runs.values():  # warm up
        fn()
    for _ in range(ns.repeats):
        reshuffle()
        for name, fn in runs.items():  # interleaved; "cached" follows its "first"
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"torch {torch.__version__}, 1 thread, xxhash {'no' if ns.no_xxhash or not HAVE_XXHASH else 'yes'}, "
        f"{ns.clock} time, {ns.repeats} repeats"
    )
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        print(f"  {k:15s} median {med[k]:7.2f} ms/epoch  (IQR {q[0]:.2f}-{q[2]:.2f}, min {min(v):.2f})")
    print(f"cached/floor   = {med['cached'] / med['floor']:.2f}  (goal <= 1.3; 2nd epoch, the same batches)")
    print(f"3rd epoch      = {med['cached_3rd'] / med['floor']:.2f}  (goal <= 1.3; the same batches a third time)")
    shuffled_ratio = med["cached_shuffled"] / med["floor_shuffled"]
    print(f"shuffled       = {shuffled_ratio:.2f}  (goal <= 1.3; rows reshuffled into new batches)")
    print(f"floor+hash     = {med['floor+hash'] / med['floor_shuffled']:.2f}  (reading every input once)")
    print(f"first/no_grad  = {med['first'] / med['no_grad']:.3f}  (goal <= 1.05)")

    # where a hit batch's time goes (microseconds per batch)
    cached = state["cache"]
    x, idx = xs[0], batches[0]
    layout_salt = b"m"

    def per_call(fn: Callable[[], object], n: int = 2000) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = clock()
            for _ in range(n):
                fn()
            best = min(best, (clock() - t0) / n * 1e6)
        return best

    def forget_then_call() -> object:  # as if the batch were new: its rows hit, the whole-batch shortcut does not
        assert isinstance(cached, FeatureCache)
        for layout in cached._store.rows.layouts.values():
            layout.batches.clear()
        return cached(x)

    parts = {
        "whole hit call": lambda: cached(x),
        "hit call, new batch": forget_then_call,
        "floor index_select": lambda: feats.index_select(0, idx),
        "module check": lambda: cached._check_module(),  # type: ignore[operator]
        "input signature": lambda: fast_signature((x,), {}),
        "row keys (64 rows)": lambda: row_keys_fast([x], BATCH, salt=layout_salt),
        "batch key": lambda: batch_key([x], salt=layout_salt),
        "head step": lambda: step(feats[:BATCH], ys[0]),
    }
    print("per hit batch (best of 5, microseconds):")
    for name, fn in parts.items():
        print(f"  {name:22s} {per_call(fn, 300 if name == 'head step' else 2000):8.1f}")


if __name__ == "__main__":
    main()
