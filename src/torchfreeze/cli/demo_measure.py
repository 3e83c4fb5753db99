"""Phase 4 of the demo: what freezing saved, measured in fresh processes.

A few training steps of three configurations run each in its own child process:
torchfreeze (backbone frozen and pinned eval, optimizer over the trainable part),
plain freezing (``requires_grad=False`` on the backbone, ``model.train()``, AdamW
over all parameters) and full fine-tuning (:func:`torchfreeze.cli.memory.run_child` calls
:func:`measure` there), so that the peak memory of one cannot hide in the
other; the parent prints the comparison table and the savings.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import torchfreeze as tf
from torchfreeze._core.render import Table
from torchfreeze.cli.console import Output
from torchfreeze.cli.demo_tasks import MODELS, classes, make_task
from torchfreeze.cli.memory import peak_window, run_child

__all__ = ["measure", "compare", "comparison_table"]

_MIB = 2**10  # KiB per MiB


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Time ``steps`` training steps of one configuration (run in a fresh process).

    ``spec``: ``model`` (a demo model key), ``variant`` (``"torchfreeze"``,
    ``"plain"`` or ``"full"``; or the older ``freeze`` bool), ``batch_size``,
    ``steps``, optional ``seed`` and ``threads`` (default 1).
    """
    variant = str(spec.get("variant", "torchfreeze" if spec.get("freeze") else "full"))
    setup = MODELS[spec["model"]]
    # One thread for both configurations: with several, other load on the machine stalls the
    # threads' barriers and the timings scatter by 5-10x; with one they are stable.
    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(int(spec.get("seed", 0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.get_model(setup.registry, freeze=variant == "torchfreeze", num_classes=len(classes(spec["model"])))
    task = make_task(spec["model"], model)
    batch = int(spec["batch_size"])
    if variant == "plain":  # the usual script: requires_grad=False, and an optimizer over everything
        for p in model.get_submodule("backbone").parameters():
            p.requires_grad = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=setup.head_lr, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(tf.param_groups(model, setup.head_lr, weight_decay=0.01))
    gen = torch.Generator().manual_seed(0)
    idx = task.train[torch.randperm(len(task.train), generator=gen)]
    batches = [idx[(i * batch) % len(idx) :][:batch] for i in range(int(spec["steps"]) + 2)]
    batches = [b if len(b) else idx[:batch] for b in batches]
    model.train()

    def step(part: torch.Tensor) -> None:
        loss = F.cross_entropy(model(task.batch(part)), task.labels[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        optimizer.step()

    # Loading weights has a transient peak (file bytes + parsed tensors); measure training only.
    times: list[float] = []
    with peak_window() as window:
        for part in batches[:2]:  # warm-up: allocator, optimizer state, lazy kernels
            step(part)
        for part in batches[2:]:
            t0 = time.perf_counter()
            step(part)
            times.append(time.perf_counter() - t0)
        times.sort()
    return {
        "variant": variant,
        "freeze": variant != "full",
        "steps": len(times),
        "step_ms_median": 1000 * times[len(times) // 2],
        "step_ms_mean": 1000 * sum(times) / len(times),
        "step_ms_best": 1000 * times[0],
        "threads": torch.get_num_threads(),
        "rss_after_build_mb": window.rss_before_kib / _MIB,
        "peak_rss_mb": window.peak_kib / _MIB,
        "peak_is_training_only": window.reset,
        "trainable_parameters": sum(p.numel() for _, p in tf.trainable_parameters(model)),
    }


def comparison_table(fz: Mapping[str, Any], full: Mapping[str, Any], plain: Mapping[str, Any] | None = None) -> Table:
    """The comparison table of :func:`measure` results (torchfreeze, plain freezing if given, full)."""
    runs = [fz] + ([plain] if plain is not None else []) + [full]
    names = ["torchfreeze"] + (["plain freezing"] if plain is not None else []) + ["full fine-tuning"]
    rows = [
        ("trainable parameters", *(f"{r['trainable_parameters']:,}" for r in runs)),
        ("time per step, best", *(f"{r['step_ms_best']:.1f} ms" for r in runs)),
        ("time per step, median", *(f"{r['step_ms_median']:.1f} ms" for r in runs)),
        ("peak RSS while training", *(f"{r['peak_rss_mb']:.0f} MiB" for r in runs)),
        ("RSS after building the model", *(f"{r['rss_after_build_mb']:.0f} MiB" for r in runs)),
        ("training overhead (peak - built)", *(f"{r['peak_rss_mb'] - r['rss_after_build_mb']:.0f} MiB" for r in runs)),
    ]
    return Table(("", *names), list(rows))


def compare(
    out: Output, *, model: str, batch: int, steps: int, seed: int, head_steps: int, full_bytes: int
) -> dict[str, Any]:
    """Measure ``steps`` training steps frozen and fully fine-tuned; print and return the comparison."""
    out.heading(f"5. what freezing saved: {steps} training steps each, fresh processes, 1 thread")
    runs: dict[str, dict[str, Any]] = {}
    for variant, label in (
        ("torchfreeze", "frozen backbone"),
        ("plain", "plain freezing"),
        ("full", "full fine-tuning"),
    ):
        spec = {"model": model, "variant": variant, "batch_size": batch, "steps": steps, "seed": seed}
        with out.bar(1, f"measuring {label}") as advance:
            runs[label] = run_child(
                "torchfreeze.cli.demo_measure:measure", spec, env={"OMP_NUM_THREADS": str(spec.get("threads", 1))}
            )
            advance(1)
    fz, full, plain = runs["frozen backbone"], runs["full fine-tuning"], runs["plain freezing"]
    # best of N steps (as timeit does): other load on the machine only ever adds time
    saved_ms = full["step_ms_best"] - fz["step_ms_best"]
    comparison = {
        "frozen": fz,
        "full": full,
        "plain": plain,
        "time_saved_per_step_ms": saved_ms,
        "time_saved_vs_plain_ms": plain["step_ms_best"] - fz["step_ms_best"],
        "peak_rss_saved_vs_plain_mb": plain["peak_rss_mb"] - fz["peak_rss_mb"],
        "speedup": full["step_ms_best"] / max(fz["step_ms_best"], 1e-9),
        "peak_rss_saved_mb": full["peak_rss_mb"] - fz["peak_rss_mb"],
        "head_steps": head_steps,
        "time_saved_head_phase_s": saved_ms * head_steps / 1000,
    }
    out.render(comparison_table(fz, full, plain))
    out.line(
        f"freezing saved {saved_ms:.1f} ms per training step (best of {steps}: "
        f"{comparison['speedup']:.1f}x faster), "
        f"about {comparison['time_saved_head_phase_s']:.1f} s over the {head_steps} head-only steps "
        f"of this run, and {comparison['peak_rss_saved_mb']:.0f} MiB of peak memory (RSS)."
    )
    vs_plain = comparison["time_saved_vs_plain_ms"]
    if abs(vs_plain) < 0.15 * fz["step_ms_best"] and abs(comparison["peak_rss_saved_vs_plain_mb"]) < 5:
        out.line(
            f"against plain freezing (requires_grad=False, train mode, AdamW over everything): about the same "
            f"({vs_plain:+.1f} ms per step, {comparison['peak_rss_saved_vs_plain_mb']:+.0f} MiB): requires_grad=False "
            "already stops autograd at the frozen part; what plain freezing gets wrong here is correctness "
            "(section 3), not speed."
        )
    else:
        out.line(
            f"against plain freezing (requires_grad=False, train mode, AdamW over everything): {vs_plain:+.1f} ms "
            f"per step and {comparison['peak_rss_saved_vs_plain_mb']:+.0f} MiB of peak memory saved (the plain "
            "run keeps the frozen part in train mode: dropout, BatchNorm statistics)."
        )
    if abs(comparison["peak_rss_saved_mb"]) < 5:
        out.line(
            f"(memory: this model's weights are only {full_bytes / 2**20:.1f} MiB, so the process's "
            f"memory is dominated by the Python/PyTorch runtime; see --model minilm for a model "
            f"where gradients and optimizer state of the frozen part would weigh hundreds of MiB.)"
        )
    out.line("(wall-clock, single-threaded so that other load on the machine distorts the comparison less.)")
    return comparison
