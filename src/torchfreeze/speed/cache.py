"""Feature cache: memoise a frozen, deterministic module's outputs.

``cache_features(module)`` returns a :class:`FeatureCache` wrapper. Assign it
back where the module lived (``model.backbone = cache_features(model.backbone)``);
that is the one call. The wrapper

* keys every output by the *content* of the inputs (a fast SHA-256 hash (hardware-accelerated on current CPUs) of the
  tensor bytes, dtype and shape, never the sample's index: augmented data simply
  misses and stays correct) plus a fingerprint of the wrapped module's weights,
  buffers, structure and train/eval flags;
* by default caches per sample (``granularity="sample"``): each row of the batch
  is its own entry, so a shuffled ``DataLoader`` hits the cache from the second
  epoch on. This assumes the module treats the rows of a batch independently,
  which holds for eval-mode networks; use ``granularity="batch"`` otherwise;
* keeps entries in memory, least recently used first out, within ``max_bytes``,
  and optionally in a directory on disk (atomic writes; every file carries its
  key and a checksum, so a corrupted or foreign entry is detected, counted and
  recomputed, never returned);
* refuses a module with trainable parameters or stochastic behaviour (dropout in
  train mode, BatchNorm using batch statistics), naming the parameter or layer,
  both when it is wrapped and on every call (so a later ``unfreeze`` is caught);
* keeps the wrapped module's train/eval flags as they were when wrapped:
  ``model.train()`` does not reach through the cache;
* leaves ``state_dict`` keys unchanged (the wrapper adds no ``module.`` prefix
  to saved or loaded keys); ``parameters()`` names do show the ``.module`` level;
* pickles without its in-memory entries, so it works in ``DataLoader`` workers
  (each worker has its own memory; a shared ``directory`` lets them share).

The way back is ``cached.module`` (the original module, untouched).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import operator
import os
import struct
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torchfreeze._core.files import atomic_write
from torchfreeze._core.fingerprint import hash_tensor, tensor_bytes
from torchfreeze.errors import ArgumentError, CacheRefusedError

__all__ = ["cache_features", "FeatureCache", "CacheStats", "cache_refusal_reasons"]

_MAGIC = b"TFCACHE\x01"
_DIGEST = 32
_ALIGN = 64
_STOCHASTIC_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_CONSTANT_TYPES = (type(None), bool, int, float, str)
# float attributes through which layers (e.g. Hugging Face attention) apply functional dropout in train mode
_FUNCTIONAL_DROPOUT_ATTRS = ("dropout", "dropout_p", "dropout_prob", "attention_dropout", "attn_dropout")


# --------------------------------------------------------------------------- hashing


def _check_dense(t: Tensor) -> None:
    if t.layout != torch.strided:
        raise ArgumentError(
            f"cache_features: cannot hash a tensor with layout {t.layout}; expected a dense "
            "(strided) tensor. Convert it with .to_dense() before the cached module."
        )


def _as_bytes(t: Tensor) -> memoryview:
    """Zero-copy byte view of a dense tensor (see :func:`torchfreeze._core.fingerprint.tensor_bytes`)."""
    _check_dense(t)
    return tensor_bytes(t)


def _hash_tensor(h: Any, t: Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes to a hashlib object."""
    _check_dense(t)
    hash_tensor(h, t)


def _structure_repr(module: nn.Module) -> str:
    try:
        return repr(module)
    except Exception:  # a broken extra_repr must not stop caching
        return type(module).__qualname__


def module_fingerprint(module: nn.Module, *, salt: str = "") -> str:
    """Content fingerprint of a module: weights, buffers, structure and modes.

    Args:
        module: the module to fingerprint.
        salt: extra text mixed in (for example a version of your preprocessing).

    Returns:
        A 40-character hex string; equal modules give equal fingerprints.

    >>> a = nn.Linear(2, 2); b = nn.Linear(2, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> module_fingerprint(a) == module_fingerprint(b)
    True
    """
    h = hashlib.sha256()
    h.update(b"tfc-module-1|")
    h.update(salt.encode())
    h.update(type(module).__module__.encode() + b"." + type(module).__qualname__.encode())
    h.update(_structure_repr(module).encode())
    for name, m in module.named_modules(remove_duplicate=False):
        h.update(f"|m:{name}:{type(m).__qualname__}:{m.training}".encode())
    for name, p in module.named_parameters(remove_duplicate=False):
        h.update(f"|p:{name}|".encode())
        _hash_tensor(h, p)
    for name, b in module.named_buffers(remove_duplicate=False):
        h.update(f"|b:{name}|".encode())
        _hash_tensor(h, b)
    return h.hexdigest()[:40]


