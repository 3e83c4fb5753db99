"""Tests of cache entries: structured outputs through memory and disk, damaged files, class resolution."""

from __future__ import annotations

import collections
import json
import struct
from pathlib import Path

import pytest
import torch
from _cache_models import frozen_mlp
from torch import nn

from torchfreeze.speed import cache_features

Pair = collections.namedtuple("Pair", ["a", "b"])


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        y = self.lin(x)
        if self.kind == "tuple":
            return (y, None, y * 2)
        if self.kind == "dict":
            return {"y": y, "z": y + 1}
        if self.kind == "namedtuple":
            return Pair(y, y - 1)
        return [y]


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple", "list"], ids=lambda k: k)
@pytest.mark.parametrize("granularity", ["sample", "batch"], ids=["per-sample", "per-batch"])
def test_structured_outputs_round_trip(kind: str, granularity: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    inner = Structured(kind).requires_grad_(False).eval()
    x = torch.randn(4, 3)
    cached = cache_features(inner, granularity=granularity, directory=tmp_path)
    assert_same(cached(x), inner(x))
    assert_same(cached(x), inner(x))
    fresh = cache_features(inner, granularity=granularity, directory=tmp_path)
    assert_same(fresh(x), inner(x))
    if kind == "namedtuple":  # a file holds plain tuples/lists/dicts only: kept in memory, counted
        assert fresh.stats().disk_hits == 0 and cached.stats().unstorable > 0
    else:
        assert fresh.stats().disk_hits > 0


def corrupt_flip(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def corrupt_truncate(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


def corrupt_foreign(path: Path, other: Path) -> None:
    path.write_bytes(other.read_bytes())


def corrupt_garbage(path: Path, other: Path) -> None:
    path.write_bytes(b"not a cache entry at all")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(corrupt_flip, id="flipped-byte"),
        pytest.param(corrupt_truncate, id="truncated"),
        pytest.param(corrupt_foreign, id="foreign-entry"),
        pytest.param(corrupt_garbage, id="garbage"),
    ],
)
def test_damaged_disk_entry_is_detected_and_recomputed(tmp_path: Path, damage: object) -> None:
    inner = frozen_mlp()
    x = torch.randn(2, 6)
    cache_features(inner, directory=tmp_path)(x)
    a, b = sorted(tmp_path.glob("*/*.tfc"))
    damage(a, b)  # type: ignore[operator]
    again = cache_features(inner, directory=tmp_path)
    torch.testing.assert_close(again(x), inner(x))
    s = again.stats()
    assert s.corrupt == 1 and s.disk_hits == 1 and s.misses == 1
    third = cache_features(inner, directory=tmp_path)  # the bad entry was rewritten
    third(x)
    assert third.stats().disk_hits == 2 and third.stats().corrupt == 0


def resign(path: Path, secret: bytes, **meta: str) -> None:
    """Rewrite an entry's safetensors metadata and authenticate it with the directory's secret."""
    import safetensors.torch as st

    from torchfreeze.speed import _entry

    payload = path.read_bytes()[:-32]
    (hlen,) = struct.unpack_from("<Q", payload, 0)
    old = json.loads(payload[8 : 8 + hlen])["__metadata__"]
    new = st.save(st.load(payload), metadata={**old, **meta})
    path.write_bytes(new + _entry._mac(secret, new))


@pytest.mark.parametrize(
    "meta",
    [
        pytest.param({"spec": json.dumps(["L", "collections:OrderedDict", [["T", 0]]])}, id="class-path-in-spec"),
        pytest.param({"spec": json.dumps(["T", 5])}, id="tensor-out-of-range"),
        pytest.param({"spec": "{not json"}, id="spec-not-json"),
        pytest.param({"key": "0" * 32}, id="another-key"),
        pytest.param({"format": "tfc-entry-3"}, id="another-format"),
    ],
)
def test_an_authenticated_but_malformed_entry_is_refused_not_used(tmp_path: Path, meta: dict[str, str]) -> None:
    inner = frozen_mlp()
    x = torch.randn(1, 6)
    cache_features(inner, directory=tmp_path)(x)
    (path,) = tmp_path.glob("*/*.tfc")
    resign(path, (tmp_path / ".tfc-secret").read_bytes(), **meta)  # even signed with the secret
    again = cache_features(inner, directory=tmp_path)
    out = again(x)
    assert type(out) is torch.Tensor and again.stats().corrupt == 1 and again.stats().disk_hits == 0
    torch.testing.assert_close(out, inner(x))


def test_an_entry_file_is_safetensors_with_its_key_and_structure_then_an_hmac(tmp_path: Path) -> None:
    import hashlib
    import hmac

    import safetensors.torch as st

    torch.manual_seed(0)
    inner = Structured("dict").requires_grad_(False).eval()
    x = torch.randn(1, 3)
    cache_features(inner, directory=tmp_path)(x)
    (path,) = tmp_path.glob("*/*.tfc")
    raw = path.read_bytes()
    payload, mac = raw[:-32], raw[-32:]
    secret = (tmp_path / ".tfc-secret").read_bytes()
    assert hmac.compare_digest(mac, hmac.new(secret, b"tfc-entry-4\0" + payload, hashlib.sha256).digest())
    (hlen,) = struct.unpack_from("<Q", payload, 0)
    meta = json.loads(payload[8 : 8 + hlen])["__metadata__"]
    assert meta["format"] == "tfc-entry-4" and meta["key"] == path.stem
    assert json.loads(meta["spec"]) == ["D", ["y", "z"], [["T", 0], ["T", 1]]]
    tensors = st.load(payload)
    expected = inner(x)
    torch.testing.assert_close(tensors["0"], expected["y"][0])
    torch.testing.assert_close(tensors["1"], expected["z"][0])


class IntKeys(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {1: x * 2}


def test_dict_output_with_other_keys_is_cached_in_memory_but_not_on_disk(tmp_path: Path) -> None:
    cached = cache_features(IntKeys().eval())
    x = torch.ones(2, 3)
    assert_same(cached(x), {1: x * 2})
    assert_same(cached(x), {1: x * 2})
    assert cached.stats().hits == 2
    on_disk = cache_features(IntKeys().eval(), directory=tmp_path)
    assert_same(on_disk(x), {1: x * 2})  # the output is returned; the file is skipped and counted
    assert on_disk.stats().unstorable == 2 and not list(tmp_path.glob("*/*.tfc"))


def test_a_constant_leaf_of_the_output_comes_back_with_every_row() -> None:
    inner = Structured("tuple").requires_grad_(False).eval()
    cached = cache_features(inner)
    x = torch.randn(4, 3)
    cached(x[:2])
    out = cached(x)
    assert out[1] is None
    assert_same(out, inner(x))
