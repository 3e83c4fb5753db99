"""Freeze state and trainable-only checkpoints.

``freeze_state`` / ``load_freeze_state`` turn "what is frozen and what is
pinned" into a small JSON-able dict and back. ``save_trainable`` /
``load_trainable`` write and read one safetensors file holding only what
training can change, with the freeze state and a fingerprint of the frozen base
in its metadata. Every write goes through :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchfreeze._core.files import atomic_write
from torchfreeze._core.fingerprint import fingerprint
from torchfreeze._core.mode import pinned_modes
from torchfreeze._core.uses import set_requires_grad
from torchfreeze.errors import ArgumentError, CheckpointError, FreezeStateError
from torchfreeze.nn import (
    Frozen,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    is_norm,
    trainable_parameters,
)

__all__ = [
    "freeze_state",
    "load_freeze_state",
    "save_trainable",
    "load_trainable",
    "atomic_write",
    "fingerprint",
]

STATE_FORMAT = "torchfreeze.freeze_state"
STATE_VERSION = 1
CHECKPOINT_FORMAT = "torchfreeze.trainable"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------
# small helpers shared with _optim, _guard and _schedule


def _check_model(model: Any, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise ArgumentError(
            f"{fn}(model=...) expects a torch.nn.Module, got {type(model).__name__}; "
            "pass the model itself (not its state_dict or parameters())."
        )


def _trainable_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that train (requires_grad and a use outside ``Frozen``)."""
    return {id(p) for _, p in trainable_parameters(model)}


def _unique_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Primary name -> parameter, each parameter once, in model order."""
    return dict(model.named_parameters())


def _frozen_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Primary name -> parameter for every parameter that does not train."""
    trainable = _trainable_ids(model)
    return {n: p for n, p in _unique_parameters(model).items() if id(p) not in trainable}


def _pinned_ids(model: nn.Module, mode: str) -> set[int]:
    """Ids of the modules pinned to ``mode``."""
    out: set[int] = set()
    for name, m in pinned_modes(model).items():
        if m == mode:
            out.add(id(model.get_submodule(name)))
    return out


def _frozen_bn_types() -> tuple[type, ...]:
    return (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)


def _tracks_stats(module: nn.Module) -> bool:
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


def _module_is_frozen(module: nn.Module, frozen_ids: set[int]) -> bool:
    """A module with at least one parameter of its own, all of them frozen."""
    own = list(module.parameters(recurse=False))
    return bool(own) and all(id(p) in frozen_ids for p in own)


def _watched_norms(model: nn.Module, frozen_ids: set[int] | None = None) -> list[tuple[str, nn.Module]]:
    """Normalisation layers whose buffers must stay fixed: frozen, pinned eval, or FrozenBatchNorm."""
    if frozen_ids is None:
        frozen_ids = {id(p) for p in _frozen_parameters(model).values()}
    eval_ids = _pinned_ids(model, "eval")
    fbn = _frozen_bn_types()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, fbn) or (is_norm(m) and (id(m) in eval_ids or _module_is_frozen(m, frozen_ids))):
            if any(True for _ in m.buffers(recurse=False)):
                out.append((name, m))
    return out


def _persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    skip = getattr(module, "_non_persistent_buffers_set", set())
    return {n: b for n, b in module._buffers.items() if b is not None and n not in skip}


