"""Trainable-only checkpoints: ``save_trainable`` / ``load_trainable``.

One safetensors file holding only what training can change, with the freeze state and a
fingerprint of the frozen base in its metadata. Every write goes through
:func:`torchfreeze._core.files.atomic_write`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from torchfreeze._core.behaviour import is_normalization, tracks_running_stats
from torchfreeze._core.checks import require_module
from torchfreeze._core.files import atomic_write
from torchfreeze._core.fingerprint import fingerprint
from torchfreeze.errors import ArgumentError, CheckpointError, FreezeStateError
from torchfreeze.training._watch import eval_pinned_ids, frozen_ids, is_frozen_batchnorm, owns_only_frozen
from torchfreeze.training.state import _validate_freeze_state, freeze_state, load_freeze_state

__all__ = ["save_trainable", "load_trainable"]

CHECKPOINT_FORMAT = "torchfreeze.trainable"
CHECKPOINT_VERSION = 1


def _persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    skip: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    return {n: b for n, b in module._buffers.items() if b is not None and n not in skip}


def _partition(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split the model's persistent tensors into (trainable part, frozen base), unique, primary names.

    The frozen base holds the frozen parameters and the persistent buffers of modules that training
    cannot change: a module whose own parameters are all frozen (a normalisation layer that tracks
    running statistics only when it is also pinned eval), and ``FrozenBatchNorm`` layers. Everything
    else in ``state_dict`` (trainable parameters, buffers of modules that train or whose statistics
    still update) is the trainable part.
    """
    frozen_params = frozen_ids(model)
    eval_ids = eval_pinned_ids(model)
    trainable: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            (frozen if id(p) in frozen_params else trainable)[prefix + pname] = p
        bufs = _persistent_buffers(m)
        if not bufs:
            continue
        if is_frozen_batchnorm(m):
            base = True
        elif owns_only_frozen(m, frozen_params):
            base = not (is_normalization(m) and tracks_running_stats(m)) or id(m) in eval_ids
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


def _require_materialised(model: nn.Module, verb: str) -> None:
    """Refuse a model with lazy (uninitialised) tensors: they have no shape or values to save or fill."""
    lazy = [n for n, t in model.state_dict(keep_vars=True).items() if is_lazy(t)]
    if lazy:
        raise ArgumentError(
            f"{verb}(model=...): {len(lazy)} tensor(s) are not initialised yet (lazy modules: {lazy[:5]}). "
            "Fix: run one forward pass on a sample batch first, so that they get their shapes."
        )


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
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        ArgumentError: the model still has lazy (uninitialised) tensors.
        CheckpointError: the directory does not exist.

    Example:
        >>> import os, tempfile, torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> p = save_trainable(m, os.path.join(tempfile.mkdtemp(), "head.safetensors"))
        >>> sorted(__import__("safetensors.torch").torch.load_file(p))
        ['1.bias', '1.weight']
    """
    require_module(model, "save_trainable")
    _require_materialised(model, "save_trainable")
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
    _safetensors()  # a clear ImportError when the package is missing
    p = Path(os.fspath(path))
    if not p.is_file():
        where = "is a directory" if p.is_dir() else "does not exist"
        raise CheckpointError(f"path={str(p)!r} {where}; pass the file written by torchfreeze.save_trainable.")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as e:  # what safetensors raises for a bad file
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
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        ArgumentError: the model still has lazy (uninitialised) tensors.
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
    require_module(model, "load_trainable")
    _require_materialised(model, "load_trainable")
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
