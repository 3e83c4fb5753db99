"""Trainable-only checkpoints: ``save_trainable`` / ``load_trainable``.

One safetensors file holding only what training can change, with the freeze state and a
fingerprint of the frozen base in its metadata. Every write goes through
:func:`torchfreeze._core.files.atomic_write`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from torchfreeze._core.behaviour import is_normalization, tracks_running_stats
from torchfreeze._core.canonical import canonical_parameter_names
from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.files import read_regular_file, reason, require_path, write_bytes_atomic
from torchfreeze._core.fingerprint import fingerprint
from torchfreeze._core.uses import parameter_uses
from torchfreeze._core.wrappers import copy_full_into, full_tensors, sharded, unwrap
from torchfreeze.errors import ArgumentError, CheckpointError, FreezeStateError
from torchfreeze.training._watch import (
    eval_pinned_ids,
    frozen_ids,
    is_frozen_batchnorm,
    mutating_buffers,
    owns_only_frozen,
    refuse_meta,
)
from torchfreeze.training.state import _validate_freeze_state, freeze_state, load_freeze_state

__all__ = ["save_trainable", "load_trainable"]

CHECKPOINT_FORMAT = "torchfreeze.trainable"
CHECKPOINT_VERSION = 1


def _partition(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split the model's ``state_dict`` tensors into (trainable part, frozen base), each tensor once.

    Names are ``state_dict``'s (the first name of a tied tensor), so a wrapper that hides its level
    from ``state_dict`` (the feature cache) changes nothing. The frozen base holds the frozen
    parameters and the persistent buffers of modules that training cannot change: a module whose
    own parameters are all frozen (a normalisation layer that tracks running statistics only when
    it is also pinned eval), and ``FrozenBatchNorm`` layers. Buffers that a frozen module rewrites
    in train mode (spectral normalisation's ``weight_u``/``weight_v``, see
    :func:`~torchfreeze.training._watch.mutating_buffers`) go with the trainable part unless the
    module is pinned eval. Everything else (trainable parameters, buffers of modules that train or
    whose statistics still update) is the trainable part.
    """
    frozen_params = frozen_ids(model)
    eval_ids = eval_pinned_ids(model)
    owners: dict[int, tuple[nn.Module, str]] = {}
    for m in model.modules():
        for bname, b in m._buffers.items():
            if b is not None:
                owners.setdefault(id(b), (m, bname))
    trainable: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) not in owners:  # a parameter
            (frozen if id(t) in frozen_params else trainable)[name] = t
            continue
        m, bname = owners[id(t)]
        if is_frozen_batchnorm(m):
            base = True
        elif owns_only_frozen(m, frozen_params):
            base = not (is_normalization(m) and tracks_running_stats(m)) or id(m) in eval_ids
            if bname in mutating_buffers(m) and id(m) not in eval_ids:
                base = False
        else:
            base = False
        (frozen if base else trainable)[name] = t
    return trainable, frozen


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every name in ``state_dict`` (all paths of tied tensors) -> the live tensor."""
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def _require_materialised(model: nn.Module, verb: str) -> None:
    """Refuse a model with lazy (uninitialised) or meta-device tensors: they have no values to save or fill."""
    tensors = model.state_dict(keep_vars=True).items()
    lazy = [n for n, t in tensors if isinstance(t, torch.Tensor) and is_lazy(t)]
    if lazy:
        raise ArgumentError(
            f"{verb}(model=...): {len(lazy)} tensor(s) are not initialised yet (lazy modules: {lazy[:5]}). "
            "Fix: run one forward pass on a sample batch first, so that they get their shapes."
        )
    refuse_meta(model, verb)


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

    On an FSDP2 (DTensor) model it is collective: every rank calls it, the tensors are gathered
    and rank 0 writes the file, the same file an unsharded model gives (``docs/distributed.md``).

    Args:
        model: the model (frozen base plus trained parts).
        path: destination file; its directory must exist. Written through a temporary file and
            ``os.replace``: a crash leaves the previous file intact.

    Returns:
        The path written.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        ArgumentTypeError: ``path`` is not a ``str`` / ``os.PathLike``.
        ArgumentError: the model still has lazy (uninitialised) or meta-device tensors.
        CheckpointError: the directory does not exist, is read-only, or the disk is full; the
            previous file (if any) is left as it was and no temporary file remains.

    Example:
        >>> import os, tempfile, torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> p = save_trainable(m, os.path.join(tempfile.mkdtemp(), "head.safetensors"))
        >>> sorted(__import__("safetensors.torch").torch.load_file(p))
        ['1.bias', '1.weight']
    """
    require_module(model, "save_trainable")
    require_path(path, "save_trainable")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    _require_materialised(model, "save_trainable")
    st = _safetensors()
    trainable, frozen = _partition(model)
    collective = sharded([*trainable.values(), *frozen.values()])  # FSDP2: every rank calls, rank 0 writes
    trainable, frozen = full_tensors(trainable), full_tensors(frozen)
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
    if collective and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # the file exists when every rank returns
        return Path(os.fspath(path))
    data: bytes = st.save(tensors, metadata=meta)  # serialised here: safetensors' own temporary files never appear
    written = write_bytes_atomic(path, data, verb="save_trainable")
    if collective:
        torch.distributed.barrier()
    return written


