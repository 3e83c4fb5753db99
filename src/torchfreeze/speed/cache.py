"""Feature cache: memoise a frozen, deterministic module's outputs.

``cache_features(module)`` returns a :class:`FeatureCache` wrapper. Assign it
back where the module lived (``model.backbone = cache_features(model.backbone)``);
that is the one call. The wrapper

* keys every output by the *content* of the inputs (a 128-bit hash per row of the
  tensor bytes, with their dtypes and shapes: on the CPU xxh3-128 with the optional
  ``xxhash`` package, else SHA-256; on an accelerator a vectorised hash in torch
  operations on the tensor's own device, never a copy to the host;
  never the sample's index: augmented data simply misses and stays correct) plus the
  wrapped module's weights, buffers, structure and train/eval flags
  (:mod:`torchfreeze.speed.keys`);
* by default caches per sample (``granularity="sample"``): each row of the batch
  is its own entry, so a shuffled ``DataLoader`` hits the cache from the second
  epoch on. This assumes the module treats the rows of a batch independently,
  which holds for eval-mode networks; use ``granularity="batch"`` otherwise. Rows are
  kept in preallocated slabs, one per output tensor (:mod:`torchfreeze.speed.slabs`):
  a batch of hits is one key pass, one dict lookup per row and one ``index_select``
  per output tensor, on the device the outputs were computed on;
* keeps entries in memory within ``max_bytes`` (per-sample rows: oldest first out;
  whole calls: least recently used first out), and optionally in a directory on
  disk (safetensors files, atomic writes; every file carries its key and an HMAC
  under the directory's own secret, so a corrupted, foreign or planted entry is
  detected, counted and recomputed, never returned; a failed write is counted and
  skipped) (:mod:`torchfreeze.speed.storage`);
* refuses a module with trainable parameters or stochastic behaviour (dropout in
  train mode, BatchNorm using batch statistics), naming the parameter or layer,
  both when it is wrapped and on every call, so a later ``unfreeze`` is caught
  (:mod:`torchfreeze.speed.refusal`);
* keeps the wrapped module's train/eval flags as they were when wrapped:
  ``model.train()`` does not reach through the cache;
* leaves ``state_dict`` keys unchanged (the wrapper adds no ``module.`` prefix
  to saved or loaded keys); ``parameters()`` names do show the ``.module`` level;
* pickles (and deep-copies) without its in-memory entries, so it works in
  ``DataLoader`` workers (each worker has its own memory; a shared ``directory``
  lets them share).

The way back is ``cached.module`` (the original module, untouched).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torchfreeze._core.canonical import make_state_dict_transparent
from torchfreeze._core.checks import require_choice, require_module, short_repr
from torchfreeze._core.uses import FrozenOnly
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CacheRefusedError
from torchfreeze.speed._entry import Entry, detached, flatten_output
from torchfreeze.speed._rows import SampleRows
from torchfreeze.speed.keys import ModuleWatch, fast_signature, key_salt, module_fingerprint, row_keys_fast
from torchfreeze.speed.refusal import cache_refusal_reasons, refusal_error
from torchfreeze.speed.storage import CacheStats, EntryStore

__all__ = ["cache_features", "FeatureCache"]

Granularity = Literal["sample", "batch"]


class FeatureCache(SampleRows, FrozenOnly):
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
    #: ``state_dict`` keys do not show the ``module`` level: freeze states and trainable checkpoints
    #: name tensors and modules the same with or without the cache (``torchfreeze._core.canonical``)
    state_dict_transparent_child = "module"

    def __init__(
        self,
        module: nn.Module,
        *,
        max_bytes: int,
        directory: str | os.PathLike[str] | None,
        granularity: Granularity,
        salt: str,
    ) -> None:
        super().__init__()
        self.module = module
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self.granularity: Granularity = granularity
        self.salt = salt
        self.training = module.training
        self._store = EntryStore(self.max_bytes, self.directory)
        # In-memory keys only need to change when the module changes: a per-instance id plus a
        # generation bumped on every change (cheap). Disk keys must mean the same in every process,
        # so they use the content fingerprint (all weight bytes hashed), computed only when needed.
        self._instance = uuid.uuid4().hex
        self._generation = 0
        self._fingerprint: str | None = None
        self._watch: ModuleWatch | None = ModuleWatch(module)
        if self.directory is not None:
            self._fingerprint = module_fingerprint(module, salt=salt)
        make_state_dict_transparent(self)

    # -- plumbing -----------------------------------------------------------
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

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_watch"] = None  # rebuilt on the next call, over the (copied) module
        return state

    def train(self, mode: bool = True) -> FeatureCache:
        """Set the wrapper's flag only: the cached module keeps the modes it was wrapped with."""
        if not isinstance(mode, bool):
            raise ArgumentTypeError(f"train(mode={mode!r}): expected True or False, got {type(mode).__name__}.")
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

    def stats(self) -> CacheStats:
        """A snapshot of the counters (hits, misses, bytes, ...) of this process."""
        return self._store.snapshot()

    def clear(self, *, disk: bool = False) -> None:
        """Drop every in-memory entry (and with ``disk=True`` this cache's directory files).

        It also recomputes the module's fingerprint on the next call, so after an
        untracked weight change (a write through ``.data``) neither memory nor disk
        entries of the old weights are returned.

        >>> cached = cache_features(nn.Linear(2, 2).requires_grad_(False).eval())
        >>> _ = cached(torch.ones(1, 2)); cached.clear(); cached.stats().entries
        0
        """
        with self._store.lock:
            self._generation += 1
            self._fingerprint = None
        self._store.clear(disk=disk)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's output, from the cache when the inputs were seen before."""
        module: nn.Module = self._modules["module"]  # type: ignore[assignment]  # faster than self.module
        return self._cached_call("forward", module, args, kwargs)

    # -- checks -------------------------------------------------------------
    def _key_base(self) -> str:
        if self.directory is None:
            return f"mem-{self._instance}-{self._generation}"
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.module, salt=self.salt)
        return self._fingerprint

    def _changed(self) -> None:
        self._fingerprint = None
        self._generation += 1
        with self._store.lock:
            self._store.rows.clear()  # their keys are of the old module: never reachable again

    def _check_module(self) -> None:
        watch = self._watch
        if watch is None or watch.module is not self._modules["module"]:  # `cached.module = other`, or unpickled
            reasons = cache_refusal_reasons(self.module)
            if reasons:
                raise refusal_error(reasons, "the wrapped module any more (it was replaced after cache_features)")
            self._watch = ModuleWatch(self.module)
            if watch is not None:
                self._changed()
            return
        token = watch.poll()
        if token is None:
            return
        reasons = cache_refusal_reasons(self.module)
        if reasons:  # the token is not accepted: every later call checks again
            raise refusal_error(reasons, "the wrapped module any more (it changed after cache_features)")
        self._changed()
        watch.accept(token)

    # -- core ---------------------------------------------------------------
    def _cached_call(self, method: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        t0 = time.perf_counter()
        try:
            self._check_module()
            signature, leaves = fast_signature(args, kwargs)
            if torch.is_grad_enabled():
                for i, t in enumerate(leaves):
                    if t.requires_grad:
                        raise CacheRefusedError(
                            f"cache_features: input tensor #{i} of the cached module requires grad, so something "
                            "before the module trains; a cached output would cut that gradient path. Fix: freeze "
                            "what comes before too, or do not cache this module (see torchfreeze.explain)."
                        )
            if self.granularity == "batch":
                return self._call_batch(method, signature, fn, args, kwargs, leaves)
            return self._call_sample(method, signature, fn, args, kwargs, leaves)
        finally:
            dt = time.perf_counter() - t0
            with self._store.lock:
                self._store.stats.call_seconds += dt

    def _compute(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                return fn(*args, **kwargs)
        finally:
            if self._watch is not None:
                self._watch.rebase_attributes()  # counters the module keeps itself are not a change
            dt = time.perf_counter() - t0
            with self._store.lock:
                self._store.stats.compute_seconds += dt

    def _call_batch(
        self,
        method: str,
        signature: tuple[Any, ...],
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        leaves: list[Tensor],
    ) -> Any:
        shapes = tuple((t.dtype, tuple(t.shape)) for t in leaves)
        salt = key_salt(self._key_base(), method, "batch", (signature, shapes))
        whole = [t.reshape(1, -1) for t in leaves]  # one "row" per call
        key = (row_keys_fast(whole, 1, salt=salt)[0] if whole else salt).hex()
        entry = self._store.lookup([key])[0]
        device = leaves[0].device if leaves else None
        if entry is not None:
            out: list[Any] = []
            for leaf in entry.leaves:
                if isinstance(leaf, Tensor):
                    moved = leaf.to(device) if device is not None else leaf
                    leaf = moved.clone() if moved is leaf else moved  # never hand out the stored tensor
                out.append(leaf)
            return entry.output(out)
        result = self._compute(fn, args, kwargs)
        spec, out_leaves = flatten_output(result)
        self._store.insert([(key, Entry(spec, tuple(detached(x) for x in out_leaves)))])
        return result


def cache_features(
    module: nn.Module,
    *,
    max_bytes: int = 1 << 30,
    directory: str | os.PathLike[str] | None = None,
    granularity: Granularity = "sample",
    salt: str = "",
) -> FeatureCache:
    """Memoise a frozen, deterministic module's outputs by the content of its inputs.

    Assign the result back where the module lived:
    ``model.backbone = cache_features(model.backbone)``. ``cached.module`` is the
    way back. See the module docstring (and docs/speed.md) for the semantics.

    Args:
        module: a module with no trainable parameters and nothing random in its
            current mode (pin eval first, e.g. ``freeze(model, "backbone", mode="eval")``).
        max_bytes: in-memory budget in bytes (slab capacity included); per-sample rows go oldest
            first, whole calls (``granularity="batch"``) least recently used first.
        directory: optional directory for a persistent cache shared across runs
            and DataLoader workers (created on first write).
        granularity: ``"sample"`` caches each row of the batch (works with
            shuffling; assumes rows are independent), ``"batch"`` caches whole calls.
        salt: text mixed into every key (e.g. a version of your preprocessing).

    Returns:
        A :class:`FeatureCache` module wrapping ``module``.

    Raises:
        ArgumentTypeError: ``module`` is not an ``nn.Module``, or ``max_bytes``,
            ``salt`` or ``directory`` is of the wrong type.
        CacheRefusedError: the module has a trainable parameter or a stochastic
            layer (the message names them); nothing is changed.
        ArgumentError: a negative ``max_bytes``, an unknown ``granularity``, a
            ``directory`` that is a file or the empty string, or ``module`` is already a :class:`FeatureCache`.
        ImportError: ``directory`` is given and the ``safetensors`` package (the ``io`` extra) is missing.

    >>> enc = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).requires_grad_(False).eval()
    >>> cached = cache_features(enc)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(cached(x), cached(x))
    True
    >>> cached.stats().hits, cached.stats().misses
    (5, 5)
    """
    require_module(module, "cache_features", "module")
    if isinstance(module, FeatureCache):
        raise ArgumentError(
            "cache_features: module is already a FeatureCache; expected the plain module. "
            "Use it as it is, or pass `cached.module` to build a cache with other settings."
        )
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise ArgumentTypeError(
            f"cache_features(max_bytes={short_repr(max_bytes)}): expected an int (bytes), got "
            f"{type(max_bytes).__name__}. Fix: pass e.g. max_bytes=2**30 for 1 GiB."
        )
    if max_bytes < 0:
        raise ArgumentError(
            f"cache_features(max_bytes={max_bytes!r}): expected a non-negative number of bytes. "
            "Fix: pass e.g. max_bytes=2**30 for 1 GiB (0 keeps nothing in memory)."
        )
    require_choice(granularity, ("sample", "batch"), "cache_features", "granularity")
    if not isinstance(salt, str):
        raise ArgumentTypeError(
            f"cache_features(salt={short_repr(salt)}): expected a str, got {type(salt).__name__}. "
            "Fix: pass a version string, e.g. salt='preprocessing-v2'."
        )
    if directory is not None:
        if not isinstance(directory, (str, os.PathLike)):
            raise ArgumentTypeError(
                f"cache_features(directory={short_repr(directory)}): expected a path or None, got "
                f"{type(directory).__name__}. Fix: pass a directory path such as 'cache/'."
            )
        if not os.fspath(directory):
            raise ArgumentError(
                "cache_features(directory=''): expected a directory path; the empty string would write into "
                "the current directory. Fix: pass directory='feature-cache/' (or None for memory only)."
            )
        try:
            import safetensors.torch  # noqa: F401 - the entry files are safetensors
        except ImportError as error:  # pragma: no cover - environment dependent
            raise ImportError(
                "cache_features(directory=...) writes safetensors files and needs the safetensors package: "
                "pip install 'torchfreeze[io]' (or pass directory=None for a memory-only cache)."
            ) from error
        if Path(directory).exists() and not Path(directory).is_dir():
            raise ArgumentError(
                f"cache_features(directory={short_repr(str(directory))}): the path exists and is not a directory. "
                "Fix: pass a directory path (it is created if missing)."
            )
    reasons = cache_refusal_reasons(module)
    if reasons:
        raise refusal_error(reasons, f"this {type(module).__name__}")
    return FeatureCache(module, max_bytes=max_bytes, directory=directory, granularity=granularity, salt=salt)
