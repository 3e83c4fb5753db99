"""One cache entry: an output's pytree spec and leaves, and its file format on disk.

In memory an entry is the ``torch.utils._pytree`` spec of the output and its
leaves (tensors, and constants such as ``None``). On disk it is a magic number,
the file's total length, a JSON header (the key, the output structure, each
tensor's dtype, shape and offset), the raw tensor bytes (64-byte aligned) and an
HMAC-SHA256 of everything before it, keyed by the directory's secret
(:mod:`torchfreeze.speed.storage`): an entry written by anyone who does not hold
the secret is rejected. No pickle is loaded and no class is looked up: the only
structures a file can describe are plain ``tuple``, ``list`` and ``dict`` (string
keys) of tensors and constants; an output with any other container (a
namedtuple, a ``ModelOutput``) is kept in memory only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from typing import Any

import torch
from torch import Tensor

from torchfreeze._core import tree
from torchfreeze._core.fingerprint import tensor_bytes
from torchfreeze.errors import ArgumentError
from torchfreeze.speed.keys import CONSTANT_TYPES, check_dense

__all__ = [
    "Entry",
    "flatten_output",
    "detached",
    "row_entries",
    "stack_entries",
    "encode_entry",
    "decode_entry",
    "Unstorable",
]

_MAGIC = b"TFCACHE\x03"
_PREFIX = len(_MAGIC) + 16  # magic, total length, header length
_DIGEST = 32
_ALIGN = 64
# what a damaged header can raise while it is read; every one means "corrupt: recompute"
_DAMAGE = (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, RecursionError, struct.error)


class Entry:
    """A cached output: its pytree spec and leaves (tensors, and constants)."""

    __slots__ = ("leaves", "nbytes", "spec")

    def __init__(self, spec: tree.TreeSpec, leaves: tuple[Any, ...]) -> None:
        self.spec = spec
        self.leaves = leaves
        self.nbytes = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))

    def output(self, leaves: list[Any] | None = None) -> Any:
        """The output rebuilt, from these leaves or (by default) the entry's own."""
        return tree.unflatten(self.spec, list(self.leaves) if leaves is None else leaves)


def flatten_output(out: Any) -> tuple[tree.TreeSpec, list[Any]]:
    """The spec and leaves of a module's output; :class:`ArgumentError` for a leaf that is not cacheable."""
    leaves, spec = tree.flatten(out)
    for leaf in leaves:
        if not isinstance(leaf, (Tensor, *CONSTANT_TYPES)):
            raise ArgumentError(
                f"cache_features: the module returned a {type(leaf).__name__}; expected tensors, or tuples, "
                "lists and dicts of tensors (and None/numbers/strings). Wrap the module so it returns tensors."
            )
    return spec, leaves


# --------------------------------------------------------------------------- rows


def detached(leaf: Any) -> Any:
    """A tensor leaf detached and copied (so the cache owns it); other leaves as they are."""
    return leaf.detach().clone() if isinstance(leaf, Tensor) else leaf


def row_entries(result: Any, n: int) -> list[Entry]:
    """One entry per row of a batch's output; every output tensor must have the batch size ``n`` first."""
    spec, leaves = flatten_output(result)
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != n:
            raise ArgumentError(
                f"cache_features: with granularity='sample' every output tensor needs the batch size {n} "
                f"as its first dimension; output #{i} has shape {tuple(t.shape)}. "
                "Use granularity='batch' for this module."
            )
    return [Entry(spec, tuple(detached(x[r]) if isinstance(x, Tensor) else x for x in leaves)) for r in range(n)]


def stack_entries(entries: list[Entry], device: torch.device) -> Any:
    """The batch output rebuilt from one entry per row, on ``device``."""
    first = entries[0]
    for e in entries:
        if e.spec is first.spec:  # rows of one call
            continue
        same_constants = all(isinstance(a, Tensor) or a == b for a, b in zip(first.leaves, e.leaves, strict=False))
        if e.spec != first.spec or not same_constants:
            raise ArgumentError(
                "cache_features: the cached rows of this batch have different output structures; "
                "use granularity='batch' for this module."
            )
    out = [
        stack_rows([e.leaves[j] for e in entries], device) if isinstance(leaf, Tensor) else leaf
        for j, leaf in enumerate(first.leaves)
    ]
    return first.output(out)


def stack_rows(rows: list[Tensor], device: torch.device) -> Tensor:
    """Stack cached rows into a batch on ``device`` (one copy when every row is already there)."""
    try:
        out = torch.stack(rows)
    except RuntimeError:  # rows on different devices (e.g. some read back from disk)
        return torch.stack([t.to(device) for t in rows])
    return out if out.device == device else out.to(device)


# --------------------------------------------------------------------------- spec <-> JSON


class Unstorable(ArgumentError):
    """An output whose structure a cache file cannot describe (kept in memory only)."""


def _children(spec: tree.TreeSpec) -> list[tree.TreeSpec]:
    children = getattr(spec, "children", None)  # torch >= 2.6; before: the children_specs list
    return list(children() if callable(children) else spec.children_specs)


