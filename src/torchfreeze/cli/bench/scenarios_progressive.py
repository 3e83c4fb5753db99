"""Scenario 6 of ``torchfreeze bench``: progressive freezing with prefix caching, end to end.

MiniLM fine-tuned on the demo's text task (``make_task("minilm", model)``, the settings of
``MODELS["minilm"]``: epochs, batch size, learning rates), four ways, same initial weights, same
seed and batch order: full fine-tuning, plain static freezing (the lower half of the layer groups
frozen), gradual unfreezing (:class:`torchfreeze.GradualUnfreezing`) and progressive freezing
(``ProgressiveFreezing`` with ``cache_frozen_prefix``). Each run is timed end to end, epoch by
epoch (training only: the held-out evaluation after each epoch is timed apart), and repeated
``progressive_repeats`` times with the order rotated; every figure is a Measurement over those
runs (median, IQR, min-max). Goal (issue 13): progressive >= 3x faster than full fine-tuning,
final held-out accuracy within 1 point.

The variants are data (:data:`VARIANTS`): the lead tunes the progressive schedule there.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import torchfreeze as tf
from torchfreeze.cli.bench.timing import Figure, figure, from_samples, paired_ratio
from torchfreeze.cli.bench.workload import Sizes, TinyEncoder
from torchfreeze.cli.demo_tasks import MODELS, TOPICS, Task, accuracy, make_task
from torchfreeze.compose import Composite

__all__ = ["ProgressiveVariant", "VARIANTS", "Setup", "build_setup", "scenario_progressive"]


@dataclass(frozen=True)
class ProgressiveVariant:
    """One way of fine-tuning in scenario 6.

    ``static_frozen``: leading layer groups frozen for the whole run. ``gradual``: a
    :class:`~torchfreeze.GradualUnfreezing` schedule (the run starts with only the last group
    trainable). ``progressive``: a ``ProgressiveFreezing`` schedule ``{epochs done: leading groups
    frozen}`` (a negative count counts from the end: ``-1`` = all but the head), with
    ``cache_frozen_prefix`` when ``prefix_cache``.
    """

    name: str
    description: str
    static_frozen: int = 0
    gradual: Literal["one_group_per_epoch", "one_group_per_step"] | None = None
    progressive: dict[int, int] = field(default_factory=dict)
    prefix_cache: bool = False


#: The four variants of scenario 6 (tune the progressive schedule here).
VARIANTS: tuple[ProgressiveVariant, ...] = (
    ProgressiveVariant("full", "full fine-tuning"),
    ProgressiveVariant("static", "lower half of the layer groups frozen throughout", static_frozen=4),
    ProgressiveVariant("gradual", "GradualUnfreezing, one group per epoch", gradual="one_group_per_epoch"),
    ProgressiveVariant(
        "progressive",
        "ProgressiveFreezing: 4 leading groups frozen after epoch 1, all but the head after epoch 2; prefix cache",
        progressive={1: 4, 2: -1},
        prefix_cache=True,
    ),
)


@dataclass
class Setup:
    """What scenario 6 trains: the model, the task, and the training settings."""

    model: nn.Module
    task: Task
    epochs: int
    batch_size: int
    head_lr: float
    backbone_lr: float
    source: str


def build_setup(quick: bool) -> Setup:
    """MiniLM (4 topics) on the demo's text task, or a tiny stand-in model and token task (quick)."""
    setup = MODELS["minilm"]
    torch.manual_seed(0)
    if quick:
        tiny = TinyEncoder()
        model: nn.Module = Composite(tiny, nn.Sequential(nn.Dropout(0.0), nn.Linear(tiny.feature_dim, len(TOPICS))))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, 500, (40, 12), generator=g)
        labels = ids[:, 0] % len(TOPICS)  # learnable from the first token
        perm = torch.randperm(40, generator=g)
        task = Task(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            labels,
            perm[:24],
            perm[24:],
            TOPICS,
            "random tokens (quick)",
        )
        return Setup(model, task, 3, 8, setup.head_lr, 1e-3, "tiny stand-in encoder, random token task (quick)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = tf.get_model(setup.registry, freeze=False, num_classes=len(TOPICS))
    task = make_task("minilm", model)
    return Setup(
        model,
        task,
        setup.epochs,
        setup.batch_size,
        setup.head_lr,
        setup.backbone_lr,
        f"{setup.registry} on the demo's text task ({setup.description})",
    )


def _optimizer(model: nn.Module, s: Setup) -> torch.optim.Optimizer:
    head = [p for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    groups = [{"params": body, "lr": s.backbone_lr}] if body else []
    return torch.optim.AdamW([*groups, {"params": head, "lr": s.head_lr}], weight_decay=0.01)


def _freeze_leading(model: nn.Module, groups: list[Any], n: int) -> None:
    n = n if n >= 0 else len(groups) + n
    tf.freeze(model, *itertools.chain.from_iterable(groups[:n]), mode="eval")


class _Run:
    """One variant's model, optimizer and scheduler; ``epoch_done()`` after each epoch."""

    def __init__(self, v: ProgressiveVariant, s: Setup) -> None:
        self.model = copy.deepcopy(s.model)
        self.groups = [list(g) for g in tf.layer_groups(self.model)]
        self.sched: tf.GradualUnfreezing | tf.ProgressiveFreezing | None = None
        self.prefix: Any = None
        used = ["AdamW (backbone lr, head lr)"]
        if v.static_frozen:
            _freeze_leading(self.model, self.groups, v.static_frozen)
            used.append(f"freeze(mode='eval') of the first {v.static_frozen} groups")
        if v.gradual is not None:
            tf.freeze_to(self.model, -1)
        self.opt = _optimizer(self.model, s)
        if v.gradual is not None:
            self.sched = tf.GradualUnfreezing(self.model, self.opt, v.gradual, lr=s.backbone_lr)
            used.append("GradualUnfreezing")
        if v.progressive:
            schedule = {k: (n if n >= 0 else len(self.groups) + n) for k, n in v.progressive.items()}
            self.sched = tf.ProgressiveFreezing(self.model, self.opt, schedule)
            used.append("ProgressiveFreezing")
        if v.prefix_cache:
            self.prefix = tf.cache_frozen_prefix(self.model)
            used.append("cache_frozen_prefix")
        self.implementation = " + ".join(used)

    def epoch_done(self) -> None:
        if self.sched is not None:
            self.sched.step()

    def frozen_groups(self) -> int:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        count = 0
        for g in self.groups:
            names = [n for sel in g for n, _ in self.model.get_submodule(str(sel)).named_parameters(prefix=str(sel))]
            if names and not set(names) & trainable:
                count += 1
            else:
                break
        return count


def _train(v: ProgressiveVariant, s: Setup) -> dict[str, Any]:
    """One run of one variant: training seconds, evaluation seconds and held-out accuracy per epoch."""
    torch.manual_seed(1)
    run = _Run(v, s)
    gen = torch.Generator().manual_seed(0)  # the same batch order for every variant
    task, model, bs = s.task, run.model, s.batch_size
    train_s: list[float] = []
    eval_s: list[float] = []
    acc: list[float] = []
    frozen: list[int] = []
    for _ in range(s.epochs):
        order = task.train[torch.randperm(len(task.train), generator=gen)]
        t0 = time.perf_counter()
        model.train()
        for start in range(0, len(order), bs):
            part = order[start : start + bs]
            loss = F.cross_entropy(model(task.batch(part)), task.labels[part])
            run.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            run.opt.step()
        frozen.append(run.frozen_groups())
        run.epoch_done()
        train_s.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        acc.append(accuracy(model, task, task.test))
        eval_s.append(time.perf_counter() - t1)
    stats = run.prefix.stats() if run.prefix is not None else None
    return {
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "accuracy": acc,
        "frozen_groups": frozen,
        "implementation": run.implementation,
        "prefix_cache_stats": None if stats is None else stats.to_dict(),
    }


def scenario_progressive(s: Setup, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """6. Progressive freezing with prefix caching against full, static and gradual, end to end."""
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in VARIANTS}
    for r in range(sizes.progressive_repeats):
        k = r % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            runs[v.name].append(_train(v, s))
    label = "6. progressive freezing"
    variants: dict[str, Any] = {}
    for v in VARIANTS:
        rs = runs[v.name]
        total = figure(from_samples(v.name, [sum(x["train_seconds"]) for x in rs], label=label), what="runs")
        per_epoch = [
            figure(from_samples(v.name, [x["train_seconds"][e] for x in rs], label=label), what="runs")
            for e in range(s.epochs)
        ]
        evals = figure(from_samples(v.name, [sum(x["eval_seconds"]) for x in rs], label=label), what="runs")
        first = rs[0]
        cumulative = list(itertools.accumulate(first["train_seconds"]))
        variants[v.name] = {
            "description": v.description,
            "config": {
                "static_frozen": v.static_frozen,
                "gradual": v.gradual,
                "progressive": {str(k): n for k, n in v.progressive.items()},
                "prefix_cache": v.prefix_cache,
            },
            "implementation": first["implementation"],
            "total_train_seconds": total,
            "train_seconds_per_epoch": per_epoch,
            "eval_seconds_total": evals,
            "accuracy_per_epoch": first["accuracy"],  # identical across repetitions (same seed, same order)
            "accuracy_per_epoch_all_runs": [x["accuracy"] for x in rs],
            "final_accuracy": first["accuracy"][-1],
            "cumulative_train_seconds": cumulative,
            "frozen_groups_per_epoch": first["frozen_groups"],
            "prefix_cache_stats": first["prefix_cache_stats"],
        }
    full, prog = variants["full"], variants["progressive"]
    totals = {name: [sum(x["train_seconds"]) for x in rs] for name, rs in runs.items()}  # paired by round
    speedup: Figure = paired_ratio(totals["full"], totals["progressive"])
    diff = (prog["final_accuracy"] - full["final_accuracy"]) * 100
    ratios = {
        "progressive_speedup_vs_full": speedup,
        "static_speedup_vs_full": paired_ratio(totals["full"], totals["static"]),
        "gradual_speedup_vs_full": paired_ratio(totals["full"], totals["gradual"]),
    }
    goals = [
        {
            "what": "progressive speed-up vs full fine-tuning (end to end)",
            "ratio": "progressive_speedup_vs_full",
            "goal": ">= 3",
            "met": bool(speedup["median"] >= 3.0),
        },
        {
            "what": "final held-out accuracy, progressive - full (points)",
            "value": diff,
            "goal": "within 1 point",
            "met": bool(abs(diff) <= 1.0),
        },
    ]
    log(
        f"  [6 encoder] progressive {speedup['median']:.2f}x faster than full fine-tuning (goal >= 3); accuracy "
        + ", ".join(f"{n} {x['final_accuracy']:.3f}" for n, x in variants.items())
        + f"; progressive: {prog['implementation']}"
    )
    return {
        "scenario": 6,
        "title": "progressive freezing with prefix caching, end to end",
        "model": "encoder",
        "source": s.source,
        "epochs": s.epochs,
        "batch": s.batch_size,
        "train_samples": len(s.task.train),
        "test_samples": len(s.task.test),
        "repeats": sizes.progressive_repeats,
        "variants": variants,
        "ratios": ratios,
        "accuracy_difference_points": diff,
        "goals": goals,
    }
