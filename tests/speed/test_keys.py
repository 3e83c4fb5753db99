"""Tests of the cache keys: content of the inputs, the module fingerprint, and change detection."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from _cache_models import frozen_mlp
from torch import nn

import torchfreeze as tf
from torchfreeze.speed import cache_features, module_fingerprint
from torchfreeze.speed.keys import HAVE_XXHASH, row_keys_fast


def test_augmented_input_misses() -> None:
    cached = cache_features(frozen_mlp())
    x = torch.randn(4, 6)
    cached(x)
    cached(x + 1e-3)
    assert cached.stats().hits == 0 and cached.stats().misses == 8


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda x: x.double(), id="dtype"),
        pytest.param(lambda x: x.view(torch.int32), id="same-bytes-other-dtype"),
        pytest.param(lambda x: x.reshape(4, 2, 3), id="shape"),
    ],
)
def test_dtype_and_shape_are_part_of_the_key(change: object) -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], -1).float() * 2

    cached = cache_features(Flat().eval())
    x = torch.randn(4, 6)
    cached(x)
    cached(change(x))  # type: ignore[operator]
    assert cached.stats().hits == 0


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_changed_weights_change_the_key(on_disk: bool, tmp_path: Path) -> None:
    inner = frozen_mlp()
    cached = cache_features(inner, directory=tmp_path if on_disk else None)
    x = torch.randn(3, 6)
    before = cached(x)
    with torch.no_grad():
        inner[3].bias.add_(1.0)
    after = cached(x)
    torch.testing.assert_close(after, before + 1.0)
    assert cached.stats().hits == 0


def _swap_activation(m: nn.Module) -> None:
    m[1] = nn.Tanh().eval()  # no parameters, same mode: only the structure changes


def _new_parameter(m: nn.Module) -> None:
    m[3].bias = nn.Parameter(m[3].bias.detach() + 1.0, requires_grad=False)


def _reassign_data(m: nn.Module) -> None:
    m[3].bias.data = m[3].bias.detach() + 1.0


def _load_state_dict(m: nn.Module) -> None:
    m.load_state_dict(frozen_mlp(seed=1).state_dict())


@pytest.mark.parametrize(
    "change",
    [_swap_activation, _new_parameter, _reassign_data, _load_state_dict],
    ids=["swapped-parameterless-layer", "new-parameter-object", "data-reassigned", "load_state_dict"],
)
@pytest.mark.parametrize("granularity", ["sample", "batch"], ids=["per-sample", "per-batch"])
def test_module_changed_after_wrapping_never_returns_a_stale_entry(change: object, granularity: str) -> None:
    inner = frozen_mlp()
    cached = cache_features(inner, granularity=granularity)
    x = torch.randn(4, 6)
    before = cached(x)
    change(inner)  # type: ignore[operator]
    expected = inner(x)
    assert not torch.allclose(expected, before)
    torch.testing.assert_close(cached(x), expected)
    torch.testing.assert_close(cached(x), expected)  # and the new entry is served from then on
    assert cached.stats().hits == (x.shape[0] if granularity == "sample" else 1)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.rows = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.lin(x) * mask.unsqueeze(-1)


def test_rows_key_on_every_input_and_repeated_rows_share_an_entry() -> None:
    torch.manual_seed(0)
    inner = TwoInputs().requires_grad_(False).eval()
    cached = cache_features(inner)
    x = torch.randn(3, 3)
    x = torch.cat([x, x[:1]])  # row 3 repeats row 0
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # ...but with another mask: a different entry
    out = cached(x, mask)
    torch.testing.assert_close(out, inner.lin(x) * mask.unsqueeze(-1))
    assert cached.stats().entries == 4
    again = cached(x[[2, 0, 0]], mask[[2, 0, 0]])
    torch.testing.assert_close(again, out[[2, 0, 0]])
    assert inner.rows == 4 and cached.stats().hits == 3


class KeyTyped(nn.Module):
    def forward(self, x: torch.Tensor, opts: dict) -> torch.Tensor:
        return x + (1.0 if 1 in opts else 2.0)


def test_dict_keys_of_different_types_are_different_keys() -> None:
    cached = cache_features(KeyTyped().eval())
    x = torch.zeros(2, 3)
    torch.testing.assert_close(cached(x, {1: None}), x + 1.0)
    torch.testing.assert_close(cached(x, {"1": None}), x + 2.0)


def test_unhashable_argument_is_named() -> None:
    class TakesObj(nn.Module):
        def forward(self, x: torch.Tensor, obj: object) -> torch.Tensor:
            return x

    with pytest.raises(tf.errors.ArgumentError, match="cannot be hashed"):
        cache_features(TakesObj())(torch.randn(2, 2), object())


def test_fingerprint_tracks_weights_and_mode() -> None:
    a, b = frozen_mlp(0), frozen_mlp(0)
    assert module_fingerprint(a) == module_fingerprint(b)
    assert module_fingerprint(a) != module_fingerprint(frozen_mlp(1))
    b[0].train()
    assert module_fingerprint(a) != module_fingerprint(b)
    assert module_fingerprint(a) != module_fingerprint(a, salt="v2")


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def forward(self, batch: object, scale: float = 1.0) -> torch.Tensor:
        x = batch["x"]  # type: ignore[index]
        self.rows += x.shape[0]
        return x * scale


def test_constants_in_the_inputs_are_part_of_the_key() -> None:
    inner = Scaled().eval()
    cached = cache_features(inner)
    x = torch.randn(3, 2)
    torch.testing.assert_close(cached({"x": x}, scale=2.0), x * 2.0)
    torch.testing.assert_close(cached({"x": x}, scale=3.0), x * 3.0)
    torch.testing.assert_close(cached({"x": x}, scale=2.0), x * 2.0)
    assert inner.rows == 6 and cached.stats().hits == 3


def test_a_mapping_pytree_does_not_know_is_hashed_and_split_into_rows() -> None:
    inner = Scaled().eval()
    cached = cache_features(inner)
    x = torch.randn(4, 2)
    cached(collections.UserDict({"x": x[:2]}))
    out = cached(collections.UserDict({"x": x}))  # rows 0-1 hit, rows 2-3 are computed alone
    torch.testing.assert_close(out, x)
    assert inner.rows == 4 and cached.stats().hits == 2


# --------------------------------------------------------------------------- row_keys_fast

METHODS = [
    pytest.param("torch", id="torch-hash"),
    pytest.param("sha256", id="sha256"),
    pytest.param(
        "xxhash",
        id="xxhash",
        marks=pytest.mark.skipif(not HAVE_XXHASH, reason="the optional xxhash package is not installed"),
    ),
]


@pytest.mark.parametrize("method", METHODS)
def test_row_keys_are_content_keys_wherever_the_row_sits(method: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    keys = row_keys_fast([x], 6, salt=b"s", method=method)
    assert len(set(keys)) == 6 and all(len(k) == 16 for k in keys)
    perm = [4, 2, 0]
    assert row_keys_fast([x[perm]], 3, salt=b"s", method=method) == [keys[i] for i in perm]  # other batch, size
    assert row_keys_fast([x[3:4].clone()], 1, salt=b"s", method=method) == [keys[3]]
    assert row_keys_fast([x], 6, salt=b"t", method=method)[0] != keys[0]  # the salt is part of the key


@pytest.mark.parametrize("method", METHODS)
def test_rows_differing_in_one_bit_or_one_position_differ(method: str) -> None:
    base = torch.zeros(1, 16, dtype=torch.int64)
    rows = [base.clone() for _ in range(18)]
    for i in range(16):
        rows[i][0, i] = 1  # a single 1 in each position
    rows[16][0, 0] = 2
    batch = torch.cat(rows)  # plus the all-zero row 17
    keys = row_keys_fast([batch], 18, salt=b"", method=method)
    assert len(set(keys)) == 18


@pytest.mark.parametrize("method", METHODS)
def test_dtype_and_row_shape_are_part_of_the_row_key(method: str) -> None:
    ints = torch.arange(8, dtype=torch.int64).reshape(2, 4)
    floats = ints.view(torch.float64)  # the same bytes
    k_int = row_keys_fast([ints], 2, salt=b"", method=method)
    assert k_int != row_keys_fast([floats], 2, salt=b"", method=method)
    assert k_int != row_keys_fast([ints.reshape(2, 2, 2)], 2, salt=b"", method=method)


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_and_multiple_inputs(method: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    t = x.t().contiguous().t()  # same values, column-major
    sliced = torch.randn(5, 16)[:, ::2]
    mask = torch.ones(5, 3, dtype=torch.bool)
    assert row_keys_fast([t], 5, salt=b"", method=method) == row_keys_fast([x], 5, salt=b"", method=method)
    assert row_keys_fast([sliced], 5, salt=b"", method=method) == row_keys_fast(
        [sliced.contiguous()], 5, salt=b"", method=method
    )
    both = row_keys_fast([x, mask], 5, salt=b"", method=method)
    other_mask = mask.clone()
    other_mask[2, 1] = False
    changed = row_keys_fast([x, other_mask], 5, salt=b"", method=method)
    assert [a == b for a, b in zip(both, changed)] == [True, True, False, True, True]
    assert both != row_keys_fast([x], 5, salt=b"", method=method)


def test_the_torch_hash_never_copies_the_input_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchfreeze.speed import _hashing as keys_module

    seen: list[int] = []
    real = keys_module.tensor_bytes

    def spy(t: torch.Tensor) -> memoryview:
        seen.append(t.numel())
        return real(t)

    monkeypatch.setattr(keys_module, "tensor_bytes", spy)
    x = torch.randn(4, 1000)
    keys_module.row_keys_fast([x], 4, salt=b"", method="torch")
    assert seen == [4 * 2]  # only the keys (two int64 lanes per row) cross over, never the 4000 inputs


def test_xxhash_is_the_default_on_cpu_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchfreeze.speed import _hashing as keys_module

    x = torch.randn(3, 4)
    if HAVE_XXHASH:
        assert row_keys_fast([x], 3, salt=b"") == row_keys_fast([x], 3, salt=b"", method="xxhash")
    monkeypatch.setattr(keys_module, "_xxhash", None)  # as without the package: SHA-256 per row
    assert keys_module.row_keys_fast([x], 3, salt=b"") == row_keys_fast([x], 3, salt=b"", method="sha256")
    with pytest.raises(tf.errors.ArgumentError, match=r"method='xxhash'.*Fix: pip install"):
        keys_module.row_keys_fast([x], 3, salt=b"", method="xxhash")


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        pytest.param([torch.ones(3, 2), torch.ones(2, 2)], "3 rows", id="other-row-count"),
        pytest.param([torch.ones(3, 2).to_sparse()], "layout", id="sparse"),
    ],
)
def test_row_keys_refuse_bad_tensors(tensors: list[torch.Tensor], match: str) -> None:
    with pytest.raises(tf.errors.ArgumentError, match=match):
        row_keys_fast(tensors, 3, salt=b"")


@pytest.mark.parametrize("method", METHODS)
def test_a_cache_without_xxhash_gives_the_same_results(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    from torchfreeze.speed import _hashing as keys_module

    if method != "xxhash":
        monkeypatch.setattr(keys_module, "_xxhash", None)
    if method == "torch":
        from torchfreeze.speed import _rows as cache_module

        real = keys_module.row_keys_fast
        monkeypatch.setattr(cache_module, "row_keys_fast", lambda *a, **k: real(*a, **{**k, "method": "torch"}))
    inner = frozen_mlp()
    cached = cache_features(inner)
    data = torch.randn(10, 6)
    cached(data)
    again = data[torch.randperm(10)][:7]
    out = cached(again)
    assert cached.stats().hits == 7 and cached.stats().misses == 10
    torch.testing.assert_close(out, inner(again))


class ScaledByParameters(nn.Module):
    """Multiplies by every parameter it holds (none at first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parameters():
            x = x * p
        return x


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m.register_parameter("s", nn.Parameter(torch.tensor(3.0), False)), id="new-parameter"),
        pytest.param(lambda m: m.register_buffer("unused", torch.ones(1)) or setattr(m, "k", 2), id="new-attribute"),
    ],
)
def test_a_layer_that_had_no_parameters_is_still_watched(change: object) -> None:
    inner = ScaledByParameters().eval()
    cached = cache_features(inner)
    x = torch.randn(3, 2)
    cached(x)
    change(inner)  # type: ignore[operator]
    torch.testing.assert_close(cached(x), inner(x))
    assert cached.stats().hits == 0


@pytest.mark.parametrize("xxhash_installed", [True, False], ids=["xxhash", "torch-hash"])
def test_batch_key_covers_content_dtype_shape_and_every_tensor(
    monkeypatch: pytest.MonkeyPatch, xxhash_installed: bool
) -> None:
    from torchfreeze.speed import _hashing as keys_module

    if not xxhash_installed:
        monkeypatch.setattr(keys_module, "_xxhash", None)
    elif not HAVE_XXHASH:
        pytest.skip("the optional xxhash package is not installed")
    key = keys_module.batch_key
    x, m = torch.arange(12.0).reshape(3, 4), torch.ones(3, dtype=torch.bool)
    assert key([x, m], salt=b"s") == key([x.clone(), m.clone()], salt=b"s")
    other = x.clone()
    other[2, 3] += 1
    assert len({key([x], salt=b"s"), key([other], salt=b"s"), key([x.reshape(4, 3)], salt=b"s")}) == 3
    assert key([x], salt=b"s") != key([x.view(torch.int32)], salt=b"s")
    assert key([x, m], salt=b"s") != key([x, ~m], salt=b"s") != key([x], salt=b"s")
    assert key([x], salt=b"s") != key([x], salt=b"t")
