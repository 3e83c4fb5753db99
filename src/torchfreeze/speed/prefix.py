"""Prefix caching: skip a model's frozen leading layer groups once their outputs are known.

``cache_frozen_prefix(model)`` installs two hooks on ``model`` and returns a
:class:`PrefixCache` handle. On every forward call it looks at the model's layer
groups (:func:`torchfreeze.layer_groups`, or ``groups=``) and finds the *frozen
prefix*: the leading groups whose parameters are all frozen and whose modules are
deterministic in their current mode (dropout off, BatchNorm on running
statistics; the rule of :func:`torchfreeze.speed.cache_refusal_reasons`). Whatever
froze them (``freeze``, ``freeze_to``, ``ProgressiveFreezing``) does not matter:
the prefix is read from the model on each call, so it follows a schedule.

* **Capture.** When a batch has rows the cache has not seen, the forward runs in
  full and the output of the *boundary* (the last module of the prefix to run
  before anything after the prefix runs) is stored per sample, keyed by the
  content of the model's inputs (:func:`torchfreeze.speed.keys.row_keys_fast`),
  in preallocated slabs (:class:`torchfreeze.speed.slabs.SlabStore`).
* **Replay.** When every row of a batch is known, the prefix's modules are
  skipped for that call: the boundary returns the stored rows, and the modules
  before it return zero placeholders of their recorded output shapes.
* **Verification.** Before the first replay at each boundary, the model runs once
  both ways (same random state, buffers restored) and the outputs must agree;
  otherwise the model uses the prefix by another path than the boundary's output
  (a skip connection, a mask computed from an early output) and this prefix is
  never replayed: the handle's ``stats().refused`` says why, and training goes
  on uncached and correct.

Keys include the model's input structure, the autocast state and a token of the
prefix's parameters (identity, storage, in-place version) and modes, so loading
other weights into the prefix or changing its mode starts a new store. A write
through ``.data`` bypasses version counters: call :meth:`PrefixCache.clear` then.
Rows must be independent (as for ``cache_features(granularity="sample")``): the
prefix of an eval-mode network treats the rows of a batch separately.

The idea of caching a frozen prefix's activations comes from AutoFreeze (Liu et
al. 2021, arXiv:2102.01386) and Egeria (Wang et al., EuroSys 2023).
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from torchfreeze._core import tree
from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.select import Selector
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.speed._prefix_groups import Groups, loose_modules, modes_only, resolve_groups
from torchfreeze.speed._prefix_replay import install_stubs, replay_problem, submodule, ungrouped_randomness
from torchfreeze.speed._prefix_state import Call, PrefixStats, Record, Store, row_shape
from torchfreeze.speed._prefix_watch import FED_BY_TRAINABLE, REPLAY_CAUSES, hooked, loose_marks, watch_order
from torchfreeze.speed.keys import ModuleWatch, autocast_state, row_keys_fast
from torchfreeze.speed.refusal import cache_refusal_reasons
from torchfreeze.speed.slabs import SlabStore

StoreKey = tuple[int, str, tuple[Any, ...]]  # groups frozen, input layout, modes

__all__ = ["cache_frozen_prefix", "PrefixCache", "PrefixStats"]


class PrefixCache:
    """Handle of a model's prefix cache (see :func:`cache_frozen_prefix`); ``remove()`` takes it off.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    >>> _ = model[0].requires_grad_(False)
    >>> prefix = cache_frozen_prefix(model, groups=[["0", "1"], ["2"], ["3"]])
    >>> x = torch.randn(5, 4)
    >>> _ = model(x); _ = model(x)
    >>> prefix.stats().hits, prefix.boundary
    (5, '1')
    >>> prefix.remove()
    """

    def __init__(self, model: nn.Module, groups: Groups, *, max_bytes: int) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self._names = groups.modules  # hooked, and stood in for on a replay
        self._param_names = groups.parameters  # a group may name a parameter directly (a ViT's pos_embed)
        self._modules = [[model.get_submodule(name) for name in group] for group in self._names]
        self._param_marks = [self._marks(g) for g in range(len(self._names))]
        # change detection without walking the model on every call: one watch per group module
        # (speed.keys.ModuleWatch: identities, versions, requires_grad, modes, attributes) and a
        # generation per group, bumped on every change; the frozen depth is re-derived only then
        self._watches = [[ModuleWatch(m) for m in modules] for modules in self._modules]
        self._generations = [0] * len(self._names)
        # modules in no group (a parameter-free Dropout between blocks, the containers): their
        # train/eval flags are part of every store's token, as are the prefix groups' flags
        self._loose = loose_modules(model, self._names)
        self._loose_state = loose_marks(self._loose)
        self._loose_generation = 0
        self._all_params = list(model.parameters())
        self._depth: int | None = None
        # one store per (groups frozen, input layout): dynamic padding gives one layout per length
        self._stores: dict[StoreKey, Store] = {}
        self._stats = PrefixStats()
        self._call: Call | None = None
        self._warned: set[str] = set()
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, always_call=True),
        ]

    # -- public -----------------------------------------------------------------------------
    @property
    def boundary(self) -> str | None:
        """The module whose output the current frozen prefix stores (None before a forward or without a prefix)."""
        return self._stats.boundary

    def stats(self) -> PrefixStats:
        """A snapshot of the counters."""
        snap = PrefixStats(**{**asdict(self._stats), "refused": dict(self._stats.refused)})
        snap.seconds = dict(self._stats.seconds)
        snap.bytes = sum(s.slabs.nbytes for s in self._stores.values())
        return snap

    def clear(self) -> None:
        """Drop every stored row (after a weight change the token cannot see, e.g. through ``.data``)."""
        self._stores.clear()

    def remove(self) -> None:
        """Take the hooks off the model and drop the stored rows; the model is as it was before."""
        if self._call is not None:  # removed from inside a forward (a hook, a callback)
            for handle in self._call.handles:
                handle.remove()
            self._call = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stores.clear()
        ref = _ATTACHED.get(self.model)
        if ref is not None and ref() is self:
            del _ATTACHED[self.model]

    def __repr__(self) -> str:
        return f"PrefixCache(groups={len(self._names)}, boundary={self.boundary!r}, max_bytes={self.max_bytes})"

    # -- the frozen prefix ---------------------------------------------------------------------
    def _marks(self, g: int) -> list[tuple[int, int, int, bool]]:
        params = [self.model.get_parameter(name) for name in self._param_names[g]]
        return [(id(p), p._version, p.data_ptr(), p.requires_grad) for p in params]

    def _group_changed(self, g: int) -> bool:
        """Whether group ``g`` changed since it was last looked at (and take it as it is now).

        A change of train/eval flags only is a change (the frozen depth is derived again) that
        keeps the group's generation: stores are kept per mode, so switching between training
        and evaluation does not throw the stored rows away.
        """
        changed = structural = False
        for i, name in enumerate(self._names[g]):
            current = submodule(self.model, name)
            watch = self._watches[g][i]
            if current is not watch.module:  # the module was replaced in the model
                self._watches[g][i] = ModuleWatch(current)
                self._modules[g][i] = current
                changed = structural = True
                continue
            old = watch.token
            token = watch.poll()
            if token is not None:
                watch.accept(token)
                changed = True
                structural = structural or not modes_only(old, token)
        marks = self._marks(g) if self._param_names[g] else []
        if marks != self._param_marks[g]:
            self._param_marks[g] = marks
            changed = structural = True
        if structural:
            self._generations[g] += 1
        return changed

    def _joinable(self, g: int) -> bool:
        """Whether group ``g`` is frozen and deterministic (cheap ``requires_grad`` test first)."""
        modules = self._modules[g]
        if any(p.requires_grad for m in modules for p in m.parameters()):
            return False
        if any(self.model.get_parameter(name).requires_grad for name in self._param_names[g]):
            return False
        return not any(cache_refusal_reasons(m, prefix=n) for n, m in zip(self._names[g], modules, strict=True))

    def _frozen_depth(self) -> int:
        """How many leading groups are frozen and deterministic now (never the last group)."""
        last = len(self._names) - 1
        depth = self._depth
        changed = [self._group_changed(g) for g in range(depth or 0)]  # every group polled: each takes its new state
        if depth is not None and not any(changed):
            while depth < last and self._joinable(depth):  # more groups froze since
                self._group_changed(depth)  # its current state is the baseline from now on
                depth += 1
            self._depth = depth
            return depth
        depth = 0
        while depth < last:
            self._group_changed(depth)
            if not self._joinable(depth):
                break
            depth += 1
        self._depth = depth
        return depth

    def _loose_changed(self) -> None:
        marks = loose_marks(self._loose)
        try:
            same = marks == self._loose_state
        except (RuntimeError, TypeError, ValueError):  # an attribute that does not compare (an array)
            same = False
        if not same:
            self._loose_state = marks
            self._loose_generation += 1

    def _weights(self, depth: int) -> tuple[Any, ...]:
        """What the rows of a store of ``depth`` groups depend on besides modes: weights, structure, attributes."""
        return (tuple(self._generations[:depth]), self._loose_generation)

    def _modes(self, depth: int) -> tuple[Any, ...]:
        """The flags a store of ``depth`` groups belongs to: autocast, the prefix's and loose modules' modes."""
        modes = [m.training for watches in self._watches[:depth] for watch in watches for m in watch.mods]
        return (autocast_state(), tuple(modes), tuple(m.training for m in self._loose))

    def _token(self, depth: int) -> tuple[Any, ...]:
        return (*self._weights(depth), self._modes(depth))

    # -- hooks ---------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._call is not None:  # a nested call of the model inside its own forward: leave it alone
            return
        started = time.perf_counter()
        self._loose_changed()
        depth = self._frozen_depth()
        self._stats.frozen_groups = depth
        if depth == 0:
            self._stats.boundary = None
            self._begin(Call("off", started=started), "uncached")
            return
        leaves, spec = tree.flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        n = tensors[0].shape[0] if tensors and tensors[0].dim() > 0 else -1
        if (
            n <= 0
            or any(t.dim() == 0 or t.shape[0] != n for t in tensors)
            or any(t.requires_grad or t.layout != torch.strided or t.is_nested for t in tensors)
        ):
            self._begin(Call("off", started=started), "uncached")
            return
        signature = repr(spec) + repr(
            [(t.dtype, tuple(t.shape[1:])) if isinstance(t, Tensor) else repr(t) for t in leaves]
        )
        store = self._store_for(depth, signature)
        self._stats.boundary = store.boundary or self._stats.boundary
        if store.refused:
            self._begin(Call("off", started=started), "uncached")
            return
        keys = row_keys_fast(tensors, n, salt=signature.encode())
        slots = store.slabs.lookup(keys)
        grad = torch.is_grad_enabled()
        if store.boundary and bool((slots >= 0).all()):
            self._refuse_hooked(store, depth)
            if not store.refused and (not store.verified or (grad and not store.grad_checked)):
                self._verify(store, slots, args, kwargs, n)
            if store.refused:
                self._begin(Call("off", started=started), "uncached")
                return
            call = Call("replay", store=store, keys=keys, slots=slots, n=n, started=started)
            self._install_stubs(call, store, slots)
            self._stats.hits += n
            self._begin(call, "replayed")
            return
        call = Call("capture", store=store, keys=keys, slots=slots, n=n, started=started, grad=grad)
        source = max(
            (st for (d, sig, _), st in self._stores.items() if d < depth and sig == signature),
            key=lambda st: st.depth,
            default=None,
        )
        if source is not None:  # the previous prefix knows every row: run only what was frozen since
            source_slots = source.slabs.lookup(keys)
            if bool((source_slots >= 0).all()):
                call.source, call.source_slots = source, source_slots
                self._install_stubs(call, source, source_slots)
        watch_order(call, self._names, self._modules)
        self._begin(call, "captured")

    def _begin(self, call: Call, kind: str) -> None:
        self._call = call
        call.outputs["kind"] = kind

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        for handle in call.handles:
            handle.remove()
        if call.mode == "capture" and call.store is not None and output is not None:
            self._finish_capture(call)
        for g, watches in enumerate(self._watches[: self._depth or 0]):
            for i, watch in enumerate(watches):
                if call.mode == "capture" and call.store is not None and watch.attributes_changed():
                    self._refuse(
                        call.store,
                        f"module '{self._names[g][i]}' sets its own attributes when it runs (state that a replay "
                        "would not set, and that the model may read later)",
                    )
                watch.rebase_attributes()
        kind = str(call.outputs["kind"])
        setattr(self._stats, f"{kind}_batches", getattr(self._stats, f"{kind}_batches") + 1)
        phase = f"{kind} ({self._stats.frozen_groups} groups frozen)"
        self._stats.seconds[phase] = self._stats.seconds.get(phase, 0.0) + time.perf_counter() - call.started

    # -- stores --------------------------------------------------------------------------------
    def _store_for(self, depth: int, signature: str) -> Store:
        """The store of the prefix of ``depth`` groups for this input layout and these modes.

        Every other store stays while its rows are still valid (same weights, nothing newly
        trainable): other layouts, other modes or autocast states, other depths (after more
        groups freeze, a capture at the new boundary replays a shallower prefix that holds every
        row, and runs only the newly frozen groups). The least recently used stores go first
        when all of them together exceed ``max_bytes``.
        """
        trainable = frozenset(id(p) for p in self._all_params if p.requires_grad)
        weights: dict[int, tuple[Any, ...]] = {depth: self._weights(depth)}
        modes = self._modes(depth)
        key: StoreKey = (depth, signature, modes)
        store = self._stores.get(key)
        if store is None or store.token[:2] != weights[depth] or not trainable <= store.trainable:
            store = Store(depth, (*weights[depth], modes), SlabStore(max_bytes=self.max_bytes), trainable=trainable)
        kept: dict[StoreKey, Store] = {}
        for k, st in self._stores.items():
            d = k[0]
            if k != key and trainable <= st.trainable and st.token[:2] == weights.setdefault(d, self._weights(d)):
                kept[k] = st
        kept[key] = store  # last: the most recently used
        self._stores = kept
        self._trim()
        return store

    def _trim(self) -> None:
        """Drop the least recently used stores (never the current one) while all exceed ``max_bytes``."""
        while len(self._stores) > 1 and sum(st.slabs.nbytes for st in self._stores.values()) > self.max_bytes:
            self._stores.pop(next(iter(self._stores)))

    # -- capture -------------------------------------------------------------------------------
    def _finish_capture(self, call: Call) -> None:
        store = call.store
        if store is None or not call.order:
            return
        boundary = call.order[-1]
        if len(set(call.order)) != len(call.order):
            self._refuse(store, f"a prefix module ran twice in one forward ({short_repr(call.order)})")
            return
        if store.boundary and boundary != store.boundary:
            self._refuse(store, f"the prefix ends at '{boundary}' in one call and '{store.boundary}' in another")
            return
        out_leaves, _ = tree.flatten(call.outputs[boundary])
        tensors = [x for x in out_leaves if isinstance(x, Tensor)]
        if not tensors or any(row_shape(t, call.n) is None for t in tensors):
            self._refuse(store, f"the output of '{boundary}' has no batch dimension of {call.n} rows to store")
            return
        if call.grad:
            if any(t.requires_grad for t in tensors):
                self._refuse(store, FED_BY_TRAINABLE.format(boundary=boundary))
                return
            store.grad_checked = True
        if call.last[0] == boundary:
            tensors = call.last[1]  # as it was returned, before anything after the prefix ran
        if not store.boundary:
            store.boundary, store.early = boundary, list(call.order)
            for name in call.order:
                leaves, spec = tree.flatten(call.outputs[name])
                store.records[name] = Record(
                    spec,
                    [
                        (x.dtype, x.device, row_shape(x, call.n), tuple(x.shape)) if isinstance(x, Tensor) else x
                        for x in leaves
                    ],
                )
            self._stats.boundary = boundary
        missing = torch.nonzero(call.slots < 0).flatten() if call.slots is not None else torch.arange(call.n)
        if len(missing):
            rows = [t.detach()[missing.to(t.device)] for t in tensors]
            store.slabs.insert([call.keys[int(i)] for i in missing], rows)
            self._trim()
            self._stats.misses += len(missing)
        self._stats.hits += call.n - len(missing)

    # -- replay --------------------------------------------------------------------------------
    def _install_stubs(self, call: Call, store: Store, slots: Tensor) -> None:
        install_stubs(self.model, call, store, slots)

    def _verify(self, store: Store, slots: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> None:
        """Run the model in full and with the prefix replayed; refuse the prefix if they disagree."""
        self._stats.verifications += 1
        suffix = [m for modules in self._modules[store.depth :] for m in modules]
        grad = torch.is_grad_enabled()
        problem = replay_problem(self.model, store, slots, args, kwargs, n, suffix=suffix, check_grad=grad)
        if problem:
            self._refuse(
                store,
                f"replaying the prefix up to '{store.boundary}' changes the model's output ({problem})"
                + (ungrouped_randomness(self.model, self._names) or REPLAY_CAUSES),
            )
        else:
            store.verified = True
            store.grad_checked = store.grad_checked or grad

    def _refuse_hooked(self, store: Store, depth: int) -> None:
        """Refuse a replay that would skip someone's hooks on a prefix module (or hand them stand-ins)."""
        reason = hooked([m for watches in self._watches[:depth] for watch in watches for m in watch.mods])
        if reason:
            self._refuse(store, reason)

    def _refuse(self, store: Store, reason: str) -> None:
        store.refused = reason
        store.slabs.clear()
        self._stats.refused[f"{store.depth} groups frozen"] = reason
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"cache_frozen_prefix: not caching the frozen prefix for these inputs: {reason}. The model "
                "runs uncached for them (correct, not faster).",
                stacklevel=3,
            )


