"""Cache keys: the module's fingerprint, its cheap change token, and the content key of the inputs.

A key is SHA-256 over the module's part (:func:`module_fingerprint`, or an
in-memory generation), the method called, the granularity, the autocast state,
the structure and constants of the inputs (:func:`input_signature`, written over
``torch.utils._pytree``'s flattened spec and leaves) and the input tensors'
dtypes, shapes and bytes (:func:`batch_key`, :func:`row_keys`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import operator
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from torchfreeze._core import tree
from torchfreeze._core.fingerprint import fingerprint, hash_tensor, tensor_bytes
from torchfreeze.errors import ArgumentError

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["module_fingerprint"]

KEY_FORMAT = "tfc-key-2"
CONSTANT_TYPES: tuple[type, ...] = (type(None), bool, int, float, str)
# what a broken ``extra_repr`` of a user's module may raise; the class name stands in for it then
_REPR_ERRORS = (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError)


def check_dense(t: Tensor) -> Tensor:
    """``t`` itself when it is a dense (strided) tensor; else :class:`ArgumentError`."""
    if t.layout != torch.strided:
        raise ArgumentError(
            f"cache_features: cannot hash a tensor with layout {t.layout}; expected a dense "
            "(strided) tensor. Convert it with .to_dense() before the cached module."
        )
    return t


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


_get_training = operator.attrgetter("training")
_get_version = operator.attrgetter("_version")
_get_requires_grad = operator.attrgetter("requires_grad")
_get_parameters = operator.attrgetter("_parameters")
_get_buffers = operator.attrgetter("_buffers")
_get_modules = operator.attrgetter("_modules")
_get_dict = operator.attrgetter("__dict__")
_not_none = functools.partial(operator.is_not, None)

StateToken = tuple[list[Any], ...]
Reader = Callable[[dict[str, Any]], Any]


def _none(_: dict[str, Any]) -> None:
    return None


def attribute_readers(mods: list[nn.Module]) -> list[Reader]:
    """Per module, a C-level getter of its plain attributes' values (see :func:`plain_attributes`)."""
    readers: list[Reader] = []
    for m in mods:
        keys = [k for k, _ in plain_attributes(m)]
        readers.append(operator.itemgetter(*keys) if keys else _none)
    return readers


def _read(reader: Reader, d: dict[str, Any]) -> Any:
    try:
        return reader(d)
    except KeyError:  # an attribute was deleted: a change
        return KeyError


def state_token(mods: list[nn.Module], readers: list[Reader] | None = None) -> StateToken:
    """A token that changes whenever weights, buffers, structure or modes of ``mods`` change.

    Per tensor: identity, storage address, version counter (bumped by every in-place change,
    including ``load_state_dict`` and optimizer steps) and ``requires_grad``; per module: the
    identity of its parameter, buffer and child dicts, of every child, its ``training`` flag
    (so a swapped or added layer, even one without parameters, changes the token) and its plain
    attributes (:func:`plain_attributes`: ``negative_slope``, ``eps``, ``p``...). It runs on
    every cached call, so it is built from C-level ``map`` calls over the flat module list:
    microseconds even for a transformer encoder.
    """
    if readers is None:
        readers = attribute_readers(mods)
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
        list(map(len, dicts := list(map(_get_dict, mods)))),  # an attribute added
        list(map(_read, readers, dicts)),
    )


class ModuleWatch:
    """Cheap change detection for a wrapped module (see :func:`state_token`)."""

    __slots__ = ("mods", "module", "readers", "token")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.mods = list(module.modules())
        self.readers = attribute_readers(self.mods)
        self.token = state_token(self.mods, self.readers)

    def poll(self) -> StateToken | None:
        """None when nothing changed; otherwise the new token (make it current with :meth:`accept`)."""
        token = state_token(self.mods, self.readers)
        if token == self.token:
            return None
        self.mods = list(self.module.modules())  # the structure may have changed: walk again
        self.readers = attribute_readers(self.mods)
        return state_token(self.mods, self.readers)

    def rebase_attributes(self) -> None:
        """Take the plain attributes as they are now (after a forward pass that updated its own counters).

        A module that counts its calls in an attribute changes it on every forward pass; that is
        the module's own doing, not a new hyperparameter, so it must not make every call a miss.
        """
        self.token = (*self.token[:-2], *state_token(self.mods, self.readers)[-2:])

    def accept(self, token: StateToken) -> None:
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


def key_prefix(base: str, method: str, granularity: str, signature: str) -> _Hash:
    """A SHA-256 object fed with everything of a key but the input tensors."""
    h = hashlib.sha256()
    h.update(f"{KEY_FORMAT}|{base}|{method}|{granularity}|{signature!r}|{autocast_state()}|".encode())
    return h


def batch_key(prefix: _Hash, tensors: list[Tensor]) -> str:
    """The key of a whole call: ``prefix`` plus each tensor's dtype, shape and bytes."""
    for t in tensors:
        hash_tensor(prefix, check_dense(t))
    return prefix.hexdigest()[:40]


def row_keys(prefix: _Hash, tensors: list[Tensor], n: int) -> list[str]:
    """One key per row: ``prefix``, each tensor's dtype and row shape, then row ``r`` of every tensor.

    One pass over each contiguous input buffer: row ``r`` of every input is a slice of its view.
    """
    views = [tensor_bytes(check_dense(t)) for t in tensors]
    prefix.update("".join(f"{t.dtype}|{tuple(t.shape[1:])}|" for t in tensors).encode())
    keys: list[str] = []
    if len(views) == 1:
        mv = views[0]
        rb = mv.nbytes // n if n else 0
        for start in range(0, rb * n, rb) if rb else [0] * n:
            h = prefix.copy()
            h.update(mv[start : start + rb])
            keys.append(h.hexdigest()[:40])
        return keys
    rbs = [mv.nbytes // n if n else 0 for mv in views]
    for r in range(n):
        h = prefix.copy()
        for mv, rb in zip(views, rbs):
            h.update(mv[r * rb : (r + 1) * rb])
        keys.append(h.hexdigest()[:40])
    return keys