def spec_to_json(spec: tree.TreeSpec, leaves: list[Any]) -> Any:
    """A JSON-able description of an output: plain tuples, lists and string-keyed dicts only.

    Raises:
        Unstorable: any other container (a namedtuple, an ``OrderedDict``, a ``ModelOutput``)
            or a dict key that is not a string.
    """
    position = iter(range(len(leaves)))
    tensor_index = iter(range(len(leaves)))

    def node(s: tree.TreeSpec) -> Any:
        if s.is_leaf():
            leaf = leaves[next(position)]
            return ["T", next(tensor_index)] if isinstance(leaf, Tensor) else ["C", leaf]
        kind = s.type
        children = [node(c) for c in _children(s)]
        if kind is dict:
            keys = s.context
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                raise Unstorable("cache_features: only string keys are supported in dict outputs stored on disk")
            return ["D", keys, children]
        if kind is tuple or kind is list:
            return ["L", kind.__name__, children]
        raise Unstorable(
            f"cache_features: a cache file stores plain tuples, lists and dicts only, not a "
            f"{getattr(kind, '__name__', kind)}; this output is kept in memory only."
        )

    return node(spec)


def _rebuild(spec: Any, tensors: list[Tensor], depth: int = 0) -> Any:
    if depth > 64 or not isinstance(spec, list) or not spec:
        raise ValueError("bad spec")
    tag = spec[0]
    if tag == "T" and len(spec) == 2 and type(spec[1]) is int:
        return tensors[spec[1]]
    if tag == "C" and len(spec) == 2:
        if spec[1] is not None and type(spec[1]) not in (bool, int, float, str):
            raise ValueError("bad constant")
        return spec[1]
    if tag == "D" and len(spec) == 3 and all(isinstance(k, str) for k in spec[1]):
        return {k: _rebuild(s, tensors, depth + 1) for k, s in zip(spec[1], spec[2], strict=True)}
    if tag == "L" and len(spec) == 3 and spec[1] in ("tuple", "list"):
        values = [_rebuild(s, tensors, depth + 1) for s in spec[2]]
        return tuple(values) if spec[1] == "tuple" else values
    raise ValueError("bad spec node")


# --------------------------------------------------------------------------- file format


def _dtype_from_str(s: str) -> torch.dtype:
    name = s.split(".", 1)[1] if s.startswith("torch.") else s
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {s!r}")
    return dt


def encode_entry(key: str, entry: Entry, secret: bytes) -> bytes:
    """The bytes of the file that stores ``entry`` under ``key``, authenticated with ``secret``.

    Raises:
        Unstorable: the output's structure cannot be described in a file.
    """
    tensors = [check_dense(t) for t in entry.leaves if isinstance(t, Tensor)]
    spec = spec_to_json(entry.spec, list(entry.leaves))
    metas = []
    chunks: list[bytes | memoryview] = []
    offset = 0
    for t in tensors:
        mv = tensor_bytes(t)
        pad = (-offset) % _ALIGN
        if pad:
            chunks.append(b"\0" * pad)
            offset += pad
        metas.append({"dtype": str(t.dtype), "shape": list(t.shape), "offset": offset, "nbytes": mv.nbytes})
        chunks.append(mv)
        offset += mv.nbytes
    header = json.dumps({"key": key, "spec": spec, "tensors": metas}, separators=(",", ":")).encode()
    total = _PREFIX + len(header) + offset + _DIGEST
    signed = b"".join([_MAGIC, struct.pack("<QQ", total, len(header)), header, *chunks])
    return signed + hmac.new(secret, signed, hashlib.sha256).digest()


def _read_tensors(metas: list[dict[str, Any]], data: bytearray) -> list[Tensor]:
    tensors = []
    for m in metas:
        dt = _dtype_from_str(m["dtype"])
        shape = tuple(int(s) for s in m["shape"])
        if any(d < 0 for d in shape):
            raise ValueError("negative dimension")
        numel = math.prod(shape)
        if numel == 0:
            tensors.append(torch.empty(shape, dtype=dt))
            continue
        itemsize = torch.empty((), dtype=dt).element_size()
        if m["nbytes"] != numel * itemsize or m["offset"] < 0 or m["offset"] + m["nbytes"] > len(data):
            raise ValueError("tensor extent out of range")
        tensors.append(torch.frombuffer(data, dtype=dt, count=numel, offset=m["offset"]).reshape(shape))
    return tensors


def decode_entry(raw: bytes, key: str, secret: bytes) -> Entry:
    """The entry stored in ``raw`` under ``key``; ``ValueError`` for anything unauthenticated, corrupted or foreign.

    The HMAC is checked before anything of the file is parsed.
    """
    if len(raw) < _PREFIX + _DIGEST or not raw.startswith(_MAGIC):
        raise ValueError("bad magic or truncated")
    total, hlen = struct.unpack_from("<QQ", raw, len(_MAGIC))
    if total != len(raw) or hlen > len(raw) - _PREFIX - _DIGEST:
        raise ValueError("declared length does not match the file")
    signed = memoryview(raw)[: len(raw) - _DIGEST]
    if not hmac.compare_digest(hmac.new(secret, signed, hashlib.sha256).digest(), raw[len(raw) - _DIGEST :]):
        raise ValueError("not authenticated by this cache directory's secret")
    try:
        header = json.loads(bytes(signed[_PREFIX : _PREFIX + hlen]))
        if header.get("key") != key:
            raise ValueError("entry belongs to another key")
        tensors = _read_tensors(header["tensors"], bytearray(signed[_PREFIX + hlen :]))
        spec, leaves = flatten_output(_rebuild(header["spec"], tensors))
    except _DAMAGE as error:
        raise ValueError(f"damaged entry: {error}") from error
    return Entry(spec, tuple(leaves))