def _header_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (bounded: the header lies inside ``data``)."""
    try:
        (size,) = struct.unpack_from("<Q", data, 0)
        if size > len(data) - 8:
            raise ValueError("header length past the end of the file")
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("metadata is not a map of strings")
    except (struct.error, ValueError, RecursionError, AttributeError) as e:
        raise CheckpointError(
            f"{where} is not a readable safetensors file (truncated or corrupted?): {short_repr(str(e))}. "
            "Fix: save it again with torchfreeze.save_trainable, or use another copy."
        ) from e
    return meta


def _link_target(path: Path) -> str:
    """`` (a symbolic link to '<target>')`` when ``path`` is a link, for messages; else ``""``."""
    try:
        return f" (a symbolic link to {short_repr(os.readlink(path), 60)})" if path.is_symlink() else ""
    except OSError:
        return ""


def _read_checkpoint(path: str | os.PathLike[str], verb: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    st = _safetensors()  # a clear ImportError when the package is missing
    p = require_path(path, verb)
    where = f"{verb}(path={short_repr(str(p))})"
    try:  # one bounded read of a regular file; no memory map, so a concurrent writer cannot crash us
        data = read_regular_file(p)
    except OSError as e:
        raise CheckpointError(
            f"{where}: the path{_link_target(p)} {reason(e)}; expected the file torchfreeze.save_trainable "
            "wrote. Fix: pass that file's path."
        ) from e
    from safetensors import SafetensorError

    meta = _header_metadata(data, where)
    try:
        tensors: dict[str, torch.Tensor] = st.load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:  # what safetensors raises for a bad file
        raise CheckpointError(
            f"{where} is not a readable safetensors file (truncated or corrupted?): {short_repr(str(e))}. "
            "Fix: save it again with torchfreeze.save_trainable, or use another copy."
        ) from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where} is a safetensors file but not a torchfreeze trainable checkpoint "
            f"(metadata format={short_repr(meta.get('format'))}, expected {CHECKPOINT_FORMAT!r}). Fix: load a full "
            "state_dict with safetensors.torch.load_file + model.load_state_dict instead."
        )
    if meta.get("version") != str(CHECKPOINT_VERSION):
        raise CheckpointError(
            f"{where} has checkpoint version {short_repr(meta.get('version'))}; this torchfreeze reads "
            f"version {CHECKPOINT_VERSION}. Fix: upgrade torchfreeze."
        )
    if fingerprint(tensors) != meta.get("content_sha256"):
        raise CheckpointError(
            f"{where} is corrupted: its tensors do not match the checksum stored when it was "
            "saved. Fix: use another copy or save it again."
        )
    return meta, tensors


def _metadata(meta: Mapping[str, str], where: str) -> tuple[dict[str, Any], list[str]]:
    """The freeze state and frozen-base names of the metadata, with their JSON types checked."""
    try:
        state = json.loads(meta["freeze_state"])
        frozen_names = json.loads(meta["frozen_tensors"])
    except (KeyError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{where}: metadata is damaged ({short_repr(str(e))}). Fix: save the checkpoint again."
        ) from e
    if not isinstance(frozen_names, list) or not all(isinstance(n, str) for n in frozen_names):
        raise CheckpointError(
            f"{where}: metadata 'frozen_tensors' must be a list of tensor names, got {short_repr(frozen_names)}. "
            "Fix: save the checkpoint again."
        )
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{where}: metadata 'freeze_state' must be a dict, got {short_repr(state)}. Fix: save the checkpoint again."
        )
    return state, frozen_names


def _contradictions(
    model: nn.Module, state: Mapping[str, Any], frozen_names: list[str], tensors: Mapping[str, torch.Tensor]
) -> list[str]:
    """Metadata fields that disagree with each other or with the file's tensors (checked on ``model``'s names)."""
    problems = []
    both = sorted(set(frozen_names) & set(tensors))
    if both:
        problems.append(f"tensors listed both in the file and in its frozen base: {both[:10]}")
    if len(set(frozen_names)) != len(frozen_names):
        problems.append("the frozen-base list names a tensor twice")
    names = canonical_parameter_names(model)
    by_name = {n: pid for pid, ns in names.items() for n in ns}
    state_frozen = {by_name[n] for n in state.get("frozen", []) if n in by_name}
    converted = tuple(f"{n}." for n in state.get("converted_norms", []))
    only_frozen_uses = {pid for pid, e in parameter_uses(model).items() if not e.trainable_paths and e.frozen_use_paths}
    base_trains = [
        n
        for n in frozen_names
        if n in by_name
        and by_name[n] not in state_frozen
        and by_name[n] not in only_frozen_uses
        and not n.startswith(converted)
    ]
    if base_trains:
        problems.append(f"the frozen base lists parameters that its freeze state makes trainable: {base_trains[:10]}")
    file_frozen = [n for n in tensors if n in by_name and by_name[n] in state_frozen]
    if file_frozen:
        problems.append(
            f"the file holds trained values for parameters that its freeze state freezes: {file_frozen[:10]}"
        )
    return problems


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
        ArgumentTypeError: ``path`` is not a ``str`` / ``os.PathLike``.
        ArgumentError: the model still has lazy (uninitialised) or meta-device tensors.
        CheckpointError: missing, unreadable, truncated or corrupted file, or not a regular file
            (a FIFO, a device); metadata that contradicts itself; another architecture; another
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
    meta, tensors = _read_checkpoint(path, "load_trainable")
    where = f"load_trainable(path={short_repr(os.fspath(path))})"
    state, frozen_names = _metadata(meta, where)
    try:
        problems = _validate_freeze_state(
            model, state, strict=False, arg="the checkpoint's freeze state", verb="load_trainable"
        )
    except FreezeStateError as e:
        raise CheckpointError(
            f"{where}: metadata is damaged ({short_repr(str(e), 200)}). Fix: save the checkpoint again."
        ) from e
    other = " (it was saved from another architecture)" if problems else ""
    problems += _contradictions(model, state, frozen_names, tensors)

    live = _state_tensors(model)
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
    uncovered = [n for n, t in live.items() if id(t) not in covered]
    if uncovered:
        problems.append(
            f"the model has {len(uncovered)} tensor(s) that are neither in the file nor in its frozen base: "
            f"{uncovered[:10]}"
        )
    if problems:
        listing = "\n  - ".join(problems[:20]) + (
            f"\n  - ... ({len(problems) - 20} more)" if len(problems) > 20 else ""
        )
        raise CheckpointError(
            f"{where} does not fit this model{other} ({len(problems)} mismatch(es)); nothing was changed:\n  - {listing}"
            "\nFix: load it into the model it was saved from (same architecture, same frozen part)."
        )
    base = fingerprint(full_tensors({n: live[n] for n in frozen_names}))  # FSDP2: gathered on every rank
    if base != meta.get("base_fingerprint"):
        raise CheckpointError(
            f"{where} was saved on a different frozen base: the frozen weights of this model have "
            f"fingerprint {base[:19]}..., the checkpoint expects {str(meta.get('base_fingerprint'))[:19]}...; "
            "nothing was changed. Fix: load the same pretrained weights into the model first (the checkpoint "
            "holds only the trained part)."
        )
    load_freeze_state(model, state)
    # restoring the state may swap BatchNorm <-> FrozenBatchNorm modules: copy into the current tensors
    live = _state_tensors(model)
    for n, t in tensors.items():
        copy_full_into(live[n], t)  # a DTensor (FSDP2) takes this rank's part
    return model
