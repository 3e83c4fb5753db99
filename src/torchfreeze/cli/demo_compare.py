"""The demo's side-by-side run: the same frozen-backbone recipe in plain PyTorch, and what drifted.

The plain run is what a typical script does: build the model, set ``requires_grad=False`` on
the backbone, one AdamW over *all* parameters (backbone at the backbone lr, head at the head
lr, weight decay 0.01), ``model.train()`` at every epoch, and at the unfreezing epochs set
``requires_grad=True`` on the same blocks torchfreeze unfreezes. Same weights, same head
initialisation, same batches. At the end of the frozen phase it measures what moved in the
"frozen" backbone: BatchNorm running statistics, weights (weight decay and momentum act on a
parameter whose ``.grad`` is a zero tensor, not on one whose ``.grad`` is ``None``), and the
dropout noise in the features (two train-mode passes over the same batch).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchfreeze as tf
from torchfreeze._core.behaviour import nondeterministic_modules
from torchfreeze._core.render import Table
from torchfreeze.cli.console import Output
from torchfreeze.cli.demo_plot import plot_curves
from torchfreeze.cli.demo_tasks import ModelSetup, Task, classes, evaluate, make_task, train_epoch

__all__ = ["Curve", "Drift", "plain_recipe", "drift_of", "history_table", "drift_table", "side_by_side", "gaps"]

_STATS = ("running_mean", "running_var")


@dataclass
class Curve:
    """Per-epoch figures of one run: held-out accuracy and loss, training loss."""

    name: str
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)

    def add(self, model: nn.Module, task: Task, train_loss: float) -> None:
        """Evaluate ``model`` on the held-out examples and append the epoch's figures."""
        acc, loss = evaluate(model, task, task.test)
        self.accuracy.append(acc)
        self.loss.append(loss)
        self.train_loss.append(train_loss)


@dataclass
class Drift:
    """What changed in a backbone that was meant to stay frozen."""

    bn_stats_changed: int = 0
    bn_stats_total: int = 0
    bn_stats_max_change: float = 0.0
    weights_changed: int = 0
    weights_total: int = 0
    weights_max_change: float = 0.0
    dropout_modules: int = 0
    feature_noise: float = 0.0
    in_run_accuracy: float = 0.0
    reloaded_accuracy: float = 0.0


def _snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def drift_of(model: nn.Module, before: Mapping[str, torch.Tensor], task: Task) -> Drift:
    """Compare the backbone with its snapshot ``before``; measure train-mode feature noise.

    The noise is the relative L2 distance between two train-mode passes of the backbone over
    the same 64 held-out examples (on a copy, so no statistics move): dropout makes them differ.
    """
    backbone = model.get_submodule("backbone")
    now = backbone.state_dict()
    params = {n for n, _ in backbone.named_parameters()}
    drift = Drift()
    for name, old in before.items():
        if not old.is_floating_point():
            continue
        change = float((now[name].detach().double() - old.double()).abs().max()) if old.numel() else 0.0
        if name.endswith(_STATS):
            drift.bn_stats_total += 1
            drift.bn_stats_changed += change > 0
            drift.bn_stats_max_change = max(drift.bn_stats_max_change, change)
        elif name in params:
            drift.weights_total += 1
            drift.weights_changed += change > 0
            drift.weights_max_change = max(drift.weights_max_change, change)
    probe = copy.deepcopy(model).train()
    drift.dropout_modules = sum(
        1 for n in nondeterministic_modules(probe.get_submodule("backbone")) if n.kind == "random"
    )
    forward = getattr(probe, "forward_features", probe)
    x = task.batch(task.test[:64])
    with torch.no_grad():
        a, b = forward(x), forward(x)
    drift.feature_noise = float((a - b).norm() / a.norm().clamp_min(1e-12))
    return drift


def plain_recipe(
    model_key: str,
    setup: ModelSetup,
    *,
    epochs: int,
    head_epochs: int,
    batch: int,
    seed: int,
    unfreeze: Mapping[int, list[str]],
) -> tuple[Curve, Drift, float]:
    """Run the recipe as a plain PyTorch script would; return its curve, its drift, final accuracy.

    Args:
        model_key: the demo model.
        setup: its training setup.
        epochs: total epochs.
        head_epochs: epochs with the backbone frozen (the drift is measured after them).
        batch: batch size.
        seed: seed of the head initialisation and batch order (as in the torchfreeze run).
        unfreeze: ``{epoch index: module names}`` set trainable before that epoch.
    """
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.get_model(setup.registry, freeze=False, num_classes=len(classes(model_key)))
    task = make_task(model_key, model)
    backbone, head = model.get_submodule("backbone"), model.get_submodule("head")
    for p in backbone.parameters():
        p.requires_grad = False  # the usual way to freeze
    optimizer = torch.optim.AdamW(
        [
            {"params": list(backbone.parameters()), "lr": setup.backbone_lr},
            {"params": list(head.parameters()), "lr": setup.head_lr},
        ],
        weight_decay=0.01,
    )
    before = _snapshot(backbone)
    gen = torch.Generator().manual_seed(seed)
    curve = Curve("plain PyTorch")
    drift = Drift()
    for epoch in range(epochs):
        for name in unfreeze.get(epoch, []):
            for p in model.get_submodule(name).parameters():
                p.requires_grad = True
        model.train()  # every epoch, as scripts do: frozen BatchNorm and dropout back in train mode
        curve.add(model, task, train_epoch(model, optimizer, task, batch, gen, lambda *a, **k: None))
        if epoch + 1 == head_epochs:
            drift = drift_of(model, before, task)
            # what the run saves as its trainable part (the head), reloaded onto the pretrained backbone
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fresh = tf.get_model(setup.registry, freeze=False, num_classes=len(classes(model_key)))
            fresh.get_submodule("head").load_state_dict(head.state_dict())
            drift.in_run_accuracy = curve.accuracy[-1]
            drift.reloaded_accuracy = evaluate(fresh, task, task.test)[0]
    return curve, drift, curve.accuracy[-1]