#: the model each live prefix cache hooks (one per model: two would record each other's stand-ins)
#: (weak both ways: the cache holds its model, so a strong value would keep the model alive for ever)
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[PrefixCache]] = weakref.WeakKeyDictionary()


def cache_frozen_prefix(
    model: nn.Module,
    *,
    groups: Sequence[Sequence[Selector]] | None = None,
    max_bytes: int = 1 << 30,
) -> PrefixCache:
    """Cache the output of the model's frozen leading layer groups and skip them on later forwards.

    Args:
        model: the model as you call it in training (``model(batch)``); every tensor in the
            call's inputs must have the batch as its first dimension.
        groups: the layer groups front to back (lists of selectors); default
            :func:`torchfreeze.layer_groups` (embeddings/stem, one group per block, the head).
        max_bytes: memory budget of the stored boundary outputs, in bytes.

    Returns:
        A :class:`PrefixCache` (``stats()``, ``boundary``, ``clear()``, ``remove()``).

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``, ``max_bytes`` not an int, ``groups`` not a list.
        ArgumentError: fewer than two groups, a negative ``max_bytes``, a group naming nothing, or
            the model already has a prefix cache (use it, or ``remove()`` it first).

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    >>> prefix = cache_frozen_prefix(model)
    >>> _ = model[0].requires_grad_(False)   # freezing now (or later) is enough
    >>> x = torch.randn(3, 4)
    >>> _ = model(x); _ = model(x); prefix.stats().replayed_batches
    1
    """
    require_module(model, "cache_frozen_prefix", "model")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise ArgumentTypeError(
            f"cache_frozen_prefix(max_bytes={short_repr(max_bytes)}): expected an int (bytes), got "
            f"{type(max_bytes).__name__}. Fix: pass e.g. max_bytes=2**30 for 1 GiB."
        )
    if max_bytes < 0:
        raise ArgumentError(
            f"cache_frozen_prefix(max_bytes={max_bytes!r}): expected a non-negative number of bytes. "
            "Fix: pass e.g. max_bytes=2**30 for 1 GiB."
        )
    attached = _ATTACHED[model]() if model in _ATTACHED else None
    if attached is not None:
        raise ArgumentError(
            f"cache_frozen_prefix(model={type(model).__name__}(...)): this model already has a prefix cache "
            f"({attached!r}). Fix: use that one, or call its remove() first."
        )
    prefix = PrefixCache(model, resolve_groups(model, groups), max_bytes=max_bytes)
    _ATTACHED[model] = weakref.ref(prefix)
    return prefix
