"""Scenario 2 of ``torchfreeze bench``: frozen lower half, trainable upper half.

Step time (``blocked_autorange`` of one training step, rounds interleaved) and peak memory (a fresh
process per variant) against plain full fine-tuning and plain freezing. Scenario 1 lives in
:mod:`~torchfreeze.cli.bench.scenarios_probe`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.benchmark import Measurement

from torchfreeze.cli.bench.timing import figure, from_samples, per_call, ratio, rounds
from torchfreeze.cli.bench.workload import Kind, Sizes, lower_blocks, make_batch, measure_memory, prepare, step_runner

__all__ = ["scenario_lower"]


def scenario_lower(
    kind: Kind,
    base: nn.Module,
    sizes: Sizes,
    log: Callable[[str], None],
    *,
    quick: bool,
    memory: bool,
    threads: int | None,
) -> dict[str, Any]:
    """2. Frozen lower half: step time and peak memory vs plain full fine-tuning and plain freezing."""
    bs = sizes.enc_step_batch if kind == "encoder" else sizes.cnn_batch
    x, y = make_batch(kind, sizes, bs)
    names = ("plain_full", "plain_freeze", "torchfreeze")
    label = f"2. frozen lower half ({kind})"

    def timed(v: str) -> Callable[[], Measurement]:
        go = step_runner(prepare(kind, "lower", v, base), x, y)
        return lambda: per_call(go, label=label, sub_label=v, description=kind, min_run_time=sizes.min_run_time)

    res = rounds({v: timed(v) for v in names}, sizes.repeats)
    med = {v: figure(res[v], what="timed blocks (blocked_autorange)") for v in names}
    mem = {v: measure_memory(kind, "lower", v, quick, threads) for v in names} if memory else {}
    out: dict[str, Any] = {
        "scenario": 2,
        "title": "frozen lower half, trainable upper half",
        "model": kind,
        "frozen": lower_blocks(kind),
        "batch": bs,
        "seconds": {f"step, {v}": f for v, f in med.items()},
        "memory": mem,
        "ratios": {
            "step_time_torchfreeze_vs_plain_full": ratio(med["torchfreeze"], med["plain_full"]),
            "step_time_torchfreeze_vs_plain_freeze": ratio(med["torchfreeze"], med["plain_freeze"]),
        },
    }
    if mem and all("delta_mib" in m for m in mem.values()):
        # one fresh process per variant: a single measurement, its spread is zero (n = 1)
        peak = {v: figure(from_samples(v, [m["delta_mib"]]), what="fresh processes") for v, m in mem.items()}
        out["ratios"]["peak_memory_torchfreeze_vs_plain_full"] = ratio(peak["torchfreeze"], peak["plain_full"])
        out["ratios"]["peak_memory_torchfreeze_vs_plain_freeze"] = ratio(peak["torchfreeze"], peak["plain_freeze"])
    r = {k: f["median"] for k, f in out["ratios"].items()}
    log(
        f"  [2 {kind}] step time {r['step_time_torchfreeze_vs_plain_full']:.2f}x full fine-tuning, "
        f"{r['step_time_torchfreeze_vs_plain_freeze']:.2f}x plain freezing"
        + (
            f"; training memory {r['peak_memory_torchfreeze_vs_plain_full']:.2f}x full, "
            f"{r['peak_memory_torchfreeze_vs_plain_freeze']:.2f}x plain freezing"
            if "peak_memory_torchfreeze_vs_plain_full" in r
            else ""
        )
    )
    return out
