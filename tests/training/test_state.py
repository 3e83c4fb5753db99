"""freeze_state / load_freeze_state: what is frozen and pinned, as a JSON-able dict, and back."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
import torch
from _state_models import SETUPS, Model, Other
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _helpers import requires_grad_map, training_map
from torchfreeze import (
    Frozen,
    freeze,
    freeze_batchnorm,
    freeze_state,
    load_freeze_state,
    pin_mode,
    pinned_modes,
    unfreeze,
)
from torchfreeze.errors import ArgumentTypeError, FreezeStateError


@pytest.mark.parametrize("setup", list(SETUPS), ids=list(SETUPS))
def test_freeze_state_round_trips_through_json_onto_a_fresh_model(setup: Any) -> None:
    model = SETUPS[setup](Model())
    state = json.loads(json.dumps(freeze_state(model)))
    assert state["format"] == "torchfreeze.freeze_state" and state["version"] == 1
    assert state["frozen_uses"] == ["proj"]
    fresh = Model(seed=1)
    load_freeze_state(fresh, state)
    assert requires_grad_map(fresh) == requires_grad_map(model)
    assert pinned_modes(fresh) == pinned_modes(model)
    assert freeze_state(fresh) == freeze_state(model)
    fresh.train()
    model.train()
    assert training_map(fresh) == training_map(model)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]


def test_pin_origins_survive_so_unfreeze_behaves_the_same_after_resume() -> None:
    model = pin_mode(freeze(Model(), "backbone", mode="eval"), "drop", mode="eval")
    fresh = load_freeze_state(Model(), freeze_state(model))
    for m in (model, fresh):
        unfreeze(m, "backbone")
    assert pinned_modes(fresh) == pinned_modes(model) == {"drop": "eval"}


def test_load_freeze_state_replaces_existing_state_exactly() -> None:
    target = pin_mode(freeze(Model(), "head"), "backbone", mode="train")
    source = freeze(Model(), "backbone.0")
    load_freeze_state(target, freeze_state(source))
    assert requires_grad_map(target) == requires_grad_map(source)
    assert pinned_modes(target) == {}


def test_tied_parameter_is_one_entry() -> None:
    lin = nn.Linear(2, 2)
    model = freeze(nn.Sequential(lin, nn.ReLU(), lin), shared="freeze")
    state = freeze_state(model)
    assert state["frozen"] == ["0.weight", "0.bias"]
    fresh_lin = nn.Linear(2, 2)
    fresh = load_freeze_state(nn.Sequential(fresh_lin, nn.ReLU(), fresh_lin), state)
    assert not fresh_lin.weight.requires_grad


def test_mismatch_lists_every_problem_and_changes_nothing() -> None:
    state = freeze_state(freeze(Model(), "backbone", mode="eval"))
    other = freeze(Other(), "encoder")
    before = (requires_grad_map(other), pinned_modes(other), training_map(other))
    with pytest.raises(FreezeStateError) as info:
        load_freeze_state(other, state)
    message = str(info.value)
    for name in ("backbone.0.weight", "backbone.3.bias", "'proj'", "backbone.1"):
        assert name in message
    assert "nothing was changed" in message
    assert (requires_grad_map(other), pinned_modes(other), training_map(other)) == before


def test_missing_frozen_use_is_a_mismatch() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    state = freeze_state(nn.Sequential(nn.Linear(2, 2), Frozen(nn.Linear(2, 2))))
    with pytest.raises(FreezeStateError, match="Frozen use '1'"):
        load_freeze_state(model, state)


def test_non_strict_applies_what_fits_with_a_warning() -> None:
    state = freeze_state(freeze(Model(), "backbone"))
    state["frozen"].append("no.such.weight")
    model = Model()
    with pytest.warns(UserWarning, match="no.such.weight"):
        load_freeze_state(model, state, strict=False)
    assert not model.backbone[0].weight.requires_grad and model.head.weight.requires_grad


def test_non_strict_skips_a_converted_norm_that_is_not_a_batchnorm() -> None:
    state = freeze_state(freeze_batchnorm(freeze(Model(), "backbone.0"), "backbone", convert=True))
    state["converted_norms"].append("head")
    model = Model()
    with pytest.warns(UserWarning, match="'head' is a Linear"):
        load_freeze_state(model, state, strict=False)
    assert type(model.backbone[1]).__name__ == "FrozenBatchNorm1d" and type(model.head) is nn.Linear


def _edit(**changes: Any) -> dict[str, Any]:
    state = freeze_state(freeze(Model(), "backbone"))
    state.update(changes)
    return state


@pytest.mark.parametrize(
    "state, match",
    [
        pytest.param(_edit(format="other"), "format", id="wrong-format"),
        pytest.param(_edit(version=2), "newer", id="newer-version"),
        pytest.param(_edit(version="1"), "version", id="version-str"),
        pytest.param(_edit(frozen="backbone"), "frozen", id="frozen-not-list"),
        pytest.param(_edit(pins={"head": "sleep"}), "pins", id="bad-pin-mode"),
        pytest.param(_edit(converted_norms=["head"]), "not a BatchNorm", id="convert-non-bn"),
        pytest.param(_edit(pin_origins={"backbone": "anything"}), "pin_origins", id="pin-origin-unknown"),
        pytest.param(_edit(parameters={"head.weight": "big"}), "parameters", id="shapes-not-lists"),
        pytest.param(_edit(parameters={"head.weight": [-1]}), "parameters", id="negative-shape"),
    ],
)
def test_malformed_state_raises_and_changes_nothing(state: Any, match: str) -> None:
    model = Model()
    before = requires_grad_map(model)
    with pytest.raises(FreezeStateError, match=match) as caught:
        load_freeze_state(model, state)
    message = str(caught.value)
    assert message.startswith("load_freeze_state(state=...): the state") and "Fix: " in message
    assert isinstance(caught.value, ValueError) and not isinstance(caught.value, TypeError)
    assert requires_grad_map(model) == before


#: a state that is not a mapping at all: a wrong type (TypeError), whatever its value
STATE_OF_THE_WRONG_TYPE = [
    pytest.param(None, "NoneType", id="none"),
    pytest.param([], "list", id="list"),
    pytest.param("freeze.json", "str", id="path"),
    pytest.param(1, "int", id="int"),
]


@pytest.mark.parametrize(("state", "kind"), STATE_OF_THE_WRONG_TYPE)
def test_state_of_the_wrong_type_is_an_argument_type_error(state: Any, kind: str) -> None:
    model = freeze(Model(), "backbone", mode="eval")
    before = requires_grad_map(model), training_map(model), pinned_modes(model)
    with pytest.raises(ArgumentTypeError) as caught:
        load_freeze_state(model, state)
    message = str(caught.value)
    assert isinstance(caught.value, TypeError) and not isinstance(caught.value, ValueError)
    assert message.startswith(f"load_freeze_state(state={state!r}): expected the dict returned by")
    assert f"got {kind}. Fix: " in message
    assert (requires_grad_map(model), training_map(model), pinned_modes(model)) == before


# ------------------------------------------------------------------ invariants

_PARTS = ["backbone.0", "backbone.1", "backbone.3", "head"]


@settings(max_examples=40, deadline=None)
@given(
    frozen=st.lists(st.sampled_from(_PARTS), unique=True),
    pinned=st.dictionaries(
        st.sampled_from(["backbone", "backbone.1", "drop", "head"]), st.sampled_from(["train", "eval"])
    ),
    freeze_mode=st.sampled_from([None, "eval", "train"]),
)
def test_freeze_state_round_trip_invariant(
    frozen: list[str], pinned: dict[str, Literal["train", "eval"]], freeze_mode: Literal["train", "eval"] | None
) -> None:
    model = Model()
    if frozen:
        freeze(model, *frozen, mode=freeze_mode)
    for name, mode in pinned.items():
        pin_mode(model, name, mode=mode)
    state = json.loads(json.dumps(freeze_state(model)))
    fresh = pin_mode(freeze(Model(seed=3), "head", mode="eval"), "drop", mode="train")  # some other state
    load_freeze_state(fresh, state)
    assert freeze_state(fresh) == state
    assert requires_grad_map(fresh) == requires_grad_map(model)
    model.train()
    fresh.train()
    assert training_map(fresh) == training_map(model)
    unfreeze(model)
    unfreeze(fresh)
    assert freeze_state(fresh) == freeze_state(model)  # origins restored: unfreeze acts the same


# ------------------------------------------------------------------ arguments and lazy modules


@pytest.mark.parametrize("verb", [freeze_state, lambda m: load_freeze_state(m, {})], ids=["freeze_state", "load"])
def test_non_module_model_is_a_type_error(verb: Any) -> None:
    with pytest.raises(ArgumentTypeError, match="expected a torch.nn.Module"):
        verb({"w": torch.zeros(1)})


def test_strict_must_be_a_bool() -> None:
    model = Model()
    with pytest.raises(ArgumentTypeError, match="strict"):
        load_freeze_state(model, freeze_state(model), strict="no")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="strict"):
        load_freeze_state(model, freeze_state(model), strict=None)  # type: ignore[arg-type]


def test_lazy_model_takes_the_state_and_keeps_it_after_materialising() -> None:
    state = freeze_state(freeze(nn.Sequential(nn.LazyLinear(2))))
    fresh = nn.Sequential(nn.LazyLinear(2))
    load_freeze_state(fresh, state)
    assert requires_grad_map(fresh) == {"0.weight": False, "0.bias": False}
    fresh(torch.ones(1, 3))  # materialises the parameters
    assert fresh[0].weight.shape == (2, 3)
    assert requires_grad_map(fresh) == {"0.weight": False, "0.bias": False}
    after = freeze_state(fresh)
    assert state["parameters"] == {"0.weight": None, "0.bias": None}  # lazy: shape not known yet
    assert after.pop("parameters") == {"0.weight": [2, 3], "0.bias": [2]}
    assert after == {k: v for k, v in state.items() if k != "parameters"}


# ------------------------------------------------------------------ shapes and extra parameters (issue 10, item 5)


def _shape_state() -> dict[str, Any]:
    return freeze_state(freeze(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), "0"))


def _narrow_plus_extra() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), nn.Linear(16, 2))
    model.extra = nn.Linear(2, 2)
    return model


def test_strict_refuses_other_shapes_and_extra_parameters_listing_each() -> None:
    model = _narrow_plus_extra()
    before = requires_grad_map(model)
    with pytest.raises(FreezeStateError) as info:
        load_freeze_state(model, _shape_state())
    message = str(info.value)
    assert "'0.weight' has shape (3, 8)" in message and "'0.bias' has shape (3,)" in message
    assert "'extra.weight' that the state never saw" in message
    assert requires_grad_map(model) == before


def test_non_strict_loads_what_matches_and_names_what_it_skipped() -> None:
    model = _narrow_plus_extra()
    model.extra.weight.requires_grad_(False)  # skipped parameters keep their own flag
    with pytest.warns(UserWarning, match="extra.weight") as record:
        load_freeze_state(model, _shape_state(), strict=False)
    assert "'0.weight' has shape" in str(record[0].message)
    assert requires_grad_map(model) == {
        "0.weight": True,  # another shape: skipped, left as it was
        "0.bias": True,
        "2.weight": True,
        "2.bias": True,
        "extra.weight": False,
        "extra.bias": True,
    }


def test_state_without_recorded_shapes_still_loads() -> None:
    state = _shape_state()
    del state["parameters"]  # written by an older torchfreeze
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    load_freeze_state(model, state)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


# ------------------------------------------------------------------ validate first, then change (issue 11, item 14)


def test_pin_on_the_second_path_of_a_shared_module_is_applied() -> None:
    shared = nn.Dropout(0.1)
    model = nn.Sequential(nn.Linear(2, 2), shared, nn.Sequential(shared))
    state = freeze_state(model)
    state["pins"] = {"2.0": "train"}
    state["pin_origins"] = {"2.0": "user"}
    model.eval()
    load_freeze_state(model, state)
    assert pinned_modes(model) == {"1": "train"} and shared.training


def test_converted_norm_naming_a_lazy_batchnorm_is_refused_before_anything_changes() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LazyBatchNorm1d(), nn.BatchNorm1d(2))
    freeze_batchnorm(model, "2", convert=True)
    state = freeze_state(model)
    state["converted_norms"] = ["1"]
    del state["parameters"]
    with pytest.raises(FreezeStateError, match="'1' is not initialised yet"):
        load_freeze_state(model, state)
    assert type(model[2]).__name__ == "FrozenBatchNorm1d"  # not swapped back
