"""End-to-end test of `torchfreeze bench --quick` (a benchmark, so no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchfreeze.cli.bench import _measure_memory, main, to_markdown


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--quick", "--no-memory", "--output-dir", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    got = [(s["scenario"], s["model"]) for s in data["scenarios"]]
    assert got == [(1, "encoder"), (1, "cnn"), (2, "encoder"), (2, "cnn"), (3, "encoder"), (4, "cnn"), (5, "cnn")]
    for s in data["scenarios"]:
        assert s["ratios"] and all(v > 0 for v in s["ratios"].values())
    probe = data["scenarios"][0]
    assert set(probe["median_epoch_seconds"]) == {"plain", "plain_eval", "torchfreeze", "precomputed"}
    assert len(probe["median_epoch_seconds"]["torchfreeze"]) == 5
    assert probe["cache_stats"]["hits"] > 0
    assert data["scenarios"][4]["explain_part"]["on_backward_path"] is True
    assert data["meta"]["command"].startswith("torchfreeze bench --quick")
    md = (out / "bench.md").read_text()
    assert "## Headline ratios" in md and "speedup_epochs_2_5_vs_plain" in md
    assert (out / "time_per_epoch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert to_markdown(data) == md


@pytest.mark.slow
def test_peak_memory_is_measured_in_a_fresh_process() -> None:
    mem = _measure_memory("cnn", "lower", "torchfreeze", quick=True, threads=1)
    assert "error" not in mem, mem
    assert mem["peak_rss_kib"] >= mem["rss_before_kib"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--scenarios", "6"], id="unknown-scenario"),
        pytest.param(["--scenarios", "x"], id="not-a-number"),
        pytest.param(["--models", "resnet"], id="unknown-model"),
        pytest.param(["--repeats", "0"], id="zero-repeats"),
        pytest.param(["--frobnicate"], id="unknown-option"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(argv: list[str], tmp_path: Path) -> None:
    out = tmp_path / "never"
    assert main([*argv, "--output-dir", str(out)]) == 2
    assert not out.exists()