def _partition(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split the model's persistent tensors into (trainable part, frozen base), unique, primary names.

    The frozen base holds the frozen parameters and the persistent buffers of modules that training
    cannot change: a module whose own parameters are all frozen (a normalisation layer that tracks
    running statistics only when it is also pinned eval), and ``FrozenBatchNorm`` layers. Everything
    else in ``state_dict`` (trainable parameters, buffers of modules that train or whose statistics
    still update) is the trainable part.
    """
    frozen_params = _frozen_parameters(model)
    frozen_ids = {id(p) for p in frozen_params.values()}
    eval_ids = _pinned_ids(model, "eval")
    fbn = _frozen_bn_types()
    trainable: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            (frozen if id(p) in frozen_ids else trainable)[prefix + pname] = p
        bufs = _persistent_buffers(m)
        if not bufs:
            continue
        if isinstance(m, fbn):
            base = True
        elif _module_is_frozen(m, frozen_ids):
            base = not (is_norm(m) and _tracks_stats(m)) or id(m) in eval_ids
        else:
            base = False
        for bname, b in bufs.items():
            if id(b) in seen:
                continue
            seen.add(id(b))
            (frozen if base else trainable)[prefix + bname] = b
    return trainable, frozen


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every name in ``state_dict`` (all paths of tied tensors) -> the live tensor."""
    return dict(model.state_dict(keep_vars=True))


# --------------------------------------------------------------------------------------
# fingerprint


# --------------------------------------------------------------------------------------
# atomic write: torchfreeze._core.files.atomic_write (imported above, re-exported here)


# --------------------------------------------------------------------------------------
# freeze state


def _frozen_use_paths(model: nn.Module) -> list[str]:
    frozen_cls = Frozen
    return [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, frozen_cls)]


def freeze_state(model: nn.Module) -> dict[str, Any]:
    """What is frozen and what is pinned in ``model``, as a JSON-serialisable dict.

    The dict has ``format`` (``"torchfreeze.freeze_state"``), ``version`` (1), ``frozen`` (names of
    the parameters with ``requires_grad=False``, one name per parameter, model order),
    ``frozen_uses`` (paths of the ``Frozen`` wrappers) and ``pins`` (module name -> ``"train"`` /
    ``"eval"``), ``pin_origins`` (module name -> who set the pin: ``"freeze"``, ``"user"`` or
    ``"Frozen"``; ``unfreeze`` removes only ``"freeze"`` pins, so a resumed run needs it) and
    ``converted_norms`` (BatchNorm layers swapped for ``FrozenBatchNorm``).

    Args:
        model: any module.

    Returns:
        The freeze state; ``json.dumps`` accepts it.

    Raises:
        ArgumentError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> freeze_state(torchfreeze.freeze(m, "0"))["frozen"]
        ['0.weight', '0.bias']
    """
    _check_model(model, "freeze_state")
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "frozen": [n for n, p in _unique_parameters(model).items() if not p.requires_grad],
        "frozen_uses": _frozen_use_paths(model),
        "pins": dict(pinned_modes(model)),
    }
    state["pin_origins"] = _pin_origins(model)
    state["converted_norms"] = _converted_norms(model)
    return state


def _pin_origins(model: nn.Module) -> dict[str, str]:
    """Who set each pin: ``"freeze"`` (removed by ``unfreeze``), ``"user"`` (``pin_mode``), ``"Frozen"``."""
    from torchfreeze._core.mode import pins

    return {name: pin.origin for name, pin in pins(model).items()}


def _converted_norms(model: nn.Module) -> list[str]:
    from torchfreeze.nn.batchnorm import _FrozenBatchNorm

    return [n for n, m in model.named_modules() if isinstance(m, _FrozenBatchNorm)]


