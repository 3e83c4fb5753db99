"""Tensor fingerprints: the raw bytes of a tensor, and the one fingerprint format.

:func:`fingerprint` (``"sha256:<hex>"`` over names, dtypes, shapes and bytes, in
sorted name order) is the one format: checkpoints name their frozen base with
it, the feature cache keys modules with it, folded BatchNorm layers detect
changed weights with it. :func:`hash_tensor` feeds one tensor in that format to
a hashlib object, for callers that mix in more than tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch

__all__ = ["tensor_bytes", "hash_tensor_bytes", "hash_tensor", "fingerprint", "Hasher"]

_HASH_CHUNK = 16 * 2**20  # bytes per hashlib.update call


class Hasher(Protocol):
    """Anything with ``update(bytes-like)``: a :mod:`hashlib` object."""

    def update(self, data: bytes | memoryview, /) -> None: ...


# --------------------------------------------------------------------------- tensor bytes


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy view of a dense tensor's bytes (flat, unsigned bytes).

    The tensor is detached, moved to CPU, conjugation/negation views are
    resolved and it is made contiguous first (a copy only when one of these is
    needed). The returned view keeps the memory it points to alive.

    Args:
        t: a strided (dense) tensor of any dtype.

    Returns:
        A ``memoryview`` of format ``"B"`` and ``t.numel() * t.element_size()`` bytes.

    >>> bytes(tensor_bytes(torch.tensor([1, 2], dtype=torch.uint8)))
    b'\\x01\\x02'
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    buf: Any = (ctypes.c_char * n).from_address(t.data_ptr())
    buf._owner = t  # the view below keeps ``buf`` alive, and ``buf`` keeps the tensor alive
    return memoryview(buf).cast("B")


def hash_tensor_bytes(h: Hasher, t: torch.Tensor) -> None:
    """Feed a tensor's raw bytes (nothing else: no dtype, no shape) to a hashlib object.

    Streams in 16 MiB slices of a zero-copy view, so it works on tensors of any size.

    Args:
        h: a :mod:`hashlib` object (anything with ``update(bytes-like)``).
        t: a strided tensor.

    >>> import hashlib
    >>> h = hashlib.sha256(); hash_tensor_bytes(h, torch.zeros(2, dtype=torch.uint8))
    >>> h.hexdigest() == hashlib.sha256(b"\\0\\0").hexdigest()
    True
    """
    mv = tensor_bytes(t)
    if mv.nbytes <= _HASH_CHUNK:
        h.update(mv)
        return
    for start in range(0, mv.nbytes, _HASH_CHUNK):
        h.update(mv[start : start + _HASH_CHUNK])


def hash_tensor(h: Hasher, t: torch.Tensor, name: str = "") -> None:
    """Feed one named tensor to ``h`` in the fingerprint format: a length-prefixed header, then its bytes.

    The header is ``name``, dtype and shape separated by NUL bytes, so a tensor of
    the same bytes but another dtype or shape hashes differently.

    Args:
        h: a :mod:`hashlib` object.
        t: a strided tensor.
        name: its name (``""`` for an anonymous tensor).

    >>> a, b = hashlib.sha256(), hashlib.sha256()
    >>> hash_tensor(a, torch.zeros(2, dtype=torch.int32)); hash_tensor(b, torch.zeros(8, dtype=torch.uint8))
    >>> a.hexdigest() == b.hexdigest()
    False
    """
    header = f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode()
    h.update(len(header).to_bytes(8, "little"))
    h.update(header)
    hash_tensor_bytes(h, t)


def fingerprint(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of tensors, in sorted name order, streamed.

    Never materialises more than one tensor's bytes at a time (hashed in 16 MiB
    slices), so it runs on any model that fits in memory.

    Args:
        tensors: a mapping (or iterable of pairs) from name to tensor.

    Returns:
        ``"sha256:<hex>"`` (71 characters).

    Example:
        >>> fingerprint({"w": torch.zeros(2)}) == fingerprint({"w": torch.zeros(2)})
        True
        >>> fingerprint({"w": torch.zeros(2)}) == fingerprint({"w": torch.ones(2)})
        False
    """
    items = dict(tensors.items() if isinstance(tensors, Mapping) else tensors)
    h = hashlib.sha256()
    for name in sorted(items):
        hash_tensor(h, items[name], name)
    return "sha256:" + h.hexdigest()
