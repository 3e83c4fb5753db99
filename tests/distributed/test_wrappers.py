"""Wrappers are transparent: every verb sees the inner model's canonical names through DDP / compile / DP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _models import Blocks
from safetensors.torch import load_file
from torch import nn

import torchfreeze
from torchfreeze._core.wrappers import live_ddp, local_tensor, unwrap
from torchfreeze.distributed import release


def _ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "ddp": _ddp,
    "compile": lambda m: torch.compile(m),  # type: ignore[no-any-return]
    "data-parallel": nn.DataParallel,
    "compile-of-ddp": lambda m: torch.compile(_ddp(m)),  # type: ignore[no-any-return]
    "ddp-of-compile": lambda m: _ddp(torch.compile(m)),  # type: ignore[arg-type]
}


def _freeze(model: nn.Module) -> nn.Module:
    torchfreeze.freeze(model, "blocks.0", "blocks.1", mode="eval")
    return model


def _views(handle: nn.Module, tmp: Path, tag: str) -> dict[str, object]:
    """What the verbs report for ``handle`` (a wrapper of the model, or the model itself)."""
    torchfreeze.pin_mode(handle, "blocks.2.1", mode="train")
    torchfreeze.save_trainable(handle, tmp / f"{tag}.safetensors")
    return {
        "select": torchfreeze.select(handle, "blocks.*.0"),
        "freeze_state": torchfreeze.freeze_state(handle),
        "summary": str(torchfreeze.summary(handle)),
        "trainable": [n for n, _ in torchfreeze.trainable_parameters(handle)],
        "frozen": [n for n, _ in torchfreeze.frozen_parameters(handle)],
        "pinned": torchfreeze.pinned_modes(handle),
        "is_frozen": torchfreeze.is_frozen(handle, "blocks.1"),
        "layer_groups": torchfreeze.layer_groups(handle),
        "groups": [[id(p) for p in g["params"]] for g in torchfreeze.param_groups(handle, 0.1)],
        "checkpoint": sorted(load_file(str(tmp / f"{tag}.safetensors"))),
    }


@pytest.mark.parametrize("kind", list(WRAPPERS), ids=list(WRAPPERS))
def test_every_verb_sees_canonical_names_through_the_wrapper(kind: str, world_of_one: None, tmp_path: Path) -> None:
    expected = _views(_freeze(Blocks()), tmp_path, "plain")
    model = Blocks()
    if "ddp" in kind:  # freeze before wrapping (a change under a live DDP is refused: test_ddp.py)
        wrapped = WRAPPERS[kind](_freeze(model))
    else:  # selectors given to the wrapper use canonical names
        wrapped = _freeze(WRAPPERS[kind](model))
    got = _views(wrapped, tmp_path, kind)
    # param_groups hold the wrapped model's own parameters, in the same layout
    assert [len(g) for g in got.pop("groups")] == [len(g) for g in expected.pop("groups")]  # type: ignore[attr-defined]
    assert got == expected
    assert unwrap(wrapped) is model
    assert not any(n.startswith(("module.", "_orig_mod.")) for n in got["trainable"])  # type: ignore[attr-defined]
    for ddp in live_ddp(model):
        release(ddp)


def test_checkpoint_saved_through_a_wrapper_loads_into_the_plain_model(world_of_one: None, tmp_path: Path) -> None:
    model = torchfreeze.freeze(Blocks(), "stem", "blocks")
    ddp = _ddp(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    torchfreeze.save_trainable(ddp, tmp_path / "head.safetensors")
    fresh = torchfreeze.load_trainable(Blocks(), tmp_path / "head.safetensors")
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert torchfreeze.freeze_state(fresh) == torchfreeze.freeze_state(ddp)
    release(ddp)


def test_selector_with_the_wrapper_prefix_is_refused_with_canonical_suggestions(world_of_one: None) -> None:
    model = Blocks()
    ddp = _ddp(model)
    with pytest.raises(torchfreeze.errors.SelectorError, match="'blocks.0'"):
        torchfreeze.freeze(ddp, "module.blocks.0")
    assert all(p.requires_grad for p in model.parameters())
    release(ddp)


def test_unwrap_of_a_plain_module_and_local_tensor_of_a_plain_tensor() -> None:
    lin = nn.Linear(2, 2)
    assert unwrap(lin) is lin
    assert local_tensor(lin.weight) is lin.weight
