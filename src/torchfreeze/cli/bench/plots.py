"""The PNG plots of ``torchfreeze bench`` (matplotlib, optional): scenario 1 and scenario 6."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_probe", "plot_progressive", "write_plots"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_probe(results: Mapping[str, Any], path: Path) -> bool:
    """Scenario 1: seconds per epoch of each variant and backbone (median, IQR bars, log scale)."""
    probes = [s for s in results["scenarios"] if s["scenario"] == 1]
    if not probes:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(probes), figsize=(5.5 * len(probes), 4), squeeze=False)
    for ax, s in zip(axes[0], probes):
        figs = s["seconds_per_epoch"]
        names = list(figs)
        med = [figs[n]["median"] for n in names]
        err = [[m - figs[n]["q1"] for n, m in zip(names, med)], [figs[n]["q3"] - m for n, m in zip(names, med)]]
        ax.bar(range(len(names)), med, yerr=err, capsize=3)
        ticks = [f"{n} ({s['epochs_end_to_end']} epochs)" if n == "precompute_end_to_end" else n for n in names]
        ax.set_xticks(range(len(names)), ticks, rotation=35, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("seconds per epoch or run (median, IQR)")
        ax.set_title(f"feature caching, {s['model']}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_progressive(results: Mapping[str, Any], path: Path) -> bool:
    """Scenario 6: held-out accuracy against cumulative training wall time, one line per variant."""
    prog = [s for s in results["scenarios"] if s["scenario"] == 6]
    if not prog:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, v in prog[0]["variants"].items():
        ax.plot([0.0, *v["cumulative_train_seconds"]], [None, *v["accuracy_per_epoch"]], marker="o", label=name)
    ax.set_xlabel("cumulative training wall time (s, evaluation excluded)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"fine-tuning {prog[0]['model']}: accuracy against time")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


#: File names of the plots in the output directory.
PROBE_PNG = "feature_caching.png"
PROGRESSIVE_PNG = "progressive_accuracy.png"


def write_plots(results: Mapping[str, Any], out_dir: Path) -> tuple[list[str], str | None]:
    """Write every plot the run has data for; ``(file names written, note if matplotlib is missing)``."""
    try:
        _pyplot()
    except ImportError as exc:  # optional dependency
        return [], f"plots skipped: {exc}"
    written = [
        name
        for name, fn in ((PROBE_PNG, plot_probe), (PROGRESSIVE_PNG, plot_progressive))
        if fn(results, out_dir / name)
    ]
    return written, None
