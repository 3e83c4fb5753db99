"""The ``torchfreeze`` command (torchfreeze.cli.main): options, inspect, forwarding to bench, bad options."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from torchfreeze.cli.main import main

FACTORY_MODULE = """
import torch
from torch import nn
from torchfreeze import Composite


def build():
    return Composite(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 2))


def not_a_model():
    return 42


def tied():
    model = nn.ModuleDict({"encoder": nn.ModuleDict({"wte": nn.Embedding(5, 4)}), "lm_head": nn.Linear(4, 5, bias=False)})
    model["lm_head"].weight = model["encoder"]["wte"].weight
    return model


def needs_arguments(width):
    return nn.Linear(width, width)

CONSTANT = 3
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"tf_cli_factories_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_demo_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--model", "--epochs", "--batch-size", "--output-dir", "digits-cnn", "minilm"):
        assert option in text


def test_console_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from torchfreeze.cli.main import main; sys.exit(main())", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "inspect" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        pytest.param(["demo", "--epochs", "0"], "--epochs: expected a positive integer, got '0'", id="epochs-zero"),
        pytest.param(["demo", "--epochs", "many"], "--epochs: expected a positive integer", id="epochs-text"),
        pytest.param(["demo", "--batch-size", "-4"], "--batch-size: expected a positive integer", id="batch-neg"),
        pytest.param(["demo", "--model", "resnet"], "invalid choice: 'resnet'", id="model-unknown"),
        pytest.param(["demo", "--compare-steps", "-1"], "--compare-steps", id="compare-neg"),
        pytest.param(["demo", "--frobnicate"], "unrecognized arguments", id="unknown-option"),
        pytest.param(["demo", "--seed", str(2**70)], "--seed: expected an integer in [0, 2**63)", id="seed-huge"),
        pytest.param(["train"], "invalid choice: 'train'", id="unknown-command"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(
    argv: list[str],
    fragment: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and fragment in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["demo", "--output-dir", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


# ---------------------------------------------------------------------------- inspect
def test_inspect_factory_with_freeze(factory_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", f"{factory_module}:build", "--freeze", "backbone", "--mode", "eval", "--depth", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "backbone" in out and "head" in out and "eval (pinned)" in out
    assert "18 trainable" in out  # head: 8*2 + 2


def test_inspect_factory_without_freeze(factory_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", f"{factory_module}:build"]) == 0
    assert "0 frozen" in capsys.readouterr().out


def test_inspect_registered_model_with_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "digits-cnn", "--freeze", "plan:all_but_last_block", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "backbone.block1" in out and "eval (pinned)" in out


def test_inspect_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--list"]) == 0
    out = capsys.readouterr().out
    assert "digits-cnn" in out and "all_but_last_block" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        pytest.param(["inspect"], "missing MODULE:FACTORY", id="missing-target"),
        pytest.param(["inspect", "nonsense"], "neither MODULE:FACTORY nor a registered model", id="not-a-target"),
        pytest.param(["inspect", "no_such_module_xyz:build"], "cannot import module", id="no-module"),
        pytest.param(["inspect", "{mod}:missing"], "has no attribute", id="no-attr"),
        pytest.param(["inspect", "{mod}:CONSTANT"], "not callable", id="not-callable"),
        pytest.param(["inspect", "{mod}:not_a_model"], "expected an nn.Module", id="not-a-module"),
        pytest.param(["inspect", "{mod}:build", "--freeze", "nothing.here"], "nothing.here", id="bad-selector"),
        pytest.param(
            ["inspect", "{mod}:build", "--freeze", "plan:default"], "registered models only", id="plan-on-factory"
        ),
        pytest.param(["inspect", "digits-cnn", "--freeze", "plan:nope"], "known plans", id="unknown-plan"),
        pytest.param(["inspect", "{mod}:build", "--mode", "sleep"], "invalid choice", id="bad-mode"),
        pytest.param(["inspect", "{mod}:build", "--mode", "eval"], "add --freeze SELECTOR", id="mode-without-freeze"),
    ],
)
def test_inspect_bad_input(
    argv: list[str], fragment: str, factory_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{mod}", factory_module) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and fragment in err


def test_inspect_factory_that_raises_exits_1(factory_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", f"{factory_module}:needs_arguments"]) == 1
    err = capsys.readouterr().err
    assert "torchfreeze inspect: error:" in err and "needs_arguments() raised TypeError" in err


# ---------------------------------------------------------------------------- bench
def test_bench_forwards_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("torchfreeze.cli.bench")

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchfreeze.cli.bench", fake)
    assert main(["bench", "--quick", "--help"]) == 3
    assert seen == [["--quick", "--help"]]


def test_bench_missing_is_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "torchfreeze.cli.bench", None)  # import fails
    assert main(["bench"]) == 1
    assert "benchmark suite is not available" in capsys.readouterr().err


def test_output_dir_that_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--output-dir", str(blocker / "sub"), "--no-progress"]) == 1
    assert "torchfreeze demo: error:" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_python_dash_m_runs_the_same_command():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "torchfreeze", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "demo" in result.stdout and "inspect" in result.stdout and "bench" in result.stdout


# ------------------------------------------------------- inspect: every fix it suggests can be applied
def _fixed(argv: list[str], err: str) -> list[list[str]]:
    """``argv`` with each fix an inspect error suggests applied (a selector replaced, or an option added)."""
    import re

    out = []
    if "which match:" in err:
        bad = argv.index("--freeze") + 1
        for name in re.findall(r"'([^']*)'", err.split("which match:", 1)[1].split(";", 1)[0]):
            out.append([*argv[:bad], name, *argv[bad + 1 :]])
    out += [[*argv, "--freeze", name] for name in re.findall(r"add --freeze '([^']*)'", err)]
    for name in re.findall(r"use --freeze '([^']*)' instead", err):
        bad = argv.index("--freeze") + 1
        out.append([*argv[:bad], name, *argv[bad + 1 :]])
    if "--shared freeze" in err:
        out.append([*argv, "--shared", "freeze"])
    return out


def _settles(argv: list[str], capsys: pytest.CaptureFixture[str], depth: int = 2) -> bool:
    """True when ``argv`` succeeds, or fails with exit 2 and every fix it suggests settles in turn."""
    code = main(argv)
    err = capsys.readouterr().err
    if code == 0:
        return True
    fixes = _fixed(argv, err)
    return code == 2 and depth > 0 and bool(fixes) and all(_settles(f, capsys, depth - 1) for f in fixes)


@pytest.mark.parametrize(
    ("selector", "suggested"),
    [
        pytest.param("wte", "'**.wte'", id="name-deeper-in-the-model"),
        pytest.param("encoder.wte", "--shared freeze", id="tied-parameter"),
        pytest.param("", "--freeze '**'", id="empty-selector"),
        pytest.param("wet", "torchfreeze inspect", id="typo"),
    ],
)
def test_inspect_can_apply_every_fix_it_suggests(
    selector: str, suggested: str, factory_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9: inspect suggested shared='freeze', which it could not take, and a glob that failed."""
    argv = ["inspect", f"{factory_module}:tied", "--freeze", selector]
    assert main(argv) == 2
    assert suggested in capsys.readouterr().err
    assert _settles(argv, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["inspect", "{mod}:build", "--freeze", ""], id="empty-selector"),
        pytest.param(["inspect", "{mod}:tied", "--freeze", "encoder", "--shared", "sometimes"], id="bad-shared"),
        pytest.param(["inspect", "--list", "{mod}:build"], id="list-with-a-target"),
        pytest.param(["inspect", "{mod}:tied", "--freeze", "encoder"], id="tied-parameter"),
        pytest.param(["inspect", "tf_cli_broken_module_xyz:build"], id="module-that-fails-to-import"),
    ],
)
def test_inspect_usage_errors_exit_2(
    argv: list[str], factory_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tf_cli_broken_module_xyz.py").write_text("this is not python\n")
    assert main([a.replace("{mod}", factory_module) for a in argv]) == 2
    assert "error" in capsys.readouterr().err
