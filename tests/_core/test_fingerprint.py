"""The one tensor fingerprint format."""

from __future__ import annotations

import hashlib

import pytest
import torch

from torchfreeze._core.fingerprint import fingerprint, hash_tensor, tensor_bytes

BASE = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}

VARIANTS = {
    "renamed": {"c": BASE["a"], "b": BASE["b"]},
    "reshaped": {"a": BASE["a"].reshape(3, 2), "b": BASE["b"]},
    "other-dtype-same-bytes": {"a": BASE["a"].view(torch.int32), "b": BASE["b"]},
    "changed-value": {"a": BASE["a"] + 1, "b": BASE["b"]},
    "extra-tensor": {**BASE, "z": torch.zeros(0)},
}


def test_format_and_order_independence() -> None:
    fp = fingerprint(BASE)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert fingerprint(reversed(list(BASE.items()))) == fp


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_difference_changes_the_fingerprint(name: str) -> None:
    assert fingerprint(VARIANTS[name]) != fingerprint(BASE)


def test_non_contiguous_and_conjugate_views_hash_their_values() -> None:
    t = torch.randn(4, 5)
    assert fingerprint({"t": t.t()}) == fingerprint({"t": t.t().contiguous()})
    z = torch.randn(3, dtype=torch.complex64)
    assert bytes(tensor_bytes(z.conj())) == bytes(tensor_bytes(z.conj().resolve_conj()))


def test_hash_tensor_header_separates_name_and_shape() -> None:
    a, b = hashlib.sha256(), hashlib.sha256()
    hash_tensor(a, torch.zeros(4), "w")
    hash_tensor(b, torch.zeros(2, 2), "w")
    assert a.digest() != b.digest()