def _validate_freeze_state(model: nn.Module, state: Any, *, strict: bool, arg: str = "state") -> list[str]:
    """Check ``state`` against ``model`` without changing anything.

    Raises FreezeStateError for a malformed state, or (strict) for any mismatch, listing every
    mismatch. Returns the list of mismatches that were tolerated (non-strict).
    """
    if not isinstance(state, Mapping):
        raise FreezeStateError(
            f"{arg} must be the dict returned by torchfreeze.freeze_state(model), got {type(state).__name__}."
        )
    if state.get("format") != STATE_FORMAT:
        raise FreezeStateError(
            f"{arg}['format'] must be {STATE_FORMAT!r}, got {state.get('format')!r}; "
            "pass the dict returned by torchfreeze.freeze_state(model)."
        )
    version = state.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FreezeStateError(f"{arg}['version'] must be a positive int, got {version!r}.")
    if version > STATE_VERSION:
        raise FreezeStateError(
            f"{arg}['version'] is {version}, newer than this torchfreeze understands ({STATE_VERSION}); "
            "upgrade torchfreeze."
        )
    problems: list[str] = []
    for key in ("frozen", "frozen_uses"):
        v = state.get(key)
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise FreezeStateError(f"{arg}[{key!r}] must be a list of names (str), got {v!r}.")
    pins = state.get("pins")
    if not isinstance(pins, Mapping) or not all(isinstance(k, str) and v in ("train", "eval") for k, v in pins.items()):
        raise FreezeStateError(f"{arg}['pins'] must map module names to 'train' or 'eval', got {pins!r}.")
    origins = state.get("pin_origins")
    if origins is not None and (
        not isinstance(origins, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in origins.items())
    ):
        raise FreezeStateError(f"{arg}['pin_origins'] must map module names to str, got {origins!r}.")

    converted = state.get("converted_norms", [])
    if not isinstance(converted, (list, tuple)) or not all(isinstance(x, str) for x in converted):
        raise FreezeStateError(f"{arg}['converted_norms'] must be a list of module names, got {converted!r}.")

    from torch.nn.modules.batchnorm import _BatchNorm

    from torchfreeze.nn.batchnorm import _FrozenBatchNorm

    table = dict(model.named_modules(remove_duplicate=False))
    module_names = set(table)
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for n in converted:
        m = table.get(n)
        if m is None:
            problems.append(f"converted BatchNorm {n!r} does not exist in the model")
        elif not isinstance(m, (_BatchNorm, _FrozenBatchNorm)):
            problems.append(f"converted BatchNorm {n!r} is a {type(m).__name__} in the model, not a BatchNorm")
        elif isinstance(m, _BatchNorm) and not m.track_running_stats:
            problems.append(f"converted BatchNorm {n!r} has no running statistics in the model")
        else:  # its weight/bias become buffers once converted
            param_names.update(f"{n}.{p}" for p, _ in m.named_parameters())
    for n in state["frozen"]:
        if n not in param_names:
            problems.append(f"frozen parameter {n!r} does not exist in the model")
    have_uses = set(_frozen_use_paths(model))
    want_uses = set(state["frozen_uses"])
    for n in sorted(want_uses - have_uses):
        problems.append(f"Frozen use {n!r} is not a Frozen wrapper in the model")
    for n in sorted(have_uses - want_uses):
        problems.append(f"the model has a Frozen use at {n!r} that the state does not list")
    for n in pins:
        if n not in module_names:
            problems.append(f"pinned module {n!r} does not exist in the model")
    if problems and strict:
        listing = "\n  - ".join(problems)
        raise FreezeStateError(
            f"{arg} does not fit this model ({len(problems)} mismatch(es)); nothing was changed:\n  - {listing}\n"
            "Load it into a model of the same architecture, or pass strict=False to apply what fits."
        )
    return problems


def _apply_pins(model: nn.Module, pins: Mapping[str, str], origins: Mapping[str, str] | None) -> None:
    """Make the pins of ``model`` exactly ``pins`` (module by module, origins kept)."""
    from torchfreeze._core.mode import get_pin, set_pin, unpin_modules

    table = dict(model.named_modules())
    origins = origins or {}
    stale = [m for n, m in table.items() if get_pin(m) is not None and n not in pins]
    unpin_modules(model, stale, origins=None)
    for name, mode in pins.items():
        module = table[name]
        pin = get_pin(module)
        origin = origins.get(name, "user")
        if pin is None or pin.mode != mode or pin.origin != origin:
            set_pin(module, mode, origin)


