"""The Lightning callback with the real ``lightning.Trainer`` on CPU (tiny models, a few epochs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl
from _lit_models import TinyModule, data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import torchfreeze
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CheckpointError, FrozenTensorChangedError
from torchfreeze.integrations.lightning import FreezeCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SCHEDULE = {1: "backbone.3", 2: "backbone.0"}


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_plan_is_applied_before_configure_optimizers_and_frozen_part_stays_bit_identical(tmp_path: Path) -> None:
    model = TinyModule()
    before = _tensors(model.backbone)
    cb = FreezeCallback(freeze=["backbone"], mode="eval", guard=True)
    tr = trainer(tmp_path, max_epochs=2, callbacks=[cb])
    tr.fit(model, data())
    held = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in model.head.parameters()}
    after = _tensors(model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert not model.backbone[1].training  # the pin survived Lightning's model.train()
    assert cb.problems == []


@pytest.mark.parametrize("interval, expected_last", [("epoch", 2), ("step", 11)], ids=["epoch", "step"])
def test_schedule_unfreezes_at_boundaries_and_joins_the_lr_scheduler(
    tmp_path: Path, interval: str, expected_last: int
) -> None:
    model = TinyModule()
    schedule = SCHEDULE if interval == "epoch" else {4: "backbone.3", 8: "backbone.0"}
    cb = FreezeCallback(freeze=["backbone"], mode="eval", schedule=schedule, interval=interval)  # type: ignore[arg-type]
    tr = trainer(tmp_path, max_epochs=3, callbacks=[cb])
    tr.fit(model, data())
    opt = tr.optimizers[0]
    names = [g["name"] for g in opt.param_groups]
    assert names[:2] == ["group0", "group0/no_decay"] and names[2:] == [
        "unfrozen0",
        "unfrozen0/no_decay",
        "unfrozen1",
        "unfrozen1/no_decay",
    ]
    assert cb.run.unfreezing is not None and cb.run.unfreezing.last == expected_last
    assert not torchfreeze.is_frozen(model, "backbone.0") and not torchfreeze.is_frozen(model, "backbone.3")
    sched = tr.lr_scheduler_configs[0].scheduler
    assert len(sched.base_lrs) == len(opt.param_groups)
    assert len(sched.get_last_lr()) == len(opt.param_groups)


class _OnlyHead(TinyModule):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_missing_trainable_parameters_are_reported(tmp_path: Path) -> None:
    model = _OnlyHead()
    cb = FreezeCallback(freeze=["backbone.0"])
    with pytest.warns(UserWarning, match="trainable-not-in-optimizer"):
        trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, data())
    (problem,) = [p for p in cb.problems if p.code == "trainable-not-in-optimizer"]
    assert set(problem.names) == {"backbone.3.weight", "backbone.3.bias", "backbone.1.weight", "backbone.1.bias"}


def test_missing_trainable_parameters_error_or_added(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="in no optimizer.*backbone.1.weight"):
        trainer(tmp_path, max_epochs=1, callbacks=[FreezeCallback(freeze=["backbone.0"], on_missing="error")]).fit(
            _OnlyHead(), data()
        )
    model = _OnlyHead()
    tr = trainer(tmp_path, max_epochs=1, callbacks=[FreezeCallback(freeze=["backbone.0"], on_missing="add")])
    tr.fit(model, data())
    held = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for _, p in torchfreeze.trainable_parameters(model)}


class _Tamper(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            self.backbone.get_parameter("0.weight").add_(1e-3)  # a frozen weight moved by user code
        return super().training_step(batch, batch_idx)


def test_guard_stops_the_run_when_a_frozen_weight_moves(tmp_path: Path) -> None:
    cb = FreezeCallback(freeze=["backbone"], mode="eval", guard=True)
    with pytest.raises(FrozenTensorChangedError, match="backbone.0.weight"):
        trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(_Tamper(), data())
    # without the guard the same run completes silently
    trainer(tmp_path, max_epochs=1, callbacks=[FreezeCallback(freeze=["backbone"], mode="eval")]).fit(_Tamper(), data())


def _run(root: Path, *, epochs: int, interval: str = "epoch", ckpt: str | None = None) -> tuple[Any, pl.Trainer]:
    model = TinyModule()
    schedule = SCHEDULE if interval == "epoch" else {3: "backbone.3", 6: "backbone.0"}
    cb = FreezeCallback(freeze=["backbone"], mode="eval", schedule=schedule, interval=interval)  # type: ignore[arg-type]
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    tr = trainer(root, max_epochs=epochs, callbacks=[cb, saver], enable_checkpointing=True)
    tr.fit(model, data(), ckpt_path=ckpt)
    return model, tr


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_resume_from_a_mid_run_checkpoint_is_bit_identical(tmp_path: Path, interval: str) -> None:
    full, full_tr = _run(tmp_path / "full", epochs=4, interval=interval)
    ckpt = tmp_path / "full" / "ckpt" / ("epoch=1.ckpt" if interval == "epoch" else "epoch=0.ckpt")  # mid-schedule
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("FreezeCallback")]
    assert state["schedule"]["last"] >= 1
    resumed, resumed_tr = _run(tmp_path / "resumed", epochs=4, interval=interval, ckpt=str(ckpt))
    a, b = _tensors(full), _tensors(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [g["lr"] for g in full_tr.optimizers[0].param_groups] == [
        g["lr"] for g in resumed_tr.optimizers[0].param_groups
    ]
    assert torchfreeze.freeze_state(full) == torchfreeze.freeze_state(resumed)


def test_resume_with_a_callback_without_the_schedule_is_refused(tmp_path: Path) -> None:
    _run(tmp_path / "full", epochs=2)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0.ckpt"
    tr = trainer(tmp_path / "other", max_epochs=3, callbacks=[FreezeCallback(freeze=["backbone"], mode="eval")])
    with pytest.raises(CheckpointError, match="unfreezing schedule"):
        tr.fit(TinyModule(), data(), ckpt_path=str(ckpt))


BAD_OPTIONS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "freeze-a-string": ({"freeze": "backbone"}, ArgumentTypeError, "freeze="),
    "mode": ({"mode": "frozen"}, ArgumentError, "mode="),
    "interval": ({"interval": "batch"}, ArgumentError, "interval="),
    "on-missing": ({"on_missing": "ignore"}, ArgumentError, "on_missing="),
    "guard-not-bool": ({"guard": 1}, ArgumentTypeError, "guard="),
    "lr": ({"schedule": {1: "head"}, "lr": -1.0}, ArgumentError, "lr="),
    "lr-without-schedule": ({"lr": 0.1}, ArgumentError, "schedule=None"),
}


@pytest.mark.parametrize("options, error, words", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_raise_naming_the_argument(options: dict[str, Any], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        FreezeCallback(**options)


def test_a_foreign_state_is_refused() -> None:
    with pytest.raises(CheckpointError, match="FreezeRun.state_dict"):
        FreezeCallback().load_state_dict({"format": "something else"})


def test_a_bad_selector_fails_at_setup_and_leaves_the_model_alone(tmp_path: Path) -> None:
    model = TinyModule()
    with pytest.raises(torchfreeze.errors.SelectorError):
        trainer(tmp_path, max_epochs=1, callbacks=[FreezeCallback(freeze=["bakcbone"])]).fit(model, data())
    assert all(p.requires_grad for p in model.parameters())


WORKER = Path(__file__).with_name("_lit_ddp_worker.py")


def _ddp(out: Path, *flags: str) -> tuple[dict[str, Any], dict[str, Any]]:
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), *flags], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


@pytest.mark.slow
def test_ddp_two_processes_unfreezing_mid_run_keeps_replicas_identical(tmp_path: Path) -> None:
    r0, r1 = _ddp(tmp_path / "rewrap")
    assert r0["_trainable"] and r1["_trainable"]  # backbone.3 was unfrozen at epoch 1
    assert [k for k in r0 if k != "_trainable" and not torch.equal(r0[k], r1[k])] == []
    # the control: the same run without re-wrapping DDP lets the unfrozen layer drift apart per rank
    c0, c1 = _ddp(tmp_path / "control", "--no-rewrap")
    assert not torch.equal(c0["backbone.3.weight"], c1["backbone.3.weight"])
    assert torch.equal(c0["backbone.0.weight"], c1["backbone.0.weight"])  # still frozen: identical anyway
