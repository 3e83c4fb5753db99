"""``torchfreeze bench`` (torchfreeze.cli.bench): end to end with ``--quick`` (a benchmark, so no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchfreeze.cli.bench import main, to_markdown


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert "headline ratios" in capsys.readouterr().out  # the console table


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


def test_python_dash_m_runs_the_bench() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torchfreeze.cli.bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--scenarios" in proc.stdout and "torchfreeze bench" in proc.stdout