def load_freeze_state(model: nn.Module, state: Mapping[str, Any], *, strict: bool = True) -> nn.Module:
    """Restore what is frozen and pinned, exactly, from a :func:`freeze_state` dict.

    Every parameter listed in ``state["frozen"]`` gets ``requires_grad=False`` (and ``.grad=None``),
    every other parameter ``requires_grad=True``; pins become exactly ``state["pins"]``. The
    state is validated completely first: on any mismatch nothing changes.

    Args:
        model: a model of the same architecture (typically a fresh instance).
        state: the dict from :func:`freeze_state` (possibly through JSON).
        strict: if True (default) every name must exist and the ``Frozen`` uses must match; if
            False, names that do not exist are skipped with a warning.

    Returns:
        The model.

    Raises:
        FreezeStateError: the state is malformed or (strict) does not fit the model; the message
            lists every mismatch.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> s = freeze_state(torchfreeze.freeze(m, "0"))
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> [p.requires_grad for p in load_freeze_state(fresh, s).parameters()]
        [False, False, True, True]
    """
    _check_model(model, "load_freeze_state")
    skipped = _validate_freeze_state(model, state, strict=strict)
    if skipped:
        warnings.warn("load_freeze_state(strict=False) skipped: " + "; ".join(skipped), stacklevel=2)
    from torch.nn.modules.batchnorm import _BatchNorm

    from torchfreeze.nn.batchnorm import freeze_batchnorm, unconvert_batchnorm

    table = dict(model.named_modules(remove_duplicate=False))
    want_converted = [n for n in state.get("converted_norms", []) if n in table]
    # (strict=False) names that are not convertible BatchNorm layers were reported above and are skipped
    to_convert = [n for n in want_converted if isinstance(table[n], _BatchNorm) and table[n].track_running_stats]
    to_unconvert = [n for n in _converted_norms(model) if n not in set(want_converted)]
    if to_unconvert:
        unconvert_batchnorm(model, to_unconvert)
    if to_convert:
        freeze_batchnorm(model, to_convert, convert=True)
    module_names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    frozen_names = set(state["frozen"])
    by_id: dict[int, nn.Parameter] = {}
    frozen_ids: set[int] = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)] = p
        if n in frozen_names:
            frozen_ids.add(id(p))
    set_requires_grad([p for pid, p in by_id.items() if pid in frozen_ids], False)
    set_requires_grad([p for pid, p in by_id.items() if pid not in frozen_ids], True)
    pins = {k: v for k, v in state["pins"].items() if k in module_names}
    origins = state.get("pin_origins")
    _apply_pins(model, pins, origins)
    return model


# --------------------------------------------------------------------------------------
# trainable-only checkpoints


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError(
            "save_trainable/load_trainable need the safetensors package: pip install 'torchfreeze[io]'"
        ) from e
    return st


def _detach_for_save(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()
    for n, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.device.type, t.untyped_storage().data_ptr())
        if key in storages or not t.is_contiguous():
            t = t.contiguous().clone()
        storages.add((t.device.type, t.untyped_storage().data_ptr()))
        out[n] = t
    return out


