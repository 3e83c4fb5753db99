"""The demo's figure: held-out accuracy and loss per epoch of each run, as a PNG (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

__all__ = ["plot_curves", "Series"]


class Series(Protocol):
    """What a curve needs for the figure (``demo_compare.Curve`` has it)."""

    name: str
    accuracy: list[float]
    loss: list[float]


def plot_curves(curves: Sequence[Series], path: Path, *, head_epochs: int, title: str) -> Path | None:
    """Write accuracy and loss per epoch of ``curves`` to ``path``; ``None`` without matplotlib.

    Args:
        curves: the runs (same number of epochs).
        path: the PNG to write.
        head_epochs: epochs of the frozen phase (a dotted line marks where unfreezing starts).
        title: the figure's title.

    Returns:
        ``path``, or ``None`` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for curve in curves:
        epochs = list(range(1, len(curve.accuracy) + 1))
        acc_ax.plot(epochs, [100 * a for a in curve.accuracy], marker="o", label=curve.name)
        loss_ax.plot(epochs, curve.loss, marker="o", label=curve.name)
    for ax, label in ((acc_ax, "held-out accuracy (%)"), (loss_ax, "held-out loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if head_epochs < len(curves[0].accuracy):
            ax.axvline(head_epochs + 0.5, color="grey", linestyle=":", label="unfreezing starts")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
