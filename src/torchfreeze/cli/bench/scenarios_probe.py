"""Scenario 1 of ``torchfreeze bench``: feature caching against the floor, on three backbones.

A frozen backbone and a linear head trained with SGD over a fixed in-memory data set (shuffled
batches, the same for every variant). Backbones: the 6-layer MLP of issue 13 (``Linear(512,
512)`` + GELU, batches of 64, 40 batches), the bench CNN and MiniLM. Variants:

- ``plain``: ``requires_grad=False`` on the backbone, the model left in train mode;
- ``no_grad``: the careful loop, backbone in eval and its forward under ``torch.no_grad``;
- ``cache_epochs``: ``cache_features`` after its first (filling) epoch: every batch a hit;
- ``cache_first_epoch``: freezing, wrapping and the filling epoch, one shot on a fresh model;
- ``precompute_epochs`` / ``precompute_end_to_end``: ``precompute_features`` (the data set
  level path): one epoch over its features, and precomputing plus ``epochs`` epochs, one shot;
- ``floor``: features computed once up front, looked up by batch index, the inputs never read
  (what no cache can beat: shuffled indices, one ``index_select`` of features and labels, the head step);
- ``floor_read``: the floor plus what any content-keyed cache must do at least: read each batch's
  inputs (the same ``index_select`` as the other variants) and hash them once
  (:func:`torchfreeze.speed.keys.row_keys_fast`); what lies between it and ``cache_epochs`` is
  the cache's own work (module check, lookups, the ``Composite`` forward around the cached backbone).

Per-epoch figures: ``blocked_autorange``; one-shot figures: ``Timer.timeit(1)`` on a fresh model.
Goals (issue 13): cached epochs within 1.3x the floor, cached first epoch within 1.05x the
``no_grad`` epoch. Correctness: the heads trained ``identity_epochs`` epochs by ``no_grad``, the
cache, ``precompute_features`` and the floor, from the same initial head in the same batch
order, compared (max abs difference of the final head weights).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

import torchfreeze as tf
from torchfreeze._core import tree
from torchfreeze.cli.bench.timing import Figure, compare_text, figure, merged, one_shot, paired_ratio, per_call
from torchfreeze.cli.bench.workload import Sizes, make_data, shuffled_batches, take
from torchfreeze.compose import Composite, ModuleBackbone
from torchfreeze.speed.keys import row_keys_fast

__all__ = ["Backbone", "build_mlp", "scenario_probe", "ProbeData"]

#: The backbones of scenario 1.
Backbone = Literal["mlp", "cnn", "encoder"]

ProbeData = tuple[Any, torch.Tensor]

_LR = 0.05


def build_mlp(sizes: Sizes) -> Composite:
    """The backbone of issue 13: 6 x (``Linear(d, d)`` + GELU), with a linear head (10 classes)."""
    torch.manual_seed(0)
    d = sizes.mlp_dim
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(d, d), nn.GELU()]
    return Composite(ModuleBackbone(nn.Sequential(*layers), feature_dim=d), nn.Linear(d, 10))


def _data(kind: Backbone, sizes: Sizes) -> tuple[ProbeData, int]:
    if kind == "mlp":
        g = torch.Generator().manual_seed(0)
        n = sizes.mlp_batch * sizes.mlp_batches
        return (torch.randn(n, sizes.mlp_dim, generator=g), torch.randint(0, 10, (n,), generator=g)), sizes.mlp_batch
    n = sizes.enc_samples if kind == "encoder" else sizes.cnn_samples
    bs = sizes.enc_batch if kind == "encoder" else sizes.cnn_batch
    x, y = default_collate(make_data(kind, sizes, n))
    return (x, y), bs


class _Rows(Dataset[tuple[Any, torch.Tensor]]):
    """The in-memory data set as a map-style Dataset of ``(input, label)`` items."""

    def __init__(self, data: ProbeData) -> None:
        self.x, self.y = data

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        idx = torch.tensor([i])
        x = take(self.x, idx)
        return (({k: v[0] for k, v in x.items()} if isinstance(x, dict) else x[0]), self.y[i])


def _sgd(model: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.head.parameters(), lr=_LR)


def _head_step(model: Any, opt: torch.optim.Optimizer, feats: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model.head(feats), y)
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    opt.step()
    opt.zero_grad(set_to_none=True)


class _Probe:
    """One variant's model and optimizer, and one epoch of its loop (``epoch()``)."""

    def __init__(self, variant: str, base: nn.Module, data: ProbeData, bs: int, *, own: bool = False) -> None:
        self.variant, self.data, self.bs = variant, data, bs
        # a Composite, reached by attribute; a copy of ``base`` unless ``own`` (then set up in place)
        self.model: Any = base if own else copy.deepcopy(base)
        self.seed = 0
        self.feats: torch.Tensor | None = None
        self.features: Any = None
        m: Any = self.model
        if variant in ("cache", "cache_first"):
            tf.freeze(m, "backbone", mode="eval")
            m.backbone = tf.cache_features(m.backbone)
        elif variant == "precompute":
            tf.freeze(m, "backbone", mode="eval")
            self.features = tf.precompute_features(m.backbone, _Rows(data), batch_size=bs)
        else:
            m.backbone.requires_grad_(False)
        if variant in ("floor", "floor_read"):
            m.backbone.eval()
            n = len(data[1])
            with torch.no_grad():
                chunks = [take(data[0], torch.arange(i, min(i + bs, n))) for i in range(0, n, bs)]
                self.feats = torch.cat([m.backbone.forward_features(c) for c in chunks])
        self.opt = _sgd(m)

    def batches(self) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
        self.seed += 1
        return shuffled_batches(self.data, self.bs, seed=self.seed)

    def epoch(self) -> None:
        m, opt = self.model, self.opt
        m.train()
        if self.variant == "floor" and self.feats is not None:  # indices only: the inputs are never read
            self.seed += 1
            labels = self.data[1]
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            for start in range(0, len(labels), self.bs):
                idx = perm[start : start + self.bs]
                _head_step(m, opt, self.feats.index_select(0, idx), labels.index_select(0, idx))
        elif self.variant == "floor_read" and self.feats is not None:  # the floor, reading and keying inputs
            for x, y, idx in self.batches():
                leaves = tree.tensor_leaves(x)
                row_keys_fast(leaves, len(y), salt=b"floor")
                _head_step(m, opt, self.feats.index_select(0, idx), y)
        elif self.variant == "precompute":  # its own batches: one index_select per column, the same order
            self.seed += 1
            order = torch.Generator().manual_seed(self.seed)
            for feats, y in self.features.batches(self.bs, shuffle=True, generator=order):
                _head_step(m, opt, feats, y)
        elif self.variant == "no_grad":
            m.backbone.eval()
            for x, y, _ in self.batches():
                with torch.no_grad():
                    feats = m.backbone.forward_features(x)
                _head_step(m, opt, feats, y)
        else:  # plain, cache: the model's own forward
            for x, y, _ in self.batches():
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                opt.step()
                opt.zero_grad(set_to_none=True)

    def head(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.head.parameters()]