def save_trainable(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save only what training can change, atomically, as one safetensors file.

    The file holds the trainable parameters and the buffers of modules that are not frozen (see
    ``docs/training.md``), each tensor once under its first name. Its metadata holds the freeze
    state, the names of the frozen-base tensors, a SHA-256 fingerprint of the frozen base and a
    SHA-256 of the saved content, so that :func:`load_trainable` refuses another base and a
    corrupted file.

    Args:
        model: the model (frozen base plus trained parts).
        path: destination file; its directory must exist. Written through a temporary file and
            ``os.replace``: a crash leaves the previous file intact.

    Returns:
        The path written.

    Raises:
        CheckpointError: the directory does not exist.

    Example:
        >>> import os, tempfile, torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> p = save_trainable(m, os.path.join(tempfile.mkdtemp(), "head.safetensors"))
        >>> sorted(__import__("safetensors.torch").torch.load_file(p))
        ['1.bias', '1.weight']
    """
    _check_model(model, "save_trainable")
    st = _safetensors()
    trainable, frozen = _partition(model)
    tensors = _detach_for_save(trainable)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": str(CHECKPOINT_VERSION),
        "freeze_state": json.dumps(freeze_state(model)),
        "frozen_tensors": json.dumps(sorted(frozen)),
        "base_fingerprint": fingerprint(frozen),
        "content_sha256": fingerprint(tensors),
        "torch_version": torch.__version__,
    }
    return atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=meta))


def _read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    st = _safetensors()
    p = Path(os.fspath(path))
    if not p.is_file():
        where = "is a directory" if p.is_dir() else "does not exist"
        raise CheckpointError(f"path={str(p)!r} {where}; pass the file written by torchfreeze.save_trainable.")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types (and OSError) for bad files
        raise CheckpointError(
            f"path={str(p)!r} is not a readable safetensors file (truncated or corrupted?): {e}. "
            "Save it again with torchfreeze.save_trainable."
        ) from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"path={str(p)!r} is a safetensors file but not a torchfreeze trainable checkpoint "
            f"(metadata format={meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); load a full "
            "state_dict with safetensors.torch.load_file + model.load_state_dict instead."
        )
    if meta.get("version") != str(CHECKPOINT_VERSION):
        raise CheckpointError(
            f"path={str(p)!r} has checkpoint version {meta.get('version')!r}; this torchfreeze reads "
            f"version {CHECKPOINT_VERSION}. Upgrade torchfreeze."
        )
    if fingerprint(tensors) != meta.get("content_sha256"):
        raise CheckpointError(
            f"path={str(p)!r} is corrupted: its tensors do not match the checksum stored when it was "
            "saved. Use another copy or save it again."
        )
    return meta, tensors


def load_trainable(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a :func:`save_trainable` file into a model with the same frozen base.

    Checks, before changing anything: the file is intact (checksum), its freeze state fits the
    model, every tensor has the right shape and dtype, every tensor of the model is either in
    the file or in the frozen base, and the model's frozen base has the same fingerprint as the
    one it was saved from. Then restores the freeze state and copies the
    tensors in place (parameter identity is kept).

    Args:
        model: a model with the same architecture and the same frozen (pretrained) weights.
        path: a file written by :func:`save_trainable`.

    Returns:
        The model.

    Raises:
        CheckpointError: missing, truncated or corrupted file; another architecture; another
            frozen base. The model is unchanged.

    Example:
        >>> import os, tempfile, torch, torchfreeze
        >>> torch.manual_seed(0) and None
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> p = save_trainable(m, os.path.join(tempfile.mkdtemp(), "head.safetensors"))
        >>> with torch.no_grad():
        ...     _ = m[1].weight.zero_()
        >>> torch.equal(load_trainable(m, p)[1].weight, torch.zeros(1, 2))
        False
    """
    _check_model(model, "load_trainable")
    meta, tensors = _read_checkpoint(path)
    where = f"path={os.fspath(path)!r}"
    try:
        state = json.loads(meta["freeze_state"])
        frozen_names = json.loads(meta["frozen_tensors"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: metadata is damaged ({e}); save the checkpoint again.") from e
    try:
        _validate_freeze_state(model, state, strict=True, arg="the checkpoint's freeze state")
    except FreezeStateError as e:
        raise CheckpointError(f"{where} was saved from another architecture: {e}") from e

    live = _state_tensors(model)
    problems = []
    missing_base = [n for n in frozen_names if n not in live]
    if missing_base:
        problems.append(f"frozen-base tensors missing from the model: {missing_base[:10]}")
    for n, t in tensors.items():
        if n not in live:
            problems.append(f"{n!r} is in the file but not in the model")
        elif live[n].shape != t.shape or live[n].dtype != t.dtype:
            problems.append(
                f"{n!r}: file has {t.dtype} {tuple(t.shape)}, model has {live[n].dtype} {tuple(live[n].shape)}"
            )
    # every tensor of the model must be either in the file or in the frozen base (tied names count once)
    covered = {id(live[n]) for n in (*tensors, *frozen_names) if n in live}
    uncovered = [n for n, t in live.items() if isinstance(t, torch.Tensor) and id(t) not in covered]
    if uncovered:
        problems.append(
            f"the model has {len(uncovered)} tensor(s) that are neither in the file nor in its frozen base: "
            f"{uncovered[:10]}"
        )
    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointError(
            f"{where} does not fit this model ({len(problems)} mismatch(es)); nothing was changed:\n  - {listing}"
        )
    base = fingerprint({n: live[n] for n in frozen_names})
    if base != meta.get("base_fingerprint"):
        raise CheckpointError(
            f"{where} was saved on a different frozen base: the frozen weights of this model have "
            f"fingerprint {base[:19]}..., the checkpoint expects {str(meta.get('base_fingerprint'))[:19]}...; "
            "load the same pretrained weights into the model first (the checkpoint holds only the "
            "trained part). Nothing was changed."
        )
    load_freeze_state(model, state)
    # restoring the state may swap BatchNorm <-> FrozenBatchNorm modules: copy into the current tensors
    live = _state_tensors(model)
    with torch.no_grad():
        for n, t in tensors.items():
            live[n].copy_(t)
    return model
