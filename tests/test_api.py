"""The public surface as a whole: every verb that takes a model rejects a non-module the same way; a light import.

The case table names every public callable of ``torchfreeze.__all__`` that takes
a model (or module) first; a new public callable must be added to it (or to
``NOT_MODEL_FIRST``), or ``test_every_public_callable_is_in_the_table`` fails.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchfreeze as tf
from torchfreeze.errors import ArgumentTypeError

NOT_A_MODULE: Any = [1, 2]


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)


# (public name, the call with NOT_A_MODULE in the model's place, the argument's name in the message)
CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("select", lambda: tf.select(NOT_A_MODULE, "0"), "model"),
    ("freeze", lambda: tf.freeze(NOT_A_MODULE), "model"),
    ("unfreeze", lambda: tf.unfreeze(NOT_A_MODULE), "model"),
    ("freeze_to", lambda: tf.freeze_to(NOT_A_MODULE, 1), "model"),
    ("layer_groups", lambda: tf.layer_groups(NOT_A_MODULE), "model"),
    ("is_frozen", lambda: tf.is_frozen(NOT_A_MODULE), "model"),
    ("trainable_parameters", lambda: tf.trainable_parameters(NOT_A_MODULE), "model"),  # at the call, not next()
    ("frozen_parameters", lambda: tf.frozen_parameters(NOT_A_MODULE), "model"),
    ("Frozen", lambda: tf.Frozen(NOT_A_MODULE), "module"),
    ("prepare_for_distributed", lambda: tf.prepare_for_distributed(NOT_A_MODULE), "model"),
    ("pin_mode", lambda: tf.pin_mode(NOT_A_MODULE), "model"),
    ("unpin_mode", lambda: tf.unpin_mode(NOT_A_MODULE), "model"),
    ("pinned_modes", lambda: tf.pinned_modes(NOT_A_MODULE), "model"),
    ("eval_mode", lambda: tf.eval_mode(NOT_A_MODULE), "model"),  # at the call, not at ``with``
    ("train_mode", lambda: tf.train_mode(NOT_A_MODULE), "model"),
    ("freeze_batchnorm", lambda: tf.freeze_batchnorm(NOT_A_MODULE), "model"),
    ("fold_batchnorm", lambda: tf.fold_batchnorm(NOT_A_MODULE), "model"),
    ("unfold_batchnorm", lambda: tf.unfold_batchnorm(NOT_A_MODULE), "model"),
    ("folded_batchnorms", lambda: tf.folded_batchnorms(NOT_A_MODULE), "model"),
    ("foldable_pairs", lambda: tf.foldable_pairs(NOT_A_MODULE), "model"),
    ("param_groups", lambda: tf.param_groups(NOT_A_MODULE, 0.1), "model"),
    ("add_unfrozen", lambda: tf.add_unfrozen(NOT_A_MODULE, _optimizer()), "model"),
    ("GradualUnfreezing", lambda: tf.GradualUnfreezing(NOT_A_MODULE, _optimizer(), {1: -1}), "model"),
    ("ProgressiveFreezing", lambda: tf.ProgressiveFreezing(NOT_A_MODULE, _optimizer(), {1: 1}), "model"),
    ("guard", lambda: tf.guard(NOT_A_MODULE), "model"),
    ("check", lambda: tf.check(NOT_A_MODULE), "model"),
    ("freeze_state", lambda: tf.freeze_state(NOT_A_MODULE), "model"),
    ("load_freeze_state", lambda: tf.load_freeze_state(NOT_A_MODULE, {}), "model"),
    ("save_trainable", lambda: tf.save_trainable(NOT_A_MODULE, "never-written.safetensors"), "model"),
    ("load_trainable", lambda: tf.load_trainable(NOT_A_MODULE, "never-read.safetensors"), "model"),
    ("summary", lambda: tf.summary(NOT_A_MODULE), "model"),
    ("explain", lambda: tf.explain(NOT_A_MODULE, torch.zeros(1, 1)), "model"),
    ("cache_features", lambda: tf.cache_features(NOT_A_MODULE), "module"),
    ("cache_frozen_prefix", lambda: tf.cache_frozen_prefix(NOT_A_MODULE), "model"),
    ("precompute_features", lambda: tf.precompute_features(NOT_A_MODULE, [torch.zeros(1)]), "backbone"),
    ("Composite", lambda: tf.Composite(NOT_A_MODULE, torch.nn.Linear(1, 1)), "backbone"),
    ("store_frozen_backbone", lambda: tf.store_frozen_backbone(NOT_A_MODULE, torch.bfloat16), "model"),
]

# Public callables that do not take a model first.
NOT_MODEL_FIRST = {
    "Selector",  # a type alias
    "FrozenBatchNorm1d",  # built from num_features (or from_batchnorm)
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "get_model",  # a registered name
    "list_models",
    "register_model",
    "Weights",  # a file description
}


def test_every_public_callable_is_in_the_table() -> None:
    public = {name for name in tf.__all__ if callable(getattr(tf, name))}
    in_table = {name for name, _, _ in CASES}
    assert len(in_table) == len(CASES), "a name appears twice in CASES"
    assert not public - in_table - NOT_MODEL_FIRST, "add these public callables to CASES or NOT_MODEL_FIRST"
    assert not (in_table | NOT_MODEL_FIRST) - public, "the table names callables that are no longer public"


@pytest.mark.parametrize(("name", "call", "argument"), CASES, ids=[c[0] for c in CASES])
def test_a_non_module_raises_the_standard_error(
    name: str, call: Callable[[], Any], argument: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a verb that wrongly wrote a file would write it here
    with pytest.raises(ArgumentTypeError) as info:
        call()
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert message.startswith(f"{name}({argument}=[1, 2])"), message
    assert "expected a torch.nn.Module" in message, message
    assert list(tmp_path.iterdir()) == []


def test_import_torchfreeze_stays_light() -> None:
    heavy = ("transformers", "sklearn", "rich", "safetensors", "torchfreeze.cli", "torchfreeze.hub.builtin")
    code = (
        "import sys, torchfreeze\n"
        f"heavy = {heavy!r}\n"
        "print(*sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split() == []