_get_training = operator.attrgetter("training")
_get_version = operator.attrgetter("_version")
_get_requires_grad = operator.attrgetter("requires_grad")
_get_parameters = operator.attrgetter("_parameters")
_get_buffers = operator.attrgetter("_buffers")
_get_modules = operator.attrgetter("_modules")
_not_none = functools.partial(operator.is_not, None)


def _state_token(mods: list[nn.Module]) -> tuple[list[Any], ...]:
    """A token that changes whenever weights, buffers, structure or modes of ``mods`` change.

    Per tensor: identity, storage address, version counter (bumped by every in-place change,
    including ``load_state_dict`` and optimizer steps) and ``requires_grad``; per module: the
    identity of its parameter, buffer and child dicts, of every child, and its ``training`` flag
    (so a swapped or added layer, even one without parameters, changes the token). It runs on
    every cached call, so it is built from C-level ``map`` calls over the flat module list:
    microseconds even for a transformer encoder.
    """
    pdicts = list(map(_get_parameters, mods))
    bdicts = list(map(_get_buffers, mods))
    mdicts = list(map(_get_modules, mods))
    slots = list(itertools.chain.from_iterable(map(dict.values, pdicts + bdicts)))  # tensors and Nones
    tensors = list(filter(_not_none, slots))
    return (
        list(map(id, pdicts + bdicts + mdicts)),
        list(map(id, slots)),
        list(map(id, itertools.chain.from_iterable(map(dict.values, mdicts)))),
        list(map(Tensor.data_ptr, tensors)),
        list(map(_get_version, tensors)),
        list(map(_get_requires_grad, tensors)),
        list(map(_get_training, mods)),
    )


class _ModuleWatch:
    """Cheap change detection for a wrapped module (see :func:`_state_token`)."""

    __slots__ = ("mods", "module", "token")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.mods = list(module.modules())
        self.token = _state_token(self.mods)

    def poll(self) -> tuple[list[Any], ...] | None:
        """None when nothing changed; otherwise the new token (make it current with :meth:`accept`)."""
        token = _state_token(self.mods)
        if token == self.token:
            return None
        self.mods = list(self.module.modules())  # the structure may have changed: walk again
        return _state_token(self.mods)

    def accept(self, token: tuple[list[Any], ...]) -> None:
        self.token = token


# --------------------------------------------------------------------------- refusal


def _frozen_wrapper_type() -> type | None:
    try:
        from torchfreeze.nn.frozen import Frozen
    except Exception:  # the core may not be importable in isolation
        return None
    return Frozen


def cache_refusal_reasons(module: nn.Module, *, prefix: str = "") -> list[str]:
    """Why a module's outputs cannot be cached (an empty list when they can).

    Args:
        module: the module to check.
        prefix: prepended to the qualified names in the messages.

    Returns:
        One plain sentence per reason, each naming the parameter or layer.

    >>> cache_refusal_reasons(nn.Sequential(nn.Linear(2, 2)).requires_grad_(False))
    []
    >>> cache_refusal_reasons(nn.Sequential(nn.Linear(2, 2)))[0]
    "parameter '0.weight' is trainable (requires_grad=True)"
    """
    reasons: list[str] = []
    frozen_type = _frozen_wrapper_type()

    def q(name: str) -> str:
        return f"{prefix}.{name}" if prefix and name else (prefix or name or "<root>")

    skip: list[str] = []
    if frozen_type is not None:
        skip = [n for n, m in module.named_modules() if isinstance(m, frozen_type)]

    # every path of a shared parameter: a use outside Frozen trains it even if another use is wrapped
    reported: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in reported or not p.requires_grad:
            continue
        if not any(s == "" or name.startswith(s + ".") for s in skip):
            reported.add(id(p))
            reasons.append(f"parameter '{q(name)}' is trainable (requires_grad=True)")
    for name, m in module.named_modules():
        kind = type(m).__name__
        if isinstance(m, _STOCHASTIC_DROPOUT) and m.training and m.p > 0:
            reasons.append(f"layer '{q(name)}' ({kind}, p={m.p}) is in train mode, so it is random")
        elif isinstance(m, nn.RReLU) and m.training and m.lower != m.upper:
            reasons.append(
                f"layer '{q(name)}' ({kind}, lower={m.lower}, upper={m.upper}) is in train mode, so it is random"
            )
        elif isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and m.training and m.dropout > 0:
            reasons.append(f"layer '{q(name)}' ({kind}, dropout={m.dropout}) is in train mode, so it is random")
        elif m.training and any(
            isinstance(getattr(m, a, None), float) and getattr(m, a) > 0 for a in _FUNCTIONAL_DROPOUT_ATTRS
        ):
            a = next(
                a for a in _FUNCTIONAL_DROPOUT_ATTRS if isinstance(getattr(m, a, None), float) and getattr(m, a) > 0
            )
            reasons.append(
                f"layer '{q(name)}' ({kind}, {a}={getattr(m, a)}) is in train mode and applies dropout in its "
                "forward, so it is random"
            )
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            # per-sample statistics: deterministic, but in train mode it updates running statistics
            if m.training and m.track_running_stats:
                reasons.append(f"layer '{q(name)}' ({kind}) is in train mode and updates its running statistics")
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            if m.training and m.track_running_stats:
                reasons.append(
                    f"layer '{q(name)}' ({kind}) is in train mode: it normalises with batch statistics "
                    "and updates its running statistics"
                )
            elif not m.track_running_stats:
                reasons.append(
                    f"layer '{q(name)}' ({kind}) has track_running_stats=False: its output depends on the batch"
                )
    return reasons


