"""Cache keys: the module's fingerprint, its cheap change token, and the content key of the inputs.

A key is a 128-bit hash of the input tensors' bytes (per row: :func:`row_keys_fast`;
per call: :func:`batch_key`) seeded by everything else it depends on: the module's
part (:func:`module_fingerprint`, or an in-memory generation), the method called,
the granularity, the autocast state, the structure and constants of the inputs
(:func:`fast_signature`, :func:`input_signature`, written over ``torch.utils._pytree``'s
flattened spec and leaves), and each input tensor's dtype and row shape
(:func:`key_salt`). :class:`ModuleWatch` notices, on every call and in microseconds,
when the wrapped module changed.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from torchfreeze._core import tree
from torchfreeze._core.fingerprint import fingerprint
from torchfreeze.errors import ArgumentError
from torchfreeze.speed._hashing import HAVE_XXHASH, batch_key, check_dense, row_keys_fast

__all__ = ["module_fingerprint", "row_keys_fast", "batch_key", "check_dense", "HAVE_XXHASH"]

KEY_FORMAT = "tfc-key-3"
CONSTANT_TYPES: tuple[type, ...] = (type(None), bool, int, float, str)
# what a broken ``extra_repr`` of a user's module may raise; the class name stands in for it then
_REPR_ERRORS = (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError)


# --------------------------------------------------------------------------- module fingerprint


def _structure_repr(module: nn.Module) -> str:
    try:
        return repr(module)
    except _REPR_ERRORS:  # a broken extra_repr must not stop caching
        return type(module).__qualname__


def module_fingerprint(module: nn.Module, *, salt: str = "") -> str:
    """Content fingerprint of a module: weights, buffers, structure and modes.

    The weights and buffers go through :func:`torchfreeze._core.fingerprint.fingerprint`
    (the one fingerprint format); the structure (``repr``), every submodule's
    train/eval flag and ``salt`` are mixed in.

    Args:
        module: the module to fingerprint.
        salt: extra text mixed in (for example a version of your preprocessing).

    Returns:
        ``"sha256:<hex>"``; equal modules give equal fingerprints.

    >>> a = nn.Linear(2, 2); b = nn.Linear(2, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> module_fingerprint(a) == module_fingerprint(b), module_fingerprint(a)[:7]
    (True, 'sha256:')
    """
    tensors = [(f"parameter:{n}", check_dense(p)) for n, p in module.named_parameters(remove_duplicate=False)]
    tensors += [(f"buffer:{n}", check_dense(b)) for n, b in module.named_buffers(remove_duplicate=False)]
    h = hashlib.sha256()
    h.update(b"tfc-module-2|")
    h.update(f"{len(salt)}:{salt}|".encode())
    h.update(f"{type(module).__module__}.{type(module).__qualname__}|".encode())
    h.update(_structure_repr(module).encode())
    for name, m in module.named_modules(remove_duplicate=False):
        h.update(f"|m:{name}:{type(m).__qualname__}:{m.training}:{plain_attributes(m)!r}".encode())
    h.update(f"|{fingerprint(tensors)}".encode())
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- change token

_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device})


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    return (kind is tuple or kind is list) and all(type(v) in _SCALARS for v in value)


def plain_attributes(module: nn.Module) -> list[tuple[str, Any]]:
    """The module's public attributes that hold plain values (numbers, strings, tuples of them...).

    Hyperparameters that change the output without being tensors or modes
    (``LeakyReLU.negative_slope``, ``Dropout.p``, ``eps``, ``stride``) live here, so
    they are part of the change token and of the fingerprint.

    >>> plain_attributes(nn.LeakyReLU(0.3))
    [('negative_slope', 0.3), ('inplace', False)]
    """
    return [(k, v) for k, v in module.__dict__.items() if k[0] != "_" and k != "training" and _plain(v)]


_get_version = operator.attrgetter("_version")
_get_requires_grad = operator.attrgetter("requires_grad")
_get_parameters = operator.attrgetter("_parameters")
_get_buffers = operator.attrgetter("_buffers")
_get_modules = operator.attrgetter("_modules")
_values = dict.values
_chain = itertools.chain.from_iterable


Token = tuple[list[dict[str, Any]], list[Any], list[int], list[int], list[bool]]
# what comparing a changed attribute's old and new values may raise (a multi-element tensor, an array)
_COMPARE_ERRORS = (RuntimeError, ValueError, TypeError)


class ModuleWatch:
    """Cheap change detection for a wrapped module: :meth:`poll` runs on every cached call.

    The token is, over every submodule, a shallow copy of its ``__dict__`` (compared
    with ``==``, which is C-level and returns at once for the objects that were not
    replaced: so the ``training`` flag, every plain attribute such as
    ``negative_slope`` or ``eps``, and an added or deleted attribute are seen); the
    objects of its parameters, buffers and children (compared by identity, and held,
    so a freed object's address cannot come back as a false "unchanged"); and each
    tensor's version counter (bumped by every in-place change: optimizer steps,
    ``load_state_dict``), storage address (``.data = ...``) and ``requires_grad``.
    A few C-level passes: microseconds for a dozen modules.
    """

    __slots__ = ("dicts", "empty", "mods", "module", "slots", "tensors", "token")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._walk()
        self.token = self._take()

    def _walk(self) -> None:
        mods = self.mods = list(self.module.modules())
        self.dicts = list(map(vars, mods))
        slots = [*map(_get_parameters, mods), *map(_get_buffers, mods), *map(_get_modules, mods)]
        self.tensors: list[Tensor] = [t for d in slots[: 2 * len(mods)] for t in d.values() if t is not None]
        self.slots = [d for d in slots if d]  # scanned by value; the empty ones only need to stay empty
        self.empty = [d for d in slots if not d]

    def _take(self) -> Token:
        tensors = self.tensors
        return (
            list(map(dict, self.dicts)),
            list(_chain(map(_values, self.slots))),
            list(map(_get_version, tensors)),
            list(map(Tensor.data_ptr, tensors)),
            list(map(_get_requires_grad, tensors)),
        )

    def _same_attributes(self, snapshots: list[dict[str, Any]]) -> bool:
        try:
            return all(map(operator.eq, self.dicts, snapshots))
        except _COMPARE_ERRORS:  # a replaced tensor or array attribute: a change
            return False

    def poll(self) -> Token | None:
        """None when nothing changed; otherwise the new token (make it current with :meth:`accept`)."""
        snapshots, held, versions, ptrs, grads = self.token
        tensors = self.tensors
        slots = list(_chain(map(_values, self.slots)))
        if (
            self._same_attributes(snapshots)
            and not any(map(len, self.empty))
            and len(slots) == len(held)
            and all(map(operator.is_, slots, held))
            and list(map(_get_version, tensors)) == versions
            and list(map(Tensor.data_ptr, tensors)) == ptrs
            and list(map(_get_requires_grad, tensors)) == grads
        ):
            return None
        self._walk()  # the structure may have changed: walk again
        return self._take()

    def attributes_changed(self) -> bool:
        """Whether an attribute or flag differs from the token (a forward pass that set one, say)."""
        return not self._same_attributes(self.token[0])

    def rebase_attributes(self) -> None:
        """Take the attributes and flags as they are now (after a forward pass that updated its own counters).

        A module that counts its calls in an attribute changes it on every forward pass; that is
        the module's own doing, not a new hyperparameter, so it must not make every call a miss.
        Parameters, buffers, children and tensor versions are not rebased: a module that changes
        its own tensors in its forward pass keeps missing, as it must.
        """
        snapshots, held, versions, ptrs, grads = self.token
        if not self._same_attributes(snapshots):
            self.token = (list(map(dict, self.dicts)), held, versions, ptrs, grads)

    def accept(self, token: Token) -> None:
        """Make ``token`` the current one."""
        self.token = token


# --------------------------------------------------------------------------- inputs


def open_container(leaf: Any) -> dict[Any, Any] | list[Any] | None:
    """A container that pytree does not know (a ``BatchEncoding``, a ``UserDict``) as a plain dict or list.

    ``None`` for anything else. :func:`rebuild_container` makes the original type again.
    """
    if isinstance(leaf, Mapping):
        return dict(leaf)
    if isinstance(leaf, (tuple, list)):
        return list(leaf)
    return None


def rebuild_container(kind: type, opened: dict[Any, Any] | list[Any]) -> Any:
    """The container ``kind`` again, from what :func:`open_container` gave (and then mapped)."""
    return kind(opened)


def _leaf_code(leaf: Any, tensors: list[Tensor]) -> str | None:
    if isinstance(leaf, Tensor):
        tensors.append(leaf)
        return "T"
    if isinstance(leaf, CONSTANT_TYPES):
        return f"{type(leaf).__name__}:{leaf!r}"
    if isinstance(leaf, torch.dtype):
        return f"dtype:{leaf}"
    opened = open_container(leaf)
    if opened is None:
        return None
    kind = type(leaf)
    return f"{kind.__module__}:{kind.__qualname__}<{_signature(opened, tensors)}>"


def _signature(inputs: Any, tensors: list[Tensor]) -> str:
    leaves, spec = tree.flatten(inputs)
    codes = []
    for leaf in leaves:
        code = _leaf_code(leaf, tensors)
        if code is None:
            raise _unhashable(inputs, leaf)
        codes.append(code)
    # repr of the spec names each container type and its context (dict keys by repr: 1 and "1" differ)
    return f"{spec!r}|{codes!r}"


def _unhashable(inputs: Any, leaf: Any) -> ArgumentError:
    where = "inputs"
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
        named = [(f"#{i}", a) for i, a in enumerate(inputs[0])] + [(repr(k), v) for k, v in inputs[1].items()]
        where = next((f"argument {n}" for n, a in named if any(x is leaf for x in tree.flatten(a)[0])), where)
    return ArgumentError(
        f"cache_features: {where} is (or contains) a {type(leaf).__name__}, which cannot be hashed; expected "
        "tensors, numbers, strings, None, or tuples/lists/dicts of them. Pass it as a tensor, or bind it "
        "into the module (e.g. with functools.partial inside a small wrapper module)."
    )


def input_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, list[Tensor]]:
    """The structure and constants of a call's inputs (a string), and its tensors in order.

    Raises:
        ArgumentError: an input that is neither a tensor, a constant, a dtype nor a container of these.

    >>> sig, tensors = input_signature((torch.ones(2), {1: None}), {})
    >>> sig == input_signature((torch.zeros(2), {"1": None}), {})[0], len(tensors)
    (False, 1)
    """
    tensors: list[Tensor] = []
    return _signature((args, kwargs), tensors), tensors


def take_rows(inputs: Any, idx: Tensor) -> Any:
    """``inputs`` with every tensor reduced to the rows ``idx`` (along the first dimension)."""

    def take(leaf: Any) -> Any:
        if isinstance(leaf, Tensor):
            return leaf.index_select(0, idx.to(leaf.device))
        opened = open_container(leaf)
        return leaf if opened is None else rebuild_container(type(leaf), take_rows(opened, idx))

    leaves, spec = tree.flatten(inputs)
    return tree.unflatten(spec, [take(leaf) for leaf in leaves])


def autocast_state() -> tuple[tuple[str, bool, str], ...]:
    """Whether autocast is on, and its dtype, for CPU and CUDA (part of every key)."""
    out = []
    for dev in ("cpu", "cuda"):
        try:
            on = torch.is_autocast_enabled(dev)
            out.append((dev, on, str(torch.get_autocast_dtype(dev)) if on else ""))
        except (TypeError, AttributeError, RuntimeError):  # older torch
            out.append((dev, torch.is_autocast_enabled() if dev == "cuda" else False, ""))
    return tuple(out)


# --------------------------------------------------------------------------- content keys


def fast_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], list[Tensor]]:
    """The structure of a call's inputs as a hashable tuple, and its tensors in order.

    The common calls (one tensor; one plain ``dict`` of tensors with string keys) take a
    fast path; anything else goes through :func:`input_signature` (pytree). The two
    never give the same tuple for different structures.

    Raises:
        ArgumentError: an input that cannot be hashed (see :func:`input_signature`).

    >>> fast_signature((torch.ones(2),), {})[0], fast_signature(({"a": torch.ones(2)},), {})[0]
    (('T',), ('D', ('a',)))
    """
    if not kwargs and len(args) == 1:
        a = args[0]
        if isinstance(a, Tensor):
            return ("T",), [a]
        if type(a) is dict:
            values = list(a.values())
            if all(isinstance(v, Tensor) for v in values) and all(type(k) is str for k in a):
                return ("D", tuple(a)), values
    signature, tensors = input_signature(args, kwargs)
    return ("G", signature), tensors


def key_salt(base: str, method: str, granularity: str, signature: tuple[Any, ...]) -> bytes:
    """16 bytes naming everything of a key but the input tensors' content (and their dtypes and shapes).

    That is the module's part (its fingerprint, or an in-memory generation), the method, the
    granularity, the inputs' structure and constants, and the autocast state.
    """
    text = f"{KEY_FORMAT}|{base}|{method}|{granularity}|{signature!r}|{autocast_state()}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
