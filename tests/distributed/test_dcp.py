"""save_distributed / load_distributed: a DCP resume after a mid-run unfreeze is bit-identical (world of one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _models import Blocks, batch
from torch import nn

import torchfreeze
from torchfreeze.distributed import load_distributed, save_distributed, wrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CheckpointError

Run = tuple[nn.Module, torch.optim.Optimizer, torchfreeze.GradualUnfreezing, Any]


def _build() -> Run:
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.1))
    lr = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    sched = torchfreeze.GradualUnfreezing(model, opt, {2: "blocks.3", 4: "blocks.2"}, scheduler=lr)
    return model, opt, sched, lr


def _train(run: Run, steps: range, forward: Any = None) -> None:
    model, opt, sched, lr = run
    for step in steps:
        x, y = batch(0, step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy((forward or model)(x), y).backward()
        opt.step()
        sched.step()
        lr.step()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ignore_frozen", [False, True], ids=["all-params", "ignore-frozen-params"])
def test_resume_after_mid_run_unfreeze_is_bit_identical(
    world_of_one: None, tmp_path: Path, ignore_frozen: bool
) -> None:
    whole = _build()
    _train(whole, range(8))
    first = _build()
    _train(first, range(5))
    save_distributed(
        tmp_path / "ckpt", first[0], first[1], schedule=first[2], scheduler=first[3], ignore_frozen_params=ignore_frozen
    )
    saved = set(dcp.FileSystemReader(tmp_path / "ckpt").read_metadata().state_dict_metadata)
    assert ("model.stem.weight" in saved) is not ignore_frozen and "model.blocks.3.0.weight" in saved
    resumed = _build()  # a fresh process: blocks.2/3 frozen again, no added optimizer groups
    load_distributed(tmp_path / "ckpt", resumed[0], resumed[1], schedule=resumed[2], scheduler=resumed[3])
    assert torchfreeze.freeze_state(resumed[0]) == torchfreeze.freeze_state(first[0])
    assert len(resumed[1].param_groups) == len(first[1].param_groups)
    _train(resumed, range(5, 8))
    expected, got = _weights(whole[0]), _weights(resumed[0])
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert resumed[3].get_last_lr() == whole[3].get_last_lr()


def test_resume_under_a_wrap_handle_rewraps(world_of_one: None, tmp_path: Path) -> None:
    first = _build()
    handle = wrap(first[0])
    _train(first, range(3), handle)
    save_distributed(tmp_path / "ckpt", handle.ddp, first[1], schedule=first[2], scheduler=first[3])  # type: ignore[arg-type]
    handle.release()
    resumed = _build()
    again = wrap(resumed[0])
    load_distributed(tmp_path / "ckpt", resumed[0], resumed[1], schedule=resumed[2], scheduler=resumed[3])
    assert again.rewraps == 1  # blocks.3 unfrozen by the restored state: DDP re-built
    assert again.reduced_names() == [n for n, _ in torchfreeze.trainable_parameters(resumed[0])]
    again.release()


def test_load_argument_and_file_errors(world_of_one: None, tmp_path: Path) -> None:
    run = _build()
    save_distributed(tmp_path / "ckpt", run[0], run[1], schedule=run[2])
    fresh = _build()
    before = torchfreeze.freeze_state(fresh[0])
    with pytest.raises(ArgumentError, match="scheduler"):
        load_distributed(tmp_path / "ckpt", fresh[0], fresh[1], schedule=fresh[2], scheduler=fresh[3])
    with pytest.raises(ArgumentError, match="schedule"):
        load_distributed(tmp_path / "ckpt", fresh[0], fresh[1])
    with pytest.raises(ArgumentTypeError, match="optimizer"):
        load_distributed(tmp_path / "ckpt", fresh[0], "adam")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="schedule"):
        save_distributed(tmp_path / "x", fresh[0], fresh[1], schedule=3)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="DCP"):
        load_distributed(tmp_path / "missing", fresh[0], fresh[1], schedule=fresh[2])
    assert torchfreeze.freeze_state(fresh[0]) == before


def test_needs_a_process_group(tmp_path: Path) -> None:
    run = _build()
    with pytest.raises(ArgumentError, match="init_process_group"):
        save_distributed(tmp_path / "ckpt", run[0], run[1])
