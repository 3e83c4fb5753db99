"""``torchfreeze bench`` (torchfreeze.cli.bench): end to end with ``--quick`` (a benchmark, so no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torchfreeze.cli.bench import main, to_markdown

PNG = b"\x89PNG\r\n\x1a\n"


def _figures(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every figure in a results tree: a dict with a median."""
    if isinstance(node, dict):
        if "median" in node:
            yield path, node
            return
        for k, v in node.items():
            yield from _figures(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _figures(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    code = main(["--quick", "--no-memory", "--output-dir", str(out)])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


@pytest.mark.slow
def test_quick_run_has_every_scenario(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = quick_run
    got = [(s["scenario"], s["model"]) for s in data["scenarios"]]
    assert got == [
        (1, "mlp"),
        (1, "cnn"),
        (1, "encoder"),
        (2, "encoder"),
        (2, "cnn"),
        (3, "encoder"),
        (4, "cnn"),
        (5, "cnn"),
        (6, "encoder"),
    ]
    assert data["meta"]["command"].startswith("torchfreeze bench --quick")


@pytest.mark.slow
def test_every_figure_carries_its_spread(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = quick_run
    figs = list(_figures(data["scenarios"]))
    assert len(figs) > 40
    for path, f in figs:
        assert {"median", "q1", "q3", "spread"} <= set(f), path
        assert f["q1"] <= f["median"] <= f["q3"], (path, f)
        assert f["median"] > 0, path
    for s in data["scenarios"]:
        assert s["ratios"], s["scenario"]
        assert all(r["unit"] == "x" for r in s["ratios"].values())


@pytest.mark.slow
def test_feature_caching_reports_goals_and_identical_heads(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = quick_run
    for s in (s for s in data["scenarios"] if s["scenario"] == 1):
        assert {"plain", "no_grad", "cache_epochs", "cache_first_epoch", "floor"} <= set(s["seconds_per_epoch"])
        assert [g["ratio"] for g in s["goals"]] == ["cache_epochs_vs_floor", "cache_first_epoch_vs_no_grad"]
        assert all(isinstance(g["met"], bool) for g in s["goals"])
        # the cache and the floor train the head exactly like the careful no_grad loop
        diffs = s["head_max_abs_difference_vs_no_grad"]
        assert {"cache", "floor"} <= set(diffs)
        assert all(d == 0.0 for d in diffs.values()), diffs
        assert s["cache_stats"]["hits"] > 0


@pytest.mark.slow
def test_progressive_scenario_has_four_variants_with_accuracies(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = quick_run
    (s,) = [s for s in data["scenarios"] if s["scenario"] == 6]
    assert list(s["variants"]) == ["full", "static", "gradual", "progressive"]
    for name, v in s["variants"].items():
        assert len(v["accuracy_per_epoch"]) == s["epochs"] == len(v["train_seconds_per_epoch"]), name
        assert all(0.0 <= a <= 1.0 for a in v["accuracy_per_epoch"]), name
        assert v["final_accuracy"] == v["accuracy_per_epoch"][-1]
        assert v["cumulative_train_seconds"] == sorted(v["cumulative_train_seconds"])
    # the schedules did what their configurations say
    assert s["variants"]["full"]["frozen_groups_per_epoch"] == [0] * s["epochs"]
    assert set(s["variants"]["static"]["frozen_groups_per_epoch"]) == {4}
    assert s["variants"]["progressive"]["frozen_groups_per_epoch"][0] == 0
    assert s["variants"]["progressive"]["frozen_groups_per_epoch"][-1] > 0
    assert [g["goal"] for g in s["goals"]] == [">= 3", "within 1 point"]
    # progressive freezing runs through the library, and its frozen prefix was replayed from the cache
    prog = s["variants"]["progressive"]
    assert prog["implementation"].endswith("ProgressiveFreezing + cache_frozen_prefix")
    assert prog["prefix_cache_stats"]["hits"] > 0
    assert prog["prefix_cache_stats"]["boundary"] is not None
    assert s["variants"]["full"]["prefix_cache_stats"] is None


@pytest.mark.slow
def test_markdown_and_plots_are_written(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    out, data, md = quick_run
    assert to_markdown(data) == md
    lines = md.splitlines()
    assert lines[0] == "# torchfreeze bench results"
    assert lines[lines.index("Command:") + 3] == data["meta"]["command"]
    assert md.index("Machine:") < md.index("## Headline") < md.index("## 1. feature caching")
    assert "cache_epochs_vs_floor" in md and "<= 1.3" in md and "met**" in md
    assert "## 6. progressive freezing" in md
    assert data["meta"]["plots"] == ["feature_caching.png", "progressive_accuracy.png"]
    for name in data["meta"]["plots"]:
        assert (out / name).read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["--scenarios", "7"],
            "--scenarios '7': expected a comma-separated subset of 1,2,3,4,5,6",
            id="unknown-scenario",
        ),
        pytest.param(["--scenarios", "x"], "--scenarios 'x': expected", id="not-a-number"),
        pytest.param(["--scenarios", ","], "--scenarios ',': expected", id="empty-list"),
        pytest.param(
            ["--models", "resnet"],
            "--models 'resnet': expected a comma-separated subset of mlp,cnn,encoder",
            id="unknown-model",
        ),
        pytest.param(["--repeats", "0"], "--repeats 0: expected a positive number of rounds", id="zero-repeats"),
        pytest.param(["--threads", "-1"], "--threads -1: expected a positive number of threads", id="bad-threads"),
        pytest.param(["--repeats", "two"], "argument --repeats: invalid int value", id="repeats-not-int"),
        pytest.param(["--frobnicate"], "unrecognized arguments: --frobnicate", id="unknown-option"),
    ],
)
def test_bad_options_exit_2_with_the_documented_error_and_write_nothing(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "error:" in err
    assert not out.exists()


def test_python_dash_m_runs_the_bench() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torchfreeze.cli.bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--scenarios" in proc.stdout and "torchfreeze bench" in proc.stdout and "1-6" in proc.stdout
