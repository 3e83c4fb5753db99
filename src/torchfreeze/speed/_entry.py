"""One cache entry: an output's pytree spec and leaves, and its file format on disk.

In memory an entry is the ``torch.utils._pytree`` spec of the output and its
leaves (tensors, and constants such as ``None``). On disk it is a magic number,
a JSON header (the key, the output structure, each tensor's dtype, shape and
offset), the raw tensor bytes (64-byte aligned) and a SHA-256 checksum. No
pickle is ever loaded: output containers are rebuilt from their class path,
restricted to tuple/list/dict subclasses of modules already imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Mapping
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
    "resolve_class",
]

_MAGIC = b"TFCACHE\x02"
_DIGEST = 32
_ALIGN = 64
# what a damaged header can raise while it is read; every one means "corrupt: recompute"
_DAMAGE = (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, struct.error)


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


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(path: str) -> type:
    """The container class named ``module:qualname``, from a module this process has already imported.

    A disk entry must never make us import code: the wrapped model's own modules
    are loaded by the time its outputs are read back; anything else is treated as
    a foreign entry (``ValueError``: recomputed).
    """
    mod, _, qual = path.partition(":")
    obj: Any = sys.modules.get(mod)
    if obj is None:
        raise ValueError(f"{path}: module {mod!r} is not imported in this process")
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, (tuple, list, dict))):
        raise ValueError(f"{path} is not a container class")
    return obj


def _children(spec: tree.TreeSpec) -> list[tree.TreeSpec]:
    children = getattr(spec, "children", None)  # torch >= 2.6; before: the children_specs list
    return list(children() if callable(children) else spec.children_specs)


def _container_class(spec: tree.TreeSpec) -> type:
    kind = spec.type
    if isinstance(spec.context, type) and issubclass(spec.context, tuple):
        return spec.context  # namedtuple / structseq: the node type is generic, the class is the context
    if isinstance(kind, type) and issubclass(kind, (tuple, list, dict)):
        return kind
    raise ArgumentError(
        f"cache_features: cannot store an output containing a {getattr(kind, '__name__', kind)} on disk; expected "
        "tensors, or tuples, lists and dicts of tensors. Use no directory, or wrap the module so it returns those."
    )


def spec_to_json(spec: tree.TreeSpec, leaves: list[Any]) -> Any:
    """A JSON-able description of an output: its spec, with constants inline and tensors by index."""
    position = iter(range(len(leaves)))
    tensor_index = iter(range(len(leaves)))

    def node(s: tree.TreeSpec) -> Any:
        if s.is_leaf():
            leaf = leaves[next(position)]
            return ["T", next(tensor_index)] if isinstance(leaf, Tensor) else ["C", leaf]
        cls = _container_class(s)
        children = [node(c) for c in _children(s)]
        if issubclass(cls, Mapping):
            keys = s.context
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                raise ArgumentError("cache_features: only string keys are supported in dict outputs stored on disk")
            return ["D", _class_path(cls), keys, children]
        return ["L", _class_path(cls), children]

    return node(spec)


def _rebuild(spec: Any, tensors: list[Tensor]) -> Any:
    tag = spec[0]
    if tag == "T":
        return tensors[spec[1]]
    if tag == "C":
        if not isinstance(spec[1], CONSTANT_TYPES):
            raise ValueError("bad constant")
        return spec[1]
    if tag == "D":
        cls = resolve_class(spec[1])
        items = {k: _rebuild(s, tensors) for k, s in zip(spec[2], spec[3], strict=True)}
        return cls(**items) if hasattr(cls, "to_tuple") else cls(items)  # to_tuple: a transformers ModelOutput
    if tag == "L":
        cls = resolve_class(spec[1])
        values = [_rebuild(s, tensors) for s in spec[2]]
        return cls(*values) if hasattr(cls, "_fields") else cls(values)  # _fields: a namedtuple
    raise ValueError(f"bad spec tag {tag!r}")


# --------------------------------------------------------------------------- file format


def _dtype_from_str(s: str) -> torch.dtype:
    name = s.split(".", 1)[1] if s.startswith("torch.") else s
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {s!r}")
    return dt


def encode_entry(key: str, entry: Entry) -> bytes:
    """The bytes of the file that stores ``entry`` under ``key``."""
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
    body = b"".join([header, *chunks])
    digest = hashlib.sha256(body).digest()
    return b"".join([_MAGIC, struct.pack("<Q", len(header)), body, digest])


def _read_tensors(metas: list[dict[str, Any]], data: bytearray) -> list[Tensor]:
    tensors = []
    for m in metas:
        dt = _dtype_from_str(m["dtype"])
        shape = tuple(int(s) for s in m["shape"])
        numel = math.prod(shape)
        if numel == 0:
            tensors.append(torch.empty(shape, dtype=dt))
            continue
        itemsize = torch.empty((), dtype=dt).element_size()
        if m["nbytes"] != numel * itemsize or m["offset"] + m["nbytes"] > len(data):
            raise ValueError("tensor extent out of range")
        tensors.append(torch.frombuffer(data, dtype=dt, count=numel, offset=m["offset"]).reshape(shape))
    return tensors


def decode_entry(raw: bytes, key: str) -> Entry:
    """The entry stored in ``raw`` under ``key``; ``ValueError`` for anything corrupted or foreign."""
    if len(raw) < len(_MAGIC) + 8 + _DIGEST or not raw.startswith(_MAGIC):
        raise ValueError("bad magic or truncated")
    (hlen,) = struct.unpack_from("<Q", raw, len(_MAGIC))
    start = len(_MAGIC) + 8
    body = memoryview(raw)[start : len(raw) - _DIGEST]
    if hlen > len(body):
        raise ValueError("bad header length")
    if hashlib.sha256(body).digest() != raw[len(raw) - _DIGEST :]:
        raise ValueError("checksum mismatch")
    try:
        header = json.loads(bytes(body[:hlen]))
        if header.get("key") != key:
            raise ValueError("entry belongs to another key")
        tensors = _read_tensors(header["tensors"], bytearray(body[hlen:]))
        spec, leaves = flatten_output(_rebuild(header["spec"], tensors))  # validates the classes too
    except _DAMAGE as error:
        raise ValueError(f"damaged entry: {error}") from error
    return Entry(spec, tuple(leaves))
