"""One cache entry: an output's pytree spec and leaves, its file on disk, and per-sample row layouts.

In memory a whole-call entry (``granularity="batch"``) is the ``torch.utils._pytree``
spec of the output and its leaves (tensors, and constants such as ``None``);
per-sample rows live in :class:`RowLayouts` (slabs, :mod:`torchfreeze.speed.slabs`).

On disk an entry is a safetensors file (tensors ``"0"``, ``"1"``, ... in leaf order;
the metadata holds the format name, the key and the output structure as JSON)
followed by a 32-byte HMAC-SHA256 trailer over the safetensors bytes, keyed by the
directory's secret (:mod:`torchfreeze.speed.storage`): an entry written by anyone
who does not hold the secret is rejected before any of it is parsed. No pickle is
loaded and no class is looked up: the only structures a file can describe are
plain ``tuple``, ``list`` and ``dict`` (string keys) of tensors and constants; an
output with any other container (a namedtuple, a ``ModelOutput``) is kept in
memory only. docs/file-formats.md describes the format.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from torchfreeze._core import tree
from torchfreeze.errors import ArgumentError
from torchfreeze.speed.keys import CONSTANT_TYPES, check_dense

__all__ = [
    "Entry",
    "flatten_output",
    "detached",
    "row_entries",
    "check_rows",
    "entry_rows",
    "encode_entry",
    "decode_entry",
    "Unstorable",
]

#: the file format's name, in every file's metadata and in the authenticated bytes
FORMAT = "tfc-entry-4"
_DIGEST = 32
_MAX_HEADER = 1 << 20  # a safetensors header longer than this is damage, not an entry
# what a damaged header can raise while it is read; every one means "corrupt: recompute"
_DAMAGE = (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, RecursionError, struct.error)


LEAF = tree.flatten(0)[1]


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
    if isinstance(out, Tensor):
        return LEAF, [out]
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


def check_rows(leaves: Sequence[Any], n: int) -> None:
    """:class:`ArgumentError` unless every tensor leaf of an output has the batch size ``n`` first."""
    for i, t in enumerate(x for x in leaves if isinstance(x, Tensor)):
        if t.dim() == 0 or t.shape[0] != n:
            raise ArgumentError(
                f"cache_features: with granularity='sample' every output tensor needs the batch size {n} "
                f"as its first dimension; output #{i} has shape {tuple(t.shape)}. "
                "Use granularity='batch' for this module."
            )


def row_entries(result: Any, n: int) -> list[Entry]:
    """One entry per row of a batch's output (copies: for the files on disk)."""
    spec, leaves = flatten_output(result)
    check_rows(leaves, n)
    return [Entry(spec, tuple(detached(x[r]) if isinstance(x, Tensor) else x for x in leaves)) for r in range(n)]


def entry_rows(entries: Sequence[Entry]) -> list[Tensor]:
    """The tensor leaves of one-row entries (read from disk) stacked into batches, one per leaf."""
    count = sum(isinstance(x, Tensor) for x in entries[0].leaves)
    return [torch.stack([[x for x in e.leaves if isinstance(x, Tensor)][j] for e in entries]) for j in range(count)]


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


def _safetensors() -> Any:
    import safetensors.torch as st  # the io extra; cache_features checks it is there before using a directory

    return st


def encode_entry(key: str, entry: Entry, secret: bytes) -> bytes:
    """The bytes of the file that stores ``entry`` under ``key``, authenticated with ``secret``.

    Raises:
        Unstorable: the output's structure cannot be described in a file.
    """
    tensors = [check_dense(t) for t in entry.leaves if isinstance(t, Tensor)]
    spec = spec_to_json(entry.spec, list(entry.leaves))
    named = {str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors)}
    meta = {"format": FORMAT, "key": key, "spec": json.dumps(spec, separators=(",", ":"))}
    payload: bytes = _safetensors().save(named, metadata=meta)
    return payload + _mac(secret, payload)


def _mac(secret: bytes, payload: bytes | memoryview) -> bytes:
    h = hmac.new(secret, FORMAT.encode() + b"\0", hashlib.sha256)
    h.update(payload)
    return h.digest()


def decode_entry(raw: bytes, key: str, secret: bytes) -> Entry:
    """The entry stored in ``raw`` under ``key``; ``ValueError`` for anything unauthenticated, corrupted or foreign.

    The HMAC is checked before anything of the file is parsed.
    """
    from safetensors import SafetensorError

    if len(raw) < 8 + _DIGEST:
        raise ValueError("truncated")
    payload = memoryview(raw)[: len(raw) - _DIGEST]
    if not hmac.compare_digest(_mac(secret, payload), raw[len(raw) - _DIGEST :]):
        raise ValueError("not authenticated by this cache directory's secret")
    try:
        (hlen,) = struct.unpack_from("<Q", raw, 0)
        if hlen > min(_MAX_HEADER, len(payload) - 8):
            raise ValueError("header length out of range")
        meta = json.loads(bytes(payload[8 : 8 + hlen])).get("__metadata__") or {}
        if meta.get("format") != FORMAT or meta.get("key") != key:
            raise ValueError("entry of another format or key")
        named = _safetensors().load(bytes(payload))
        tensors = [named[str(i)] for i in range(len(named))]
        spec, leaves = flatten_output(_rebuild(json.loads(meta["spec"]), tensors))
        if sum(isinstance(x, Tensor) for x in leaves) != len(tensors):
            raise ValueError("tensors not all used by the structure")
    except (*_DAMAGE, SafetensorError) as error:
        raise ValueError(f"damaged entry: {error}") from error
    return Entry(spec, tuple(leaves))