def _refuse(reasons: list[str], what: str) -> CacheRefusedError:
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    return CacheRefusedError(
        f"cache_features: cannot cache {what}: {shown}. Caching needs a frozen, deterministic module. "
        "Fix: freeze it and pin eval mode first, e.g. `freeze(model, 'backbone', mode='eval')` "
        "(or `module.requires_grad_(False).eval()`), then call cache_features again."
    )


# --------------------------------------------------------------------------- pytree


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(path: str) -> type:
    # Only modules this process has already imported: a disk entry must never make us import
    # code. The wrapped model's own modules are loaded by the time its outputs are read back;
    # anything else is treated as a foreign entry (recomputed).
    mod, _, qual = path.partition(":")
    obj: Any = sys.modules.get(mod)
    if obj is None:
        raise ValueError(f"{path}: module {mod!r} is not imported in this process")
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, (tuple, list, dict))):
        raise ValueError(f"{path} is not a container class")
    return obj


def _flatten(obj: Any, leaves: list[Tensor]) -> Any:
    """Flatten an output into tensor leaves and a JSON-able spec."""
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return ["T", len(leaves) - 1]
    if isinstance(obj, _CONSTANT_TYPES):
        return ["C", obj]
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        if not all(isinstance(k, str) for k in keys):
            raise ArgumentError("cache_features: only string keys are supported in dict outputs")
        return ["D", _class_path(type(obj)), keys, [_flatten(obj[k], leaves) for k in keys]]
    if isinstance(obj, (tuple, list)):
        return ["L", _class_path(type(obj)), [_flatten(v, leaves) for v in obj]]
    raise ArgumentError(
        f"cache_features: the module returned a {type(obj).__name__}; expected tensors, or tuples, "
        "lists and dicts of tensors (and None/numbers/strings). Wrap the module so it returns tensors."
    )


def _unflatten(spec: Any, leaves: list[Tensor] | tuple[Tensor, ...]) -> Any:
    tag = spec[0]
    if tag == "T":
        return leaves[spec[1]]
    if tag == "C":
        return spec[1]
    if tag == "D":
        cls = _resolve_class(spec[1])
        items = {k: _unflatten(s, leaves) for k, s in zip(spec[2], spec[3])}
        if hasattr(cls, "to_tuple"):  # transformers ModelOutput
            return cls(**items)
        return cls(items)
    if tag == "L":
        cls = _resolve_class(spec[1])
        vals = [_unflatten(s, leaves) for s in spec[2]]
        if cls in (tuple, list):
            return cls(vals)
        if hasattr(cls, "_fields"):  # namedtuple
            return cls(*vals)
        return cls(vals)
    raise ValueError(f"bad spec tag {tag!r}")


