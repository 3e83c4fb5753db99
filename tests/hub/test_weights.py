"""Weights: sha256 first, safetensors only, every key problem in one error, atomic load."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import torchfreeze
from torchfreeze import Weights
from torchfreeze.errors import ArgumentError, ArgumentTypeError, WeightsError
from torchfreeze.hub.weights import sha256_file

safetensors_torch = pytest.importorskip("safetensors.torch")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Weights:
    safetensors_torch.save_file(tensors, str(path))
    return Weights("w", str(path), sha256_file(path))


@pytest.fixture
def source_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in Small().state_dict().items()}


def test_load_round_trip_keeps_identity_and_flags(tmp_path: Path, source_state: dict) -> None:
    w = write(tmp_path / "ok.safetensors", source_state)
    torch.manual_seed(2)
    model = Small()
    torchfreeze.freeze(model, "lin")
    ids = {n: id(p) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert w.load_into(model) is model
    assert same(snapshot(model), source_state)
    assert ids == {n: id(p) for n, p in model.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_sha256_mismatch_leaves_model_unchanged(tmp_path: Path, source_state: dict) -> None:
    w = write(tmp_path / "ok.safetensors", source_state)
    bad = Weights("w", w.source, "0" * 64)
    model = Small()
    before = snapshot(model)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        bad.load_into(model)
    assert same(snapshot(model), before)


def test_corrupted_file_is_refused_before_parsing(tmp_path: Path, source_state: dict) -> None:
    w = write(tmp_path / "ok.safetensors", source_state)
    data = bytearray(Path(w.source).read_bytes())
    data[-1] ^= 0xFF
    Path(w.source).write_bytes(bytes(data))
    model = Small()
    before = snapshot(model)
    with pytest.raises(WeightsError, match=w.sha256):
        w.load_into(model)
    assert same(snapshot(model), before)


def test_missing_file(tmp_path: Path) -> None:
    w = Weights("gone", str(tmp_path / "nope.safetensors"), "a" * 64)
    model = Small()
    before = snapshot(model)
    with pytest.raises(WeightsError, match="file not found") as info:
        w.load_into(model)
    assert "weights=None" in str(info.value)
    assert same(snapshot(model), before)


def test_pickle_is_never_read(tmp_path: Path, source_state: dict) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(source_state))
    w = Weights("pickled", str(path), sha256_file(path))
    with pytest.raises(WeightsError, match="safetensors"):
        w.load_into(Small())


def _drop(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "lin.bias"}


def _extra(state: dict) -> dict:
    return {**state, "lin.extra": torch.zeros(1)}


def _reshape(state: dict) -> dict:
    return {**state, "lin.weight": torch.zeros(4, 3)}


def _all_three(state: dict) -> dict:
    out = _reshape(_extra(_drop(state)))
    return out


KEY_CASES = [
    pytest.param(_drop, ["missing keys", "lin.bias"], id="missing"),
    pytest.param(_extra, ["unexpected keys", "lin.extra"], id="unexpected"),
    pytest.param(_reshape, ["shape mismatches", "lin.weight", "(4, 3)", "(2, 3)"], id="shape"),
    pytest.param(_all_three, ["missing keys", "unexpected keys", "shape mismatches"], id="all-in-one-error"),
]


@pytest.mark.parametrize(("edit", "fragments"), KEY_CASES)
def test_key_problems_reported_together_and_atomic(
    tmp_path: Path, source_state: dict, edit, fragments: list[str]
) -> None:
    w = write(tmp_path / "bad.safetensors", edit(source_state))
    model = Small()
    before = snapshot(model)
    with pytest.raises(WeightsError) as info:
        w.load_into(model)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "left unchanged" in str(info.value)
    assert same(snapshot(model), before)


def test_non_strict_loads_the_common_keys(tmp_path: Path, source_state: dict) -> None:
    w = write(tmp_path / "part.safetensors", _extra(_drop(source_state)))
    model = Small()
    old_bias = model.lin.bias.detach().clone()
    w.load_into(model, strict=False)
    assert torch.equal(model.lin.weight, source_state["lin.weight"])
    assert torch.equal(model.lin.bias, old_bias)


def test_failure_during_copy_restores_everything(
    tmp_path: Path, source_state: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = write(tmp_path / "ok.safetensors", source_state)
    model = Small()
    before = snapshot(model)
    real = torch.Tensor.copy_
    calls = {"n": 0}

    def flaky(self: torch.Tensor, src: torch.Tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        w.load_into(model)
    monkeypatch.undo()
    assert same(snapshot(model), before)


def test_target_and_ignore_keys(tmp_path: Path) -> None:
    lin = nn.Linear(3, 2)
    path = tmp_path / "lin.safetensors"
    safetensors_torch.save_file({**lin.state_dict(), "legacy.ids": torch.arange(3)}, str(path))
    w = Weights("lin", str(path), sha256_file(path), target="1", ignore_keys=("legacy.ids",))
    model = nn.Sequential(nn.ReLU(), nn.Linear(3, 2))
    w.load_into(model)
    assert torch.equal(model[1].weight, lin.weight)


def test_unknown_target(tmp_path: Path, source_state: dict) -> None:
    w = write(tmp_path / "ok.safetensors", source_state)
    w = Weights("w", w.source, w.sha256, target="nothing.here")
    with pytest.raises(WeightsError, match="target='nothing.here'"):
        w.load_into(Small())


_OK = {"name": "a", "source": "x", "sha256": "0" * 64}

#: bad Weights(...) arguments: (changes to a valid description, class, message pattern). A wrong type is an
#: ArgumentTypeError (TypeError), a wrong value an ArgumentError (ValueError); each names the argument and the fix
INVALID_DESCRIPTIONS = [
    pytest.param({"name": ""}, ArgumentError, r"^Weights\(name=''\): expected a non-empty name", id="empty-name"),
    pytest.param({"name": None}, ArgumentTypeError, r"^Weights\(name=None\): .*got NoneType", id="name-none"),
    pytest.param({"source": ""}, ArgumentError, r"^Weights\(source=''\)", id="empty-source"),
    pytest.param({"source": 5}, ArgumentTypeError, r"^Weights\(source=5\): .*got int", id="source-int"),
    pytest.param({"sha256": "abc"}, ArgumentError, r"^Weights\(sha256='abc'\): expected 64 hex", id="short-sha"),
    pytest.param({"sha256": "z" * 64}, ArgumentError, "64 hex", id="not-hex"),
    pytest.param({"sha256": None}, ArgumentTypeError, r"^Weights\(sha256=None\): .*got NoneType", id="sha-none"),
    pytest.param({"ignore_keys": "pooler.w"}, ArgumentTypeError, r"^Weights\(ignore_keys=", id="ignore-keys-str"),
    pytest.param({"metadata": ["MIT"]}, ArgumentTypeError, r"^Weights\(metadata=\['MIT'\]\)", id="metadata-list"),
    pytest.param({"metadata": 5}, ArgumentTypeError, r"^Weights\(metadata=5\): expected a mapping, got int", id="metadata-int"),
    pytest.param({"target": None}, ArgumentTypeError, r"^Weights\(target=None\)", id="target-none"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "error", "match"), INVALID_DESCRIPTIONS)
def test_invalid_descriptions(changes: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        Weights(**{**_OK, **changes})
    message = str(caught.value)
    assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    assert ". Fix: " in message and len(message) < 300


#: 'package:relative/path' sources that name no package directory: (source, message pattern)
NOT_A_PACKAGE_DIRECTORY = [
    pytest.param("os:x.safetensors", r"'os' is a standard-library module, not a package directory", id="stdlib-module"),
    pytest.param("sys:x.safetensors", r"'sys' is a standard-library module, not a package directory", id="builtin"),
    pytest.param("nonexistentpkg_tf:x.safetensors", r"package 'nonexistentpkg_tf' is not installed.*pip install", id="missing"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "match"), NOT_A_PACKAGE_DIRECTORY)
def test_package_source_that_is_no_package_directory(source: str, match: str) -> None:
    weights = Weights("w", source, "0" * 64)
    with pytest.raises(WeightsError, match=match) as caught:
        _ = weights.path
    assert "Fix: " in str(caught.value)
    if "standard-library" in match:
        assert "pip install" not in str(caught.value)


def test_load_into_rejects_non_module(tmp_path: Path, source_state: dict) -> None:
    w = write(tmp_path / "ok.safetensors", source_state)
    with pytest.raises(
        torchfreeze.errors.ArgumentTypeError, match=r"(?s)^Weights.load_into\(module=\{.*expected a torch.nn.Module"
    ):
        w.load_into(source_state)  # type: ignore[arg-type]


def test_package_source_resolves_inside_installed_package() -> None:
    w = Weights("d", "torchfreeze:hub/weights/digits_cnn.safetensors", "0" * 64)
    assert w.path.is_file()
    assert w.path.parent.name == "weights"


def test_package_source_of_missing_package() -> None:
    w = Weights("d", "no_such_pkg_xyz:model.safetensors", "0" * 64)
    with pytest.raises(WeightsError, match="not installed"):
        w.state_dict()


def test_local_paths_are_not_mistaken_for_packages(tmp_path: Path) -> None:
    assert Weights("d", "C:/models/x.safetensors", "0" * 64).path == Path("C:/models/x.safetensors")
    assert Weights("d", str(tmp_path / "a.safetensors"), "0" * 64).path == tmp_path / "a.safetensors"


def test_builtin_digits_weights_match_their_description() -> None:
    w = Weights.from_json("torchfreeze:hub/weights/digits_cnn.json")
    assert w.path.stat().st_size < 1_000_000
    assert hashlib.sha256(w.path.read_bytes()).hexdigest() == w.sha256
    assert w.metadata["pretrain_classes"] == [0, 1, 2, 3, 4]
    assert {"license", "origin", "input", "parameters"} <= set(w.metadata)
    tensors = w.state_dict()
    assert (
        sum(v.numel() for k, v in tensors.items() if "running" not in k and "num_batches" not in k)
        == w.metadata["parameters"]
    )


def test_from_json_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="cannot read"):
        Weights.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(WeightsError, match="expected keys"):
        Weights.from_json(bad)


def test_metadata_is_read_only() -> None:
    w = Weights("m", "x.safetensors", "0" * 64, {"license": "MIT"})
    with pytest.raises(TypeError):
        w.metadata["license"] = "other"  # type: ignore[index]
