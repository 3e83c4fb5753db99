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