def _identity(base: nn.Module, data: ProbeData, bs: int, epochs: int) -> dict[str, float]:
    """Max abs difference of the final head weights of each cached variant against ``no_grad``."""
    heads: dict[str, list[torch.Tensor]] = {}
    for v in ("no_grad", "cache", "floor", "precompute"):
        torch.manual_seed(1)
        p = _Probe(v, base, data, bs)
        for _ in range(epochs):
            p.epoch()
        heads[v] = p.head()
    ref = heads.pop("no_grad")
    return {v: max(float((a - b).abs().max()) for a, b in zip(h, ref)) for v, h in heads.items()}


def scenario_probe(
    kind: Backbone, base: nn.Module, sizes: Sizes, log: Callable[[str], None], *, repeats: int
) -> dict[str, Any]:
    """1. Feature caching on one backbone: per-epoch and one-shot figures, ratios to the goals, identity."""
    data, bs = _data(kind, sizes)
    label = f"1. feature caching ({kind})"
    variants = ("plain", "no_grad", "cache", "floor", "floor_read", "precompute")
    probes = {v: _Probe(v, base, data, bs) for v in variants}
    probes["cache"].epoch()  # the filling epoch: later epochs are all hits
    epochs = sizes.epochs

    def e2e(p: _Probe) -> None:
        for _ in range(epochs):
            p.epoch()

    def cache_first_fresh() -> _Probe:  # the deep copy is untimed; wrapping and filling are timed
        return _Probe("no_grad", base, data, bs)

    def cache_first(p: _Probe) -> None:
        tf.freeze(p.model, "backbone", mode="eval")
        p.model.backbone = tf.cache_features(p.model.backbone)
        p.variant = "cache"
        p.epoch()

    def precompute_fresh() -> Any:
        return copy.deepcopy(base)

    def precompute_e2e(model: Any) -> None:
        e2e(_Probe("precompute", model, data, bs, own=True))  # freezing + precomputing timed too

    names = {
        "plain": "plain",
        "no_grad": "no_grad",
        "cache": "cache_epochs",
        "floor": "floor",
        "floor_read": "floor_read",
    }
    names["precompute"] = "precompute_epochs"

    def steady(p: _Probe) -> Callable[[], Any]:
        return lambda: per_call(
            p.epoch, label=label, sub_label=names[p.variant], description=kind, min_run_time=sizes.min_run_time
        )

    def shot(run: Callable[[Any], None], fresh: Callable[[], Any], name: str) -> Callable[[], Any]:
        return lambda: one_shot(run, fresh, label=label, sub_label=name, description=kind)

    rounds: list[tuple[str, Callable[[], Any]]] = [(names[v], steady(p)) for v, p in probes.items()]
    rounds.append(("cache_first_epoch", shot(cache_first, cache_first_fresh, "cache_first_epoch")))
    rounds.append(("precompute_end_to_end", shot(precompute_e2e, precompute_fresh, "precompute_end_to_end")))
    parts: dict[str, list[Any]] = {name: [] for name, _ in rounds}
    for r in range(repeats):  # side by side: every variant once per round, the order rotated
        k = r % len(rounds)
        for name, fn in rounds[k:] + rounds[:k]:
            parts[name].append(fn())
    figs: dict[str, Figure] = {}
    measurements = {name: merged(ms) for name, ms in parts.items()}
    for name, m in measurements.items():
        one = name in ("cache_first_epoch", "precompute_end_to_end")
        what = "one-shot runs (Timer.timeit(1))" if one else "timed blocks (blocked_autorange)"
        figs[name] = figure(m, what=what)
    log(compare_text(list(measurements.values())))  # torch.utils.benchmark.Compare: the raw view
    identity = _identity(base, data, bs, sizes.identity_epochs)
    # ratios round by round: the two variants of a pair ran side by side in the same round
    per_round = {name: [statistics.median(m.times) for m in ms] for name, ms in parts.items()}

    def pr(x: str, y: str, scale: float = 1.0) -> Figure:
        return paired_ratio(per_round[x], [t * scale for t in per_round[y]])

    ratios: dict[str, Figure] = {
        "cache_epochs_vs_floor": pr("cache_epochs", "floor"),
        "floor_read_vs_floor": pr("floor_read", "floor"),
        "cache_epochs_vs_floor_read": pr("cache_epochs", "floor_read"),
        "cache_first_epoch_vs_no_grad": pr("cache_first_epoch", "no_grad"),
        "plain_vs_cache_epochs": pr("plain", "cache_epochs"),
        "plain_vs_floor": pr("plain", "floor"),
        "precompute_epochs_vs_floor": pr("precompute_epochs", "floor"),
        "precompute_end_to_end_vs_no_grad_epochs": pr("precompute_end_to_end", "no_grad", epochs),
    }
    goals: list[dict[str, Any]] = [
        {"what": "cached epochs / floor", "ratio": "cache_epochs_vs_floor", "goal": "<= 1.3", "limit": 1.3},
        {
            "what": "cached first epoch / no_grad epoch",
            "ratio": "cache_first_epoch_vs_no_grad",
            "goal": "<= 1.05",
            "limit": 1.05,
        },
    ]
    for g in goals:
        g["met"] = bool(ratios[str(g["ratio"])]["median"] <= float(g["limit"]))
    cache_stats = probes["cache"].model.backbone.stats().to_dict()
    out: dict[str, Any] = {
        "scenario": 1,
        "title": "feature caching against the floor",
        "model": kind,
        "samples": len(data[1]),
        "batch": bs,
        "epochs_end_to_end": epochs,
        "identity_epochs": sizes.identity_epochs,
        "optimizer": f"SGD lr {_LR} on the head",
        "seconds_per_epoch": figs,
        "ratios": ratios,
        "goals": goals,
        "head_max_abs_difference_vs_no_grad": identity,
        "cache_stats": cache_stats,
    }
    log(
        f"  [1 {kind}] cached epochs {ratios['cache_epochs_vs_floor']['median']:.2f}x the floor (goal <= 1.3; "
        f"reading and keying the inputs alone: {ratios['floor_read_vs_floor']['median']:.2f}x), "
        f"first epoch {ratios['cache_first_epoch_vs_no_grad']['median']:.3f}x no_grad (goal <= 1.05); "
        f"plain/cached {ratios['plain_vs_cache_epochs']['median']:.0f}x; head max |diff| vs no_grad "
        + ", ".join(f"{v} {d:.1e}" for v, d in identity.items())
    )
    return out