def _num(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}"


def drift_table(drift: Drift) -> Table:
    """What drifted in the plain run's frozen backbone, next to torchfreeze (nothing, checked by guard)."""
    rows: list[Sequence[str]] = [
        (
            "BatchNorm running statistics",
            f"{drift.bn_stats_changed} of {drift.bn_stats_total} tensors changed (largest change "
            f"{_num(drift.bn_stats_max_change)})"
            if drift.bn_stats_total
            else "none in this model",
            "unchanged (pinned eval)",
        ),
        (
            "frozen weights",
            f"{drift.weights_changed} of {drift.weights_total} tensors moved (largest change "
            f"{_num(drift.weights_max_change)})",
            "unchanged (not in the optimizer)",
        ),
        (
            "dropout noise in the features",
            f"{drift.dropout_modules} dropout module(s) active; two passes differ by {drift.feature_noise:.1%}",
            "none (pinned eval)",
        ),
        (
            "its head checkpoint on the pretrained backbone",
            f"{drift.reloaded_accuracy:.1%} held-out (the run itself: {drift.in_run_accuracy:.1%})",
            "the run's accuracy (phase 4 reloads it)",
        ),
    ]
    return Table(("after the frozen phase", "plain PyTorch", "torchfreeze"), rows)


def history_table(ours: Curve, plain: Curve, head_epochs: int) -> Table:
    """Per-epoch held-out accuracy and loss of both runs."""
    rows: list[Sequence[str]] = []
    for i, (a, b) in enumerate(zip(ours.accuracy, plain.accuracy)):
        phase = "frozen backbone" if i < head_epochs else "unfreezing"
        rows.append((str(i + 1), phase, f"{a:.1%}", f"{b:.1%}", f"{ours.loss[i]:.3f}", f"{plain.loss[i]:.3f}"))
    return Table(
        ("epoch", "phase", "torchfreeze acc", "plain acc", "torchfreeze loss", "plain loss"),
        rows,
        caption="held-out accuracy and loss after each epoch",
    )


def gaps(ours: Curve, plain: Curve) -> tuple[tuple[int, float], tuple[int, float]]:
    """(epoch, points) where torchfreeze leads the plain run most, and where it trails most (1-based)."""
    diffs = [(100.0 * (a - b), i + 1) for i, (a, b) in enumerate(zip(ours.accuracy, plain.accuracy))]
    if not diffs:
        return (0, 0.0), (0, 0.0)
    lead, trail = max(diffs), min(diffs)
    return (lead[1], lead[0]), (trail[1], trail[0])


def side_by_side(
    out: Output,
    model_key: str,
    setup: ModelSetup,
    *,
    ours: Curve,
    epochs: int,
    head_epochs: int,
    batch: int,
    seed: int,
    unfreeze: Mapping[int, list[str]],
    out_dir: Path,
) -> dict[str, Any]:
    """Section 3 of the demo: run the plain recipe, print both curves and the drift, write the PNG.

    Returns:
        The figures for ``results-<model>.json`` (curves, drift, PNG path).
    """
    out.heading("3. the same recipe in plain PyTorch (requires_grad=False, model.train(), AdamW over all)")
    with out.bar(1, f"plain PyTorch, {epochs} epochs") as advance:
        plain, drift, _ = plain_recipe(
            model_key, setup, epochs=epochs, head_epochs=head_epochs, batch=batch, seed=seed, unfreeze=unfreeze
        )
        advance(1)
    out.render(history_table(ours, plain, head_epochs))
    out.render(drift_table(drift))
    (lead_epoch, lead), (trail_epoch, trail) = gaps(ours, plain)
    final = f"final held-out accuracy: torchfreeze {ours.accuracy[-1]:.1%}, plain {plain.accuracy[-1]:.1%}"
    if lead == trail == 0:
        out.line(f"{final}; the same accuracy at every epoch (the losses differ, see the table)")
    else:
        out.line(
            f"{final}; torchfreeze led most at epoch {lead_epoch} ({lead:+.1f} points) and trailed most at epoch "
            f"{trail_epoch} ({trail:+.1f} points)"
        )
    out.line(
        "the plain run's 'frozen' backbone is no longer the pretrained one (table above): what it saves as "
        "'the trainable part' does not reproduce the model it evaluated"
        if drift.bn_stats_changed or drift.weights_changed
        else "the plain run's frozen backbone stayed as it was here"
    )
    if drift.weights_changed == 0:
        out.line(
            "(frozen weights did not move in the plain run: their .grad stayed None, which AdamW skips; a zero "
            ".grad, e.g. zero_grad(set_to_none=False) on a once-trained parameter, would let weight decay move them)"
        )
    png = plot_curves(
        [ours, plain],
        out_dir / f"curves-{model_key}.png",
        head_epochs=head_epochs,
        title=f"torchfreeze demo: {model_key}",
    )
    out.line(
        f"figure: {png}" if png is not None else "figure: not written (install matplotlib: pip install matplotlib)"
    )
    return {
        "torchfreeze": asdict(ours),
        "plain": asdict(plain),
        "drift": asdict(drift),
        "figure": None if png is None else str(png),
    }
