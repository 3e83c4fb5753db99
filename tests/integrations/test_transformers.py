"""The Hugging Face callback with the real ``transformers.Trainer`` on CPU (a tiny BERT, 8 steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _hf_models import Rows, arguments, callback, run, tiny_bert
from transformers import Trainer

import torchfreeze
from torchfreeze.errors import ArgumentError, CheckpointError, FrozenTensorChangedError
from torchfreeze.integrations.transformers import STATE_FILE, FreezeTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_plan_schedule_and_scheduler_stay_consistent(tmp_path: Path) -> None:
    model, trainer = run(tmp_path, guard=True)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    assert opt is not None and isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    names = [g.get("name") for g in opt.param_groups]
    assert names[2:] == ["unfrozen0", "unfrozen0/no_decay"]  # layer 1 joined at step 3
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for _, p in torchfreeze.trainable_parameters(model)}
    assert torchfreeze.is_frozen(model, "bert.embeddings", "bert.encoder.layer.0")
    assert not torchfreeze.is_frozen(model, "bert.encoder.layer.1")
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups)
    # the linear schedule decays every group to 0 at the last step, the added ones included
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(opt.param_groups)


def test_frozen_part_is_bit_identical_after_training(tmp_path: Path) -> None:
    before = _tensors(tiny_bert())
    model, _ = run(tmp_path, schedule=None)
    after = _tensors(model)
    frozen = [k for k in before if k.startswith(("bert.embeddings", "bert.encoder"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_each_checkpoint_folder_holds_the_freeze_state(tmp_path: Path) -> None:
    run(tmp_path)
    for step, last in ((4, 3), (8, 7)):
        state = json.loads((tmp_path / f"checkpoint-{step}" / STATE_FILE).read_text())
        assert state["schedule"]["last"] == last
        assert "bert.encoder.layer.1.output.dense.weight" not in state["freeze_state"]["frozen"]


def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    full, full_trainer = run(tmp_path / "full")
    resumed, resumed_trainer = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    a, b = _tensors(full), _tensors(resumed)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert full_trainer.optimizer is not None and resumed_trainer.optimizer is not None
    assert [g.get("name") for g in full_trainer.optimizer.param_groups] == [
        g.get("name") for g in resumed_trainer.optimizer.param_groups
    ]
    assert torchfreeze.freeze_state(full) == torchfreeze.freeze_state(resumed)


def test_resume_without_the_state_file_is_refused(tmp_path: Path) -> None:
    run(tmp_path / "full")
    (tmp_path / "full" / "checkpoint-4" / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=STATE_FILE):
        run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))


def test_plain_trainer_runs_a_fresh_run_but_refuses_to_resume(tmp_path: Path) -> None:
    model = tiny_bert()
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Rows(), callbacks=[callback()])
    trainer.train()
    assert not torchfreeze.is_frozen(model, "bert.encoder.layer.1") and torchfreeze.is_frozen(model, "bert.embeddings")
    # resuming needs FreezeTrainer: the plain Trainer loads the optimizer state before any callback runs
    again = Trainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=Rows(), callbacks=[callback()])
    with pytest.raises(ValueError, match="parameter groups"):  # torch: the unfrozen groups are missing
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    # where that load happens to fit (nothing was unfrozen yet), the callback refuses with the fix
    args = arguments(tmp_path / "b", save_steps=2)
    Trainer(model=tiny_bert(), args=args, train_dataset=Rows(), callbacks=[callback()]).train()
    late = Trainer(model=tiny_bert(), args=args, train_dataset=Rows(), callbacks=[callback()])
    with pytest.raises(ArgumentError, match="FreezeTrainer"):
        late.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))


class _Tamper(FreezeTrainer):
    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        with torch.no_grad():
            model.get_parameter("bert.embeddings.word_embeddings.weight").add_(1e-3)
        out: torch.Tensor = super().training_step(model, inputs, num_items_in_batch)
        return out


def test_guard_stops_the_run_when_a_frozen_weight_moves(tmp_path: Path) -> None:
    trainer = _Tamper(
        model=tiny_bert(), args=arguments(tmp_path), train_dataset=Rows(), callbacks=[callback(guard=True)]
    )
    with pytest.raises(FrozenTensorChangedError, match="word_embeddings"):
        trainer.train()


def test_missing_trainable_parameters_are_reported(tmp_path: Path) -> None:
    model = tiny_bert()
    head_only = torch.optim.AdamW(model.classifier.parameters(), lr=1e-2)
    cb = callback(schedule=None, freeze=["bert.embeddings"])
    trainer = FreezeTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1),
        train_dataset=Rows(),
        callbacks=[cb],
        optimizers=(head_only, None),
    )
    with pytest.warns(UserWarning, match="trainable-not-in-optimizer"):
        trainer.train()
    (problem,) = [p for p in cb.problems if p.code == "trainable-not-in-optimizer"]
    assert "bert.encoder.layer.0.attention.self.query.weight" in problem.names


def test_epoch_interval_unfreezes_at_the_second_epoch(tmp_path: Path) -> None:
    model = tiny_bert()
    cb = callback(schedule={1: "bert.encoder.layer.1"}, interval="epoch")
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=2, save_strategy="no")
    trainer = FreezeTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[cb])
    trainer.train()
    assert cb.run.unfreezing is not None and cb.run.unfreezing.last == 1
    assert not torchfreeze.is_frozen(model, "bert.encoder.layer.1") and torchfreeze.is_frozen(
        model, "bert.encoder.layer.0"
    )
    assert trainer.optimizer is not None and "unfrozen0" in [g.get("name") for g in trainer.optimizer.param_groups]
