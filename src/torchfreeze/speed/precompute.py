"""Run a frozen backbone once over a data set and serve its features: ``precompute_features``.

The fastest path for linear probes and feature extraction (issue 13): the backbone runs once,
under ``torch.inference_mode()``, in eval mode, over the data set in order; every later epoch only
looks rows up. See docs/speed.md for when it pays off against ``cache_features``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, default_collate

from torchfreeze._core.checks import require_choice, require_module, require_positive_int, short_repr
from torchfreeze._core.files import reason, require_path
from torchfreeze._core.mode import eval_mode
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CacheRefusedError, CheckpointError
from torchfreeze.speed import _features_file as ffile
from torchfreeze.speed._extract import (
    Allocate,
    Result,
    UserOSError,
    item_batches,
    memory,
    run,
    run_device,
    tensor_batches,
    write,
)
from torchfreeze.speed._items import Split, difference, item_digest, split_item
from torchfreeze.speed.keys import autocast_state, module_fingerprint
from torchfreeze.speed.precomputed import Layout, PrecomputedFeatures
from torchfreeze.speed.refusal import cache_refusal_reasons

__all__ = ["precompute_features", "PrecomputedFeatures"]

Method = Literal["auto", "forward", "forward_features"]
_VERB = "precompute_features"
_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- arguments


def _require_dataset(dataset: Any) -> int:
    fix = "Fix: pass a map-style data set (a torch Dataset with __len__ and __getitem__, or a list of items)."
    shown = f"{_VERB}(dataset={short_repr(dataset)})"
    if isinstance(dataset, (IterableDataset, str, bytes, dict)) or not hasattr(dataset, "__getitem__"):
        raise ArgumentTypeError(f"{shown}: expected a map-style data set, got {type(dataset).__name__}. {fix}")
    try:
        n = len(dataset)
    except TypeError:
        raise ArgumentTypeError(f"{shown}: the data set has no length (__len__). {fix}") from None
    if n == 0:
        raise ArgumentError(f"{shown}: the data set is empty; there is nothing to compute. Fix: pass a non-empty one.")
    return n


def _require_dtype(dtype: Any) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(
            f"{_VERB}(dtype={short_repr(dtype)}): expected a torch.dtype or None, got {type(dtype).__name__}. "
            "Fix: pass dtype=torch.bfloat16 (or torch.float16) to halve the memory, or None to keep the output's."
        )
    if dtype not in _FLOATING:
        raise ArgumentError(
            f"{_VERB}(dtype={dtype}): expected a floating dtype ({', '.join(map(str, _FLOATING))}). "
            "Fix: pass dtype=torch.bfloat16 or torch.float16 to halve the memory, or None."
        )


def _require_directory(directory: Any) -> Path | None:
    if directory is None:
        return None
    where = require_path(directory, _VERB, "directory")
    if where.exists() and not where.is_dir():
        raise ArgumentError(
            f"{_VERB}(directory={short_repr(str(where))}): the path exists and is not a directory. "
            "Fix: pass a directory path (it is created if missing), or None to keep the features in memory."
        )
    return where


def _require_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ArgumentTypeError(
            f"{_VERB}(device={short_repr(device)}): expected a device ('cpu', 'cuda', torch.device) or None, got "
            f"{type(device).__name__}. Fix: pass device='cuda' to keep the features on the GPU."
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise ArgumentError(
            f"{_VERB}(device={short_repr(device)}): not a device name. Fix: pass 'cpu', 'cuda' or 'cuda:0'."
        ) from None


def _require_count(value: Any, argument: str, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"{_VERB}({argument}={short_repr(value)}): expected an int >= 0, got {type(value).__name__}. "
            f"Fix: pass e.g. {argument}={example}."
        )
    if value < 0:
        raise ArgumentError(f"{_VERB}({argument}={value}): expected an int >= 0. Fix: pass e.g. {argument}={example}.")
    return value


def _method(backbone: nn.Module, method: Method) -> tuple[str, Callable[[Any], Any]]:
    features = getattr(backbone, "forward_features", None)
    if method == "forward_features" or (method == "auto" and callable(features)):
        if not callable(features):
            raise ArgumentError(
                f"{_VERB}(method='forward_features'): {type(backbone).__name__} has no forward_features method. "
                "Fix: pass method='forward' (or 'auto')."
            )
        return "forward_features", features
    return "forward", lambda x: backbone(**x) if isinstance(x, Mapping) else backbone(x)


def _refusal(backbone: nn.Module, reasons: list[str]) -> CacheRefusedError:
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    return CacheRefusedError(
        f"{_VERB}(backbone=...): cannot precompute the features of this {type(backbone).__name__}: {shown}. "
        "It runs in eval mode here (dropout off, BatchNorm on running statistics); what is refused trains, or "
        "stays random in eval. Fix: freeze it (`backbone.requires_grad_(False)` or `torchfreeze.freeze(backbone)`) "
        "and remove train-mode pins (`torchfreeze.unpin_mode(backbone)`); for a Composite pass `model.backbone`."
    )


# --------------------------------------------------------------------------- determinism


def _sample(dataset: Any, n: int, verify: int) -> list[Any]:
    """Read ``verify`` items spread over the data set twice; refuse a random data set. The first reads."""
    count = min(verify, n)
    spread = sorted({round(k * (n - 1) / (count - 1)) for k in range(count)}) if count > 1 else [0] * count
    indices = spread or sorted({0, n - 1})
    first = [dataset[i] for i in indices]
    if verify:
        for i, item in zip(indices, first, strict=True):
            where = difference(item, dataset[i])
            if where is not None:
                raise CacheRefusedError(
                    f"{_VERB}(dataset=...): reading item {i} twice gave different {where}, so the data set is random "
                    "(data augmentation such as RandomResizedCrop or RandomHorizontalFlip, or added noise): features "
                    "computed once would keep one random draw for every epoch. Fix: build the data set without "
                    "augmentation for feature extraction (deterministic resize and crop), or keep the augmentation "
                    "and use cache_features(backbone) (its content keys stay correct under augmentation), or train "
                    "without precomputing."
                )
    return first


# --------------------------------------------------------------------------- directory


def _key(backbone: nn.Module, method: str, sample: list[Any], n: int, settings: str, salt: str) -> str:
    h = hashlib.sha256()
    h.update(f"{ffile.FORMAT}|{module_fingerprint(backbone, salt=salt)}|{method}|{n}|{settings}|".encode())
    h.update(f"{torch.__version__}|{autocast_state()}|{item_digest(sample)}".encode())
    return h.hexdigest()


def _reuse(path: Path, key: str, n: int, device: torch.device, *, check: bool = True) -> PrecomputedFeatures | None:
    try:
        metadata, tensors = ffile.load(str(path), key, check=check)
        layout, features, rest = Layout.read(metadata, tensors, n)
    except ffile.FileProblem:
        return None
    features = [t.to(device) for t in features]
    return PrecomputedFeatures(layout, features, rest, path=path, reused=True)


def _new_directories(where: Path) -> list[Path]:
    """The directories that creating ``where`` adds (deepest last)."""
    missing: list[Path] = []
    for p in [where, *where.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing[::-1]


def _make_directory(where: Path) -> None:
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            f"{_VERB}(directory={short_repr(str(where))}): the directory {reason(error)}; nothing was written. "
            "Fix: pass a directory you can write to, or directory=None to keep the features in memory."
        ) from error


# --------------------------------------------------------------------------- public


def precompute_features(
    backbone: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    directory: str | os.PathLike[str] | None = None,
    verify: int = 8,
    device: str | torch.device | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    method: Method = "auto",
    salt: str = "",
) -> PrecomputedFeatures:
    """Run a frozen backbone once over a map-style data set; return a data set of its features.

    The backbone runs in eval mode (:func:`torchfreeze.eval_mode`: every module's train/eval
    flag is restored afterwards; a backbone left in train mode gives the features of
    ``backbone.eval()``, which is what feature extraction means) under ``torch.inference_mode()``,
    on the device of its parameters, over the items in order, ``batch_size`` at a time: the
    features are bit-identical to a batched eval ``no_grad`` forward with the same batch size.
    An item is ``x`` or ``(x, *rest)``; the returned data set gives ``feature`` or
    ``(feature, *rest)`` (see :class:`PrecomputedFeatures`). ``feature`` is
    ``backbone.forward_features(x)`` when the backbone has that method (the backbone protocol of
    ``Composite``, ``ModuleBackbone``, ``HFEncoder``; ``method="forward"`` overrides), else
    ``backbone(x)`` (``backbone(**x)`` for a mapping ``x``, such as tokenizer output).

    Before the run, ``verify`` items spread over the data set are read twice and compared bit
    for bit: a random data set (augmentation) is refused. A plain ``TensorDataset`` is read by
    slicing its tensors (the same items, without per-item work); other data sets through a
    ``DataLoader`` (in order, ``num_workers``, ``collate_fn`` for the inputs).

    With ``directory``, the features (and the targets) go into a safetensors file there, written
    through a memory map and renamed into place, and mapped copy-on-write when read back. A later
    call maps that file instead of running the backbone when everything that makes the features
    is the same: the backbone's fingerprint (weights, buffers, structure, public attributes),
    the method, the data set's length and the content of the sampled items, ``batch_size``,
    ``dtype``, the backbone's device type, the collate function's name, the autocast state, the
    torch version and ``salt``. The code of ``forward`` or of the data set is not seen: change
    ``salt`` after changing them. Of the data, only the length and the sampled items are seen
    (the ``verify`` items; the first and the last with ``verify=0``): editing items that were not
    sampled (cleaning a few labels or inputs) is not seen and the old file would be reused, so
    change ``salt`` after editing the data (e.g. ``salt="data-v2"``). The file is untrusted
    input: one that is not a regular file, foreign, written for other settings, truncated or damaged (a SHA-256 over header and data,
    checked on every reuse) is computed again and replaced, never used.

    Args:
        backbone: a frozen module (no trainable parameter, nothing random in eval mode).
        dataset: a map-style data set (``__len__`` and ``__getitem__``) with deterministic items.
        batch_size: items per forward pass.
        dtype: store floating features in this dtype (``torch.bfloat16``/``float16`` halve the
            memory; the features are then given in that dtype); ``None`` keeps the output's.
        directory: keep the features in a file in this directory (created if missing) and reuse it.
        verify: how many items to read twice before the run (``0``: no check).
        device: where the features are kept and served (default CPU; ``"cuda"`` keeps them on the GPU).
        collate_fn: batches the inputs ``x`` of the items (default ``torch.utils.data.default_collate``).
        num_workers: ``DataLoader`` worker processes reading the items.
        method: ``"auto"``, ``"forward"`` or ``"forward_features"`` (see above).
        salt: text mixed into the file's key (e.g. the version of your data or preprocessing).

    Returns:
        A :class:`PrecomputedFeatures` data set.

    Raises:
        ArgumentTypeError: ``backbone`` is not an ``nn.Module``, ``dataset`` is not a map-style data
            set, or another argument is of the wrong type.
        ArgumentError: an empty data set, ``batch_size < 1``, a non-floating ``dtype``, a
            ``directory`` that is a file, items or outputs of varying structure or shape.
        CacheRefusedError: the backbone has a trainable parameter or stays random in eval mode, or
            the data set gave different values for the same item (random augmentation).
        CheckpointError: the directory or the file could not be written (read-only, full disk).

    Nothing is changed on error: the backbone's modes are restored and no file is left.

    >>> from torch.utils.data import TensorDataset
    >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.GELU()).requires_grad_(False)
    >>> data = TensorDataset(torch.randn(10, 4), torch.arange(10))
    >>> ds = precompute_features(backbone, data, batch_size=4)
    >>> feature, target = ds[3]
    >>> torch.equal(feature, backbone(data.tensors[0][:4])[3]), target  # the first batch of 4
    (True, tensor(3))
    >>> [tuple(f.shape) for f, y in ds.batches(4)]
    [(4, 8), (4, 8), (2, 8)]
    """
    require_module(backbone, _VERB, "backbone")
    n = _require_dataset(dataset)
    require_positive_int(batch_size, _VERB, "batch_size", 256)
    _require_dtype(dtype)
    where = _require_directory(directory)
    _require_count(verify, "verify", 8)
    keep_on = _require_device(device)
    if collate_fn is not None and not callable(collate_fn):
        raise ArgumentTypeError(
            f"{_VERB}(collate_fn={short_repr(collate_fn)}): expected a callable or None, got "
            f"{type(collate_fn).__name__}. Fix: pass a function that batches a list of inputs."
        )
    _require_count(num_workers, "num_workers", 2)
    require_choice(method, ("auto", "forward", "forward_features"), _VERB, "method")
    if not isinstance(salt, str):
        raise ArgumentTypeError(
            f"{_VERB}(salt={short_repr(salt)}): expected a str, got {type(salt).__name__}. Fix: pass salt='v2'."
        )
    split_item(dataset[0], 0)  # an empty tuple item is refused before the run
    with eval_mode(backbone):
        reasons = cache_refusal_reasons(backbone)
        if reasons:
            raise _refusal(backbone, reasons)
        name, fn = _method(backbone, method)
        sample = _sample(dataset, n, verify)
        device_of_backbone = run_device(backbone)

        def go(allocate: Allocate) -> Result:
            if type(dataset) is TensorDataset and collate_fn is None:  # its items are rows: slice them
                return run(fn, tensor_batches(dataset, batch_size), n, device_of_backbone, dtype, allocate)
            collate = Split(collate_fn if collate_fn is not None else default_collate)
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
            return run(fn, item_batches(loader), n, device_of_backbone, dtype, allocate)

        try:
            if where is None:
                layout, stored, rest = go(memory(keep_on))
                features = [stored[c.name] for c in layout.features]
                return PrecomputedFeatures(layout, features, rest, path=None, reused=False)
            collate_name = getattr(collate_fn, "__qualname__", type(collate_fn).__qualname__)
            settings = f"{batch_size}|{dtype}|{device_of_backbone.type}|{collate_name}"
            key = _key(backbone, name, sample, n, settings, salt)
            path = where / f"features-{key[:32]}.safetensors"
            found = _reuse(path, key, n, keep_on)
            if found is not None:
                return found
            created = _new_directories(where)
            try:
                _make_directory(where)
                write(path, key, go)
            except BaseException:
                for d in reversed(created):
                    try:
                        d.rmdir()
                    except OSError:
                        break
                raise
            result = _reuse(path, key, n, keep_on, check=False)  # sealed just now
            if result is None:  # pragma: no cover - replaced by another process meanwhile
                raise ArgumentError(f"{_VERB}(directory=...): the file just written could not be read back.")
            result.reused = False
            return result
        except UserOSError as error:
            raise error.error from None