def _flatten_inputs(obj: Any, leaves: list[Tensor], path: str) -> Any:
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return ("T",)
    if isinstance(obj, _CONSTANT_TYPES):
        return ("C", type(obj).__name__, repr(obj))
    if isinstance(obj, torch.dtype):
        return ("C", "dtype", str(obj))
    if isinstance(obj, Mapping):
        # repr, not str: the keys 1 and "1" must not give the same signature
        return ("D", tuple((repr(k), _flatten_inputs(v, leaves, f"{path}[{k!r}]")) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return ("L", tuple(_flatten_inputs(v, leaves, f"{path}[{i}]") for i, v in enumerate(obj)))
    raise ArgumentError(
        f"cache_features: argument {path} is a {type(obj).__name__}, which cannot be hashed; expected "
        "tensors, numbers, strings, None, or tuples/lists/dicts of them. Pass it as a tensor, or bind it "
        "into the module (e.g. with functools.partial inside a small wrapper module)."
    )


# --------------------------------------------------------------------------- stats


@dataclass
class CacheStats:
    """Counters of a :class:`FeatureCache` (per process).

    ``hits``/``misses`` count entries (samples with ``granularity="sample"``,
    calls with ``"batch"``); ``bytes`` is the memory held now.

    >>> s = CacheStats(hits=3, misses=1)
    >>> s.hit_rate, s.to_dict()["hits"]
    (0.75, 3)
    """

    hits: int = 0
    misses: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    disk_writes: int = 0
    corrupt: int = 0
    evictions: int = 0
    skipped: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0
    call_seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def overhead_seconds(self) -> float:
        """Time spent in the cache itself (hashing, lookups, storing): calls minus the wrapped module's compute."""
        return max(0.0, self.call_seconds - self.compute_seconds)

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0.0 before the first lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (plus ``hit_rate``)."""
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["overhead_seconds"] = self.overhead_seconds
        return d

    def __str__(self) -> str:
        return (
            f"hits={self.hits} misses={self.misses} (hit rate {self.hit_rate:.1%}; memory {self.memory_hits},"
            f" disk {self.disk_hits}) entries={self.entries} bytes={self.bytes}/{self.max_bytes}"
            f" evictions={self.evictions} disk_writes={self.disk_writes} corrupt={self.corrupt}"
            f" time in cache {self.overhead_seconds * 1000:.1f} ms (+{self.compute_seconds * 1000:.1f} ms computing)"
        )


# --------------------------------------------------------------------------- disk


def _dtype_from_str(s: str) -> torch.dtype:
    name = s.split(".", 1)[1] if s.startswith("torch.") else s
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {s!r}")
    return dt


def _encode_entry(key: str, spec: Any, leaves: tuple[Tensor, ...]) -> bytes:
    metas = []
    chunks: list[bytes | memoryview] = []
    offset = 0
    for t in leaves:
        mv = _as_bytes(t)
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


def _decode_entry(raw: bytes, key: str) -> tuple[Any, tuple[Tensor, ...]]:
    """Decode a cache file; raises ValueError for anything corrupted or foreign."""
    if len(raw) < len(_MAGIC) + 8 + _DIGEST or not raw.startswith(_MAGIC):
        raise ValueError("bad magic or truncated")
    (hlen,) = struct.unpack_from("<Q", raw, len(_MAGIC))
    start = len(_MAGIC) + 8
    body = memoryview(raw)[start : len(raw) - _DIGEST]
    if hlen > len(body):
        raise ValueError("bad header length")
    if hashlib.sha256(body).digest() != raw[len(raw) - _DIGEST :]:
        raise ValueError("checksum mismatch")
    header = json.loads(bytes(body[:hlen]))
    if header.get("key") != key:
        raise ValueError("entry belongs to another key")
    data = bytearray(body[hlen:])
    leaves = []
    for m in header["tensors"]:
        dt = _dtype_from_str(m["dtype"])
        shape = tuple(int(s) for s in m["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            leaves.append(torch.empty(shape, dtype=dt))
            continue
        itemsize = torch.empty((), dtype=dt).element_size()
        if m["nbytes"] != numel * itemsize or m["offset"] + m["nbytes"] > len(data):
            raise ValueError("tensor extent out of range")
        t = torch.frombuffer(data, dtype=dt, count=numel, offset=m["offset"]).reshape(shape)
        leaves.append(t)
    spec = header["spec"]
    _unflatten(spec, leaves)  # validates the spec (classes resolvable)
    return spec, tuple(leaves)


# --------------------------------------------------------------------------- wrapper


class _Entry:
    __slots__ = ("leaves", "nbytes", "spec")

    def __init__(self, spec: Any, leaves: tuple[Tensor, ...]) -> None:
        self.spec = spec
        self.leaves = leaves
        self.nbytes = sum(t.numel() * t.element_size() for t in leaves)


class FeatureCache(nn.Module):
    """A frozen module whose outputs are memoised by input content (see :func:`cache_features`).

    Attributes:
        module: the wrapped module (the way back: assign it where the cache was).

    >>> model = nn.Sequential(nn.Linear(3, 3).requires_grad_(False).eval(), nn.Linear(3, 1))
    >>> model[0] = cache_features(model[0])
    >>> _ = model(torch.ones(2, 3)); _ = model(torch.ones(2, 3))
    >>> model[0].stats().hits, list(model.state_dict())[:1]
    (2, ['0.weight'])
    >>> model[0] = model[0].module  # the way back
    """

    #: it computes misses under ``no_grad`` and refuses inputs that require grad, so a
    #: ``Composite`` need not check its parameters on every call
    manages_autograd = True

    def __init__(
        self,
        module: nn.Module,
        *,
        max_bytes: int,
        directory: str | os.PathLike[str] | None,
        granularity: Literal["sample", "batch"],
        salt: str,
    ) -> None:
        super().__init__()
        self.module = module
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self.granularity = granularity
        self.salt = salt
        self.training = module.training
        self._init_runtime()
        # In-memory keys only need to change when the module changes: a per-instance id plus a
        # generation bumped on every change (cheap). Disk keys must mean the same in every process,
        # so they use the content fingerprint (all weight bytes hashed), computed only when needed.
        self._instance = uuid.uuid4().hex
        self._generation = 0
        self._fingerprint: str | None = None
        self._watch = _ModuleWatch(module)
        if self.directory is not None:
            self._fingerprint = module_fingerprint(module, salt=salt)
        post = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post(_strip_module_prefix)
        self.register_load_state_dict_pre_hook(_add_module_prefix)

    # -- plumbing -----------------------------------------------------------
    def _init_runtime(self) -> None:
        self._store: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = CacheStats(max_bytes=self.max_bytes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_store", "_bytes", "_lock", "_stats"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            attr = getattr(inner, name)
            if name == "forward_features" and callable(attr):
                return lambda *a, **k: self._cached_call("forward_features", attr, a, k)
            return attr

    def train(self, mode: bool = True) -> FeatureCache:
        """Set the wrapper's flag only: the cached module keeps the modes it was wrapped with."""
        if not isinstance(mode, bool):
            raise ArgumentError(f"train: mode must be a bool, got {mode!r}")
        self.training = mode
        return self

    def extra_repr(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory is not None else ""
        return f"max_bytes={self.max_bytes}, granularity={self.granularity!r}{where}"

    # -- public -------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Fingerprint of the wrapped module (weights, buffers, structure, modes, salt)."""
        self._check_module()
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.module, salt=self.salt)
        return self._fingerprint

    def _key_base(self) -> str:
        if self.directory is None:
            return f"mem-{self._instance}-{self._generation}"
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.module, salt=self.salt)
        return self._fingerprint

    def stats(self) -> CacheStats:
        """A snapshot of the counters (hits, misses, bytes, ...) of this process."""
        with self._lock:
            s = CacheStats(**{k: v for k, v in asdict(self._stats).items()})
            s.entries = len(self._store)
            s.bytes = self._bytes
        return s

    def clear(self, *, disk: bool = False) -> None:
        """Drop every in-memory entry (and with ``disk=True`` this cache's directory files).

        It also recomputes the module's fingerprint on the next call, so after an
        untracked weight change (a write through ``.data``) neither memory nor disk
        entries of the old weights are returned.

        >>> cached = cache_features(nn.Linear(2, 2).requires_grad_(False).eval())
        >>> _ = cached(torch.ones(1, 2)); cached.clear(); cached.stats().entries
        0
        """
        with self._lock:
            self._store.clear()
            self._bytes = 0
            self._generation += 1
            self._fingerprint = None
        if disk and self.directory is not None and self.directory.exists():
            for f in self.directory.glob("*/*.tfc"):
                try:
                    f.unlink()
                except OSError:
                    pass

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's output, from the cache when the inputs were seen before."""
        return self._cached_call("forward", self.module, args, kwargs)

    # -- checks -------------------------------------------------------------
    def _check_module(self) -> None:
        if self._watch.module is not self.module:  # `cached.module = other`: a new module, new keys
            reasons = cache_refusal_reasons(self.module)
            if reasons:
                raise _refuse(reasons, "the wrapped module any more (it was replaced after cache_features)")
            self._watch = _ModuleWatch(self.module)
            self._fingerprint = None
            self._generation += 1
            return
        token = self._watch.poll()
        if token is None:
            return
        reasons = cache_refusal_reasons(self.module)
        if reasons:  # the token is not accepted: every later call checks again
            raise _refuse(reasons, "the wrapped module any more (it changed after cache_features)")
        self._fingerprint = None
        self._generation += 1
        self._watch.accept(token)

    # -- core ---------------------------------------------------------------
    def _cached_call(self, method: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return self._cached_call_inner(method, fn, args, kwargs)
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self._stats.call_seconds += dt

    def _cached_call_inner(self, method: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._check_module()
        leaves: list[Tensor] = []
        sig = _flatten_inputs((args, kwargs), leaves, "inputs")
        if torch.is_grad_enabled():
            for i, t in enumerate(leaves):
                if t.requires_grad:
                    raise CacheRefusedError(
                        f"cache_features: input tensor #{i} of the cached module requires grad, so something "
                        "before the module trains; a cached output would cut that gradient path. Fix: freeze "
                        "what comes before too, or do not cache this module (see torchfreeze.explain)."
                    )
        autocast = _autocast_state()
        prefix = hashlib.sha256()
        prefix.update(f"tfc-key-1|{self._key_base()}|{method}|{self.granularity}|{sig!r}|{autocast}|".encode())
        if self.granularity == "batch":
            return self._call_batch(prefix, fn, args, kwargs, leaves)
        return self._call_sample(prefix, fn, args, kwargs, leaves)

    def _compute(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self._stats.compute_seconds += dt

    def _call_batch(self, prefix: Any, fn: Any, args: Any, kwargs: Any, leaves: list[Tensor]) -> Any:
        for t in leaves:
            _hash_tensor(prefix, t)
        key = prefix.hexdigest()[:40]
        entry = self._lookup(key)
        device = leaves[0].device if leaves else None
        if entry is not None:
            out_leaves = [t.to(device) if device is not None else t for t in entry.leaves]
            out_leaves = [t.clone() if t is s else t for t, s in zip(out_leaves, entry.leaves)]
            return _unflatten(entry.spec, out_leaves)
        out = self._compute(fn, args, kwargs)
        out_leaves_l: list[Tensor] = []
        spec = _flatten(out, out_leaves_l)
        self._insert(key, _Entry(spec, tuple(t.detach().clone() for t in out_leaves_l)))
        return out

    def _call_sample(self, prefix: Any, fn: Any, args: Any, kwargs: Any, leaves: list[Tensor]) -> Any:
        if not leaves:
            raise ArgumentError(
                "cache_features: granularity='sample' needs at least one tensor input with a batch "
                "dimension; got none. Use granularity='batch'."
            )
        n = leaves[0].shape[0] if leaves[0].dim() > 0 else -1
        for i, t in enumerate(leaves):
            if t.dim() == 0 or t.shape[0] != n:
                raise ArgumentError(
                    "cache_features: with granularity='sample' every tensor input must share the leading "
                    f"batch dimension; input #0 has shape {tuple(leaves[0].shape)} and input #{i} has "
                    f"{tuple(t.shape)}. Use granularity='batch' for such modules."
                )
        views = [_as_bytes(t) for t in leaves]
        row_meta = "".join(f"{t.dtype}|{tuple(t.shape[1:])}|" for t in leaves).encode()
        prefix.update(row_meta)
        # one pass over each contiguous input buffer: row r of every input is a slice of its view
        keys: list[str] = []
        if len(views) == 1:
            mv = views[0]
            rb = mv.nbytes // n if n else 0
            for start in range(0, rb * n, rb) if rb else [0] * n:
                h = prefix.copy()
                h.update(mv[start : start + rb])
                keys.append(h.hexdigest()[:40])
        else:
            rbs = [mv.nbytes // n if n else 0 for mv in views]
            for r in range(n):
                h = prefix.copy()
                for mv, rb in zip(views, rbs):
                    h.update(mv[r * rb : (r + 1) * rb])
                keys.append(h.hexdigest()[:40])
        found = self._lookup_many(keys)
        missing = [r for r, e in enumerate(found) if e is None]
        device = leaves[0].device
        if len(missing) == n:
            out = self._compute(fn, args, kwargs)
            out_leaves: list[Tensor] = []
            spec = _flatten(out, out_leaves)
            self._check_rows(out_leaves, n)
            self._insert_many(
                [(keys[r], _Entry(spec, tuple(t[r].detach().clone() for t in out_leaves))) for r in range(n)]
            )
            return out
        if missing:
            idx = torch.tensor(missing, device=device)
            sub_args, sub_kwargs = _take_rows((args, kwargs), idx)
            out = self._compute(fn, sub_args, sub_kwargs)
            sub_leaves: list[Tensor] = []
            spec = _flatten(out, sub_leaves)
            self._check_rows(sub_leaves, len(missing))
            new = []
            for j, r in enumerate(missing):
                e = _Entry(spec, tuple(t[j].detach().clone() for t in sub_leaves))
                found[r] = e
                new.append((keys[r], e))
            self._insert_many(new)
        entries: list[_Entry] = found  # type: ignore[assignment]
        spec = entries[0].spec
        for e in entries:
            if e.spec is not spec and e.spec != spec:
                raise ArgumentError(
                    "cache_features: the cached rows of this batch have different output structures; "
                    "use granularity='batch' for this module."
                )
        n_leaves = len(entries[0].leaves)
        return _unflatten(spec, [_stack_rows([e.leaves[j] for e in entries], device) for j in range(n_leaves)])

    @staticmethod
    def _check_rows(out_leaves: list[Tensor], n: int) -> None:
        for i, t in enumerate(out_leaves):
            if t.dim() == 0 or t.shape[0] != n:
                raise ArgumentError(
                    f"cache_features: with granularity='sample' every output tensor needs the batch size {n} "
                    f"as its first dimension; output #{i} has shape {tuple(t.shape)}. "
                    "Use granularity='batch' for this module."
                )

    # -- store --------------------------------------------------------------
    def _lookup(self, key: str) -> _Entry | None:
        return self._lookup_many([key])[0]

    def _lookup_many(self, keys: list[str]) -> list[_Entry | None]:
        """Entries for ``keys`` (None where absent): memory first, then disk; one lock for the memory pass."""
        with self._lock:
            store = self._store
            found: list[_Entry | None] = [store.get(k) for k in keys]
            hits = 0
            for k, e in zip(keys, found):
                if e is not None:
                    store.move_to_end(k)
                    hits += 1
            self._stats.hits += hits
            self._stats.memory_hits += hits
        if hits == len(keys):
            return found
        misses = 0
        for r, k in enumerate(keys):
            if found[r] is not None:
                continue
            e = self._read_disk(k) if self.directory is not None else None
            if e is not None:
                with self._lock:
                    self._stats.hits += 1
                    self._stats.disk_hits += 1
                self._insert(k, e, write=False)
                found[r] = e
            else:
                misses += 1
        with self._lock:
            self._stats.misses += misses
        return found

    def _insert(self, key: str, entry: _Entry, *, write: bool = True) -> None:
        self._insert_many([(key, entry)], write=write)

    def _insert_many(self, items: list[tuple[str, _Entry]], *, write: bool = True) -> None:
        if write and self.directory is not None:
            for key, entry in items:
                self._write_disk(key, entry)
        with self._lock:
            for key, entry in items:
                if entry.nbytes > self.max_bytes:
                    self._stats.skipped += 1
                    continue
                old = self._store.pop(key, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._store[key] = entry
                self._bytes += entry.nbytes
                while self._bytes > self.max_bytes and self._store:
                    _, ev = self._store.popitem(last=False)
                    self._bytes -= ev.nbytes
                    self._stats.evictions += 1

    def _path(self, key: str) -> Path:
        return Path(self.directory or ".") / key[:2] / f"{key}.tfc"

    def _read_disk(self, key: str) -> _Entry | None:
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        try:
            spec, leaves = _decode_entry(raw, key)
        except Exception:
            with self._lock:
                self._stats.corrupt += 1
            return None
        return _Entry(spec, leaves)

    def _write_disk(self, key: str, entry: _Entry) -> None:
        path = self._path(key)
        data = _encode_entry(key, entry.spec, entry.leaves)
        path.parent.mkdir(parents=True, exist_ok=True)
        # an entry can always be recomputed: the rename makes it atomic, no fsync needed
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), durable=False)
        with self._lock:
            self._stats.disk_writes += 1


def _autocast_state() -> tuple[Any, ...]:
    out = []
    for dev in ("cpu", "cuda"):
        try:
            on = torch.is_autocast_enabled(dev)
            out.append((dev, on, str(torch.get_autocast_dtype(dev)) if on else ""))
        except (TypeError, AttributeError, RuntimeError):  # older torch
            out.append((dev, torch.is_autocast_enabled() if dev == "cuda" else False, ""))
    return tuple(out)


def _stack_rows(rows: list[Tensor], device: torch.device) -> Tensor:
    """Stack cached rows into a batch on ``device`` (one copy when every row is already there)."""
    try:
        out = torch.stack(rows)
    except RuntimeError:  # rows on different devices (e.g. some read back from disk)
        return torch.stack([t.to(device) for t in rows])
    return out if out.device == device else out.to(device)


def _take_rows(obj: Any, idx: Tensor) -> Any:
    if isinstance(obj, Tensor):
        return obj.index_select(0, idx.to(obj.device))
    if isinstance(obj, Mapping):
        return (
            type(obj)({k: _take_rows(v, idx) for k, v in obj.items()})
            if type(obj) is not dict
            else {k: _take_rows(v, idx) for k, v in obj.items()}
        )
    if isinstance(obj, tuple):
        vals = [_take_rows(v, idx) for v in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else type(obj)(vals)
    if isinstance(obj, list):
        return [_take_rows(v, idx) for v in obj]
    return obj


def _strip_module_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    inner = prefix + "module."
    keys = [k for k in state_dict if k.startswith(inner)]
    for k in keys:
        state_dict[prefix + k[len(inner) :]] = state_dict.pop(k)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for k in [k for k in meta if k == inner[:-1] or k.startswith(inner)]:
            meta[prefix + k[len(inner) :]] = meta.pop(k)


def _add_module_prefix(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    inner = prefix + "module."
    keys = [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]
    for k in keys:
        state_dict[inner + k[len(prefix) :]] = state_dict.pop(k)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for k in [k for k in meta if k.startswith(prefix) and k != prefix[:-1] and not k.startswith(inner)]:
            meta[inner + k[len(prefix) :]] = meta.pop(k)


def cache_features(
    module: nn.Module,
    *,
    max_bytes: int = 1 << 30,
    directory: str | os.PathLike[str] | None = None,
    granularity: Literal["sample", "batch"] = "sample",
    salt: str = "",
) -> FeatureCache:
    """Memoise a frozen, deterministic module's outputs by the content of its inputs.

    Assign the result back where the module lived:
    ``model.backbone = cache_features(model.backbone)``. ``cached.module`` is the
    way back. See the module docstring (and docs/speed.md) for the semantics.

    Args:
        module: a module with no trainable parameters and nothing random in its
            current mode (pin eval first, e.g. ``freeze(model, "backbone", mode="eval")``).
        max_bytes: in-memory budget in bytes; least recently used entries are dropped.
        directory: optional directory for a persistent cache shared across runs
            and DataLoader workers (created on first write).
        granularity: ``"sample"`` caches each row of the batch (works with
            shuffling; assumes rows are independent), ``"batch"`` caches whole calls.
        salt: text mixed into every key (e.g. a version of your preprocessing).

    Returns:
        A :class:`FeatureCache` module wrapping ``module``.

    Raises:
        CacheRefusedError: the module has a trainable parameter or a stochastic
            layer (the message names them); nothing is changed.
        ArgumentError: a bad ``max_bytes``, ``granularity``, ``directory`` or module.

    >>> enc = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).requires_grad_(False).eval()
    >>> cached = cache_features(enc)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(cached(x), cached(x))
    True
    >>> cached.stats().hits, cached.stats().misses
    (5, 5)
    """
    if isinstance(module, FeatureCache):
        raise ArgumentError(
            "cache_features: module is already a FeatureCache; expected the plain module. "
            "Use it as it is, or pass `cached.module` to build a cache with other settings."
        )
    if not isinstance(module, nn.Module):
        raise ArgumentError(
            f"cache_features: module must be a torch.nn.Module, got {type(module).__name__}. "
            "Pass the frozen sub-module, e.g. `cache_features(model.backbone)`."
        )
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ArgumentError(
            f"cache_features: max_bytes must be a non-negative int (bytes), got {max_bytes!r}; e.g. 2**30 for 1 GiB."
        )
    if granularity not in ("sample", "batch"):
        raise ArgumentError(f"cache_features: granularity must be 'sample' or 'batch', got {granularity!r}.")
    if not isinstance(salt, str):
        raise ArgumentError(f"cache_features: salt must be a str, got {type(salt).__name__}.")
    if directory is not None:
        if not isinstance(directory, (str, os.PathLike)):
            raise ArgumentError(f"cache_features: directory must be a path or None, got {type(directory).__name__}.")
        if Path(directory).exists() and not Path(directory).is_dir():
            raise ArgumentError(
                f"cache_features: directory {str(directory)!r} exists and is not a directory; pass a directory path."
            )
    reasons = cache_refusal_reasons(module)
    if reasons:
        raise _refuse(reasons, f"this {type(module).__name__}")
    return FeatureCache(module, max_bytes=max_bytes, directory=directory, granularity=granularity, salt=salt)
