"""What the bench runs (torchfreeze.cli.bench.workload): the peak-memory child, the models."""

from __future__ import annotations

import pytest
import torch

from torchfreeze.cli.bench.workload import QUICK, build_cnn, measure_memory


@pytest.mark.slow
def test_peak_memory_is_measured_in_a_fresh_process() -> None:
    mem = measure_memory("cnn", "lower", "torchfreeze", quick=True, threads=1)
    assert "error" not in mem, mem
    assert mem["peak_rss_kib"] >= mem["rss_before_kib"] > 0
    assert set(mem) == {"rss_before_kib", "peak_rss_kib", "peak_reset", "delta_mib"}


@pytest.mark.slow
def test_failed_child_is_reported_not_raised() -> None:
    mem = measure_memory("cnn", "nowhere", "torchfreeze", quick=True, threads=1)
    assert "unknown scenario 'nowhere'" in mem["error"]


def test_quick_cnn_is_deterministic() -> None:
    a, b = build_cnn(quick=True), build_cnn(quick=True)
    x = torch.randn(2, 3, QUICK.cnn_image, QUICK.cnn_image)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
