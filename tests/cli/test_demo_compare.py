"""The demo's side-by-side pieces (torchfreeze.cli.demo_compare, demo_plot): drift, tables, figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from torchfreeze.cli.demo_compare import Curve, Drift, drift_of, drift_table, gaps, history_table
from torchfreeze.cli.demo_plot import plot_curves
from torchfreeze.cli.demo_tasks import Task


class _Net(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(dropout))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out


def _task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=g) * 3 + 1
    return Task(x, torch.randint(0, 2, (80,), generator=g), torch.arange(64), torch.arange(64, 80), ("a", "b"), "")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_submodule("backbone").state_dict().items()}


def test_drift_counts_batchnorm_statistics_weights_and_dropout_noise() -> None:
    model, task = _Net(dropout=0.5), _task()
    before = _snapshot(model)
    model.train()
    with torch.no_grad():
        model(task.inputs[:16])  # train mode: the BatchNorm statistics move
        model.get_parameter("backbone.0.weight").add_(0.25)  # and a "frozen" weight moves
    drift = drift_of(model, before, task)
    assert (drift.bn_stats_changed, drift.bn_stats_total) == (2, 2) and drift.bn_stats_max_change > 0
    assert (drift.weights_changed, drift.weights_total) == (1, 4)
    assert drift.weights_max_change == pytest.approx(0.25)
    assert drift.dropout_modules == 1 and drift.feature_noise > 0.1
    stats = model.get_submodule("backbone").state_dict()["1.running_mean"].clone()
    drift_of(model, before, task)  # the noise is measured on a copy: the statistics stay
    assert torch.equal(model.get_submodule("backbone").state_dict()["1.running_mean"], stats)


def test_nothing_drifts_in_an_untouched_backbone_without_dropout() -> None:
    model, task = _Net(dropout=0.0), _task()
    drift = drift_of(model, _snapshot(model), task)
    assert (drift.bn_stats_changed, drift.weights_changed, drift.dropout_modules, drift.feature_noise) == (0, 0, 0, 0.0)
    # measuring the noise runs a copy: the model's statistics did not move
    assert drift_of(model, _snapshot(model), task).bn_stats_changed == 0


def _curves() -> tuple[Curve, Curve]:
    ours = Curve("torchfreeze", [0.5, 0.9, 0.95], [1.0, 0.4, 0.2], [1.1, 0.5, 0.3])
    plain = Curve("plain PyTorch", [0.6, 0.7, 0.96], [0.9, 0.8, 0.19], [1.0, 0.6, 0.2])
    return ours, plain


def test_history_table_and_gaps_show_every_epoch_of_both_runs() -> None:
    ours, plain = _curves()
    text = str(history_table(ours, plain, head_epochs=2))
    assert "90.0%" in text and "70.0%" in text and text.count("frozen backbone") == 2 and "unfreezing" in text
    (lead_epoch, lead), (trail_epoch, trail) = gaps(ours, plain)
    assert (lead_epoch, trail_epoch) == (2, 1)
    assert lead == pytest.approx(20.0) and trail == pytest.approx(-10.0)


def test_drift_table_prints_the_numbers() -> None:
    drift = Drift(6, 6, 0.385, 0, 9, 0.0, 2, 0.123, 0.941, 0.62)
    text = str(drift_table(drift))
    for fragment in ("6 of 6 tensors changed", "0.385", "0 of 9 tensors moved", "12.3%", "62.0%", "94.1%"):
        assert fragment in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = plot_curves(list(_curves()), tmp_path / "curves-x.png", head_epochs=2, title="t")
    assert path == tmp_path / "curves-x.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
