"""Pretrained weights: where they live, their sha256, and an atomic, verified load.

A :class:`Weights` names one safetensors file, either a local path or a file
inside an installed Python package (``"package:relative/path"``), together with
its sha256 and free-form metadata (parameter count, license, origin, expected
input). Loading reads the file once, checks the sha256 of exactly the bytes it
is about to parse, parses safetensors only (never pickles), compares the keys
and shapes with the target module and reports every missing, unexpected or
mis-shaped key in one :class:`~torchfreeze.errors.WeightsError`. Nothing is copied
until everything has been checked, so a failed load leaves the module exactly
as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from torchfreeze._core.checks import require_bool, require_module, short_repr
from torchfreeze._core.files import read_regular_file, reason, require_path
from torchfreeze.errors import ArgumentError, ArgumentTypeError, WeightsError

__all__ = ["Weights", "sha256_file"]

_HEX = frozenset("0123456789abcdef")
_MAX_JSON_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, read in chunks.

    Args:
        path: the file to hash.

    Returns:
        The 64-character lower-case hex digest.

    Raises:
        WeightsError: the file does not exist or cannot be read.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {os.fspath(path)!r}: {exc}") from exc
    return digest.hexdigest()


def _resolve_source(source: str) -> Path:
    """Turn ``"package:relative/path"`` or a local path into a filesystem path."""
    package, sep, rel = source.partition(":")
    is_package = (
        sep
        and package
        and rel
        and "/" not in package
        and "\\" not in package
        and all(part.isidentifier() for part in package.split("."))
        and not (len(package) == 1 and package.isalpha())  # a Windows drive letter "C:"
    )
    if not is_package:
        return Path(source).expanduser()
    import importlib.util

    top = package.split(".")[0]
    try:  # the top-level name only: locating it imports nothing (a dotted name would import its parents)
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is None:
        raise WeightsError(
            f"Weights(source={short_repr(source)}): package {top!r} is not installed; expected an installed "
            f"package in 'package:relative/path'. Fix: install it (for example `pip install "
            f"{top.replace('_', '-')}`) or pass a local path."
        )
    if not locations:  # a single-file module (os.py), a built-in or an extension module: no directory to hold files
        kind = "a standard-library module" if top in sys.stdlib_module_names else "a module"
        raise WeightsError(
            f"Weights(source={short_repr(source)}): {top!r} is {kind}, not a package directory that could "
            "ship data files; expected 'package:relative/path' naming an installed package. "
            "Fix: pass a local path, or name the package that ships the file."
        )
    parts = [*package.split(".")[1:], *[p for p in rel.replace("\\", "/").split("/") if p]]
    if any(p in (".", "..") for p in parts):
        raise WeightsError(
            f"source={source!r}: '.' and '..' are not allowed in a package source; expected a path inside "
            f"the package {top!r}. Fix: name the file relative to the package, or pass a local path."
        )
    for location in locations:
        root = Path(location).resolve()
        target = root.joinpath(*parts)
        resolved = target.resolve()
        if resolved != root and root not in resolved.parents:
            raise WeightsError(
                f"source={source!r} resolves outside the package {top!r} (through a symbolic link); "
                "expected a file inside the package. Fix: pass a local path instead."
            )
        if target.exists() or location == locations[-1]:
            return target
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns on its last location


@dataclass(frozen=True)
class Weights:
    """A pretrained safetensors file with its checksum and metadata.

    Args:
        name: a short identifier, for example ``"digits-0to4"``.
        source: a local path, or ``"package:relative/path"`` naming a file inside
            an installed package (located with ``importlib.util.find_spec`` on the
            top-level name, which imports nothing; ``..`` and links out of the
            package are refused).
        sha256: the expected hex sha256 of the file (64 hex characters).
        metadata: free-form facts: parameter count, license, origin, expected input.
        target: qualified name of the submodule the file is loaded into
            (``""`` = the module passed to :meth:`load_into` itself).
        ignore_keys: keys present in the file that the module is known not to
            have (legacy buffers, an unused pooler); they are skipped silently.

    >>> w = Weights("demo", "/tmp/none.safetensors", "0" * 64, {"license": "MIT"})
    >>> w.metadata["license"]
    'MIT'
    """

    name: str
    source: str
    sha256: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    target: str = ""
    ignore_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def wrong(argument: str, value: Any, expected: str, fix: str, *, kind: type[Exception]) -> Exception:
            got = f", got {type(value).__name__}" if kind is ArgumentTypeError else ""
            return kind(f"Weights({argument}={short_repr(value)}): expected {expected}{got}. Fix: {fix}")

        if not isinstance(self.name, str):
            raise wrong(
                "name", self.name, "a string naming the weights", "e.g. name='imagenet'.", kind=ArgumentTypeError
            )
        if not self.name:
            raise wrong("name", self.name, "a non-empty name", "e.g. name='imagenet'.", kind=ArgumentError)
        source_fix = "pass a local path or 'package:relative/path'."
        if not isinstance(self.source, (str, os.PathLike)):
            raise wrong("source", self.source, "a path (str or os.PathLike)", source_fix, kind=ArgumentTypeError)
        if not os.fspath(self.source):
            raise wrong("source", self.source, "a non-empty path", source_fix, kind=ArgumentError)
        object.__setattr__(self, "source", os.fspath(self.source))
        sha_fix = "compute it with torchfreeze.hub.weights.sha256_file(path) or `sha256sum FILE`."
        if not isinstance(self.sha256, str):
            raise wrong("sha256", self.sha256, "64 hex characters (str)", sha_fix, kind=ArgumentTypeError)
        digest = self.sha256.lower()
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise wrong("sha256", self.sha256, "64 hex characters", sha_fix, kind=ArgumentError)
        object.__setattr__(self, "sha256", digest)
        if not isinstance(self.metadata, Mapping):
            raise wrong(
                "metadata", self.metadata, "a mapping", "e.g. metadata={'license': 'MIT'}.", kind=ArgumentTypeError
            )
        if not isinstance(self.target, str):
            raise wrong(
                "target", self.target, "a qualified submodule name (str, '' = the model)",
                "e.g. target='backbone'.", kind=ArgumentTypeError,
            )  # fmt: skip
        if isinstance(self.ignore_keys, str) or not all(isinstance(k, str) for k in self.ignore_keys):
            raise wrong(
                "ignore_keys", self.ignore_keys, "a tuple of key names (str)",
                "e.g. ignore_keys=('pooler.dense.weight',).", kind=ArgumentTypeError,
            )  # fmt: skip
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(self, "ignore_keys", tuple(self.ignore_keys))

    # ------------------------------------------------------------------ files
    @property
    def path(self) -> Path:
        """The file this source resolves to (it may not exist)."""
        return _resolve_source(self.source)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], *, source: str | None = None) -> Weights:
        """Read a weights description (name, source, sha256, metadata...) from JSON.

        Args:
            path: a JSON file, or ``"package:relative/path"`` to one.
            source: overrides the ``source`` written in the file.

        Returns:
            The :class:`Weights` it describes.

        Raises:
            WeightsError: the file is missing or is not a valid description.

        >>> w = Weights.from_json("torchfreeze:hub/weights/digits_cnn.json")
        >>> w.name, w.target, w.metadata["pretrain_classes"]
        ('digits-cnn-0to4', 'backbone', [0, 1, 2, 3, 4])
        """
        where = _resolve_source(os.fspath(require_path(path, "Weights.from_json")))
        try:
            data = json.loads(read_regular_file(where, max_bytes=_MAX_JSON_BYTES).decode("utf-8"))
        except OSError as exc:
            raise WeightsError(
                f"cannot read weights description {os.fspath(path)!r}: the path {reason(exc)}; expected a JSON file."
            ) from exc
        except (ValueError, RecursionError) as exc:
            raise WeightsError(f"weights description {os.fspath(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise WeightsError(
                f"weights description {os.fspath(path)!r} must be a JSON object, got {type(data).__name__}."
            )
        try:
            return cls(
                name=data["name"],
                source=source if source is not None else data["source"],
                sha256=data["sha256"],
                metadata=data.get("metadata", {}),
                target=data.get("target", ""),
                ignore_keys=tuple(data.get("ignore_keys", ())),
            )
        except (KeyError, TypeError, ArgumentError) as exc:
            raise WeightsError(
                f"weights description {os.fspath(path)!r} is invalid ({exc!s}); expected keys "
                f"'name', 'source', 'sha256' and optionally 'metadata', 'target', 'ignore_keys'. "
                "Fix: correct the JSON file."
            ) from exc

    def read_bytes(self) -> bytes:
        """Read the file and verify its sha256 (of exactly the bytes returned).

        Returns:
            The file's content.

        Raises:
            WeightsError: missing file or sha256 mismatch.
        """
        where = self.path
        try:
            data = read_regular_file(where)
        except FileNotFoundError as exc:
            raise WeightsError(
                f"weights {self.name!r}: file not found at {os.fspath(where)!r} (source="
                f"{self.source!r}). Check the path, reinstall the package that ships it, or "
                f"pass weights=None to build the model without pretrained weights."
            ) from exc
        except OSError as exc:
            raise WeightsError(
                f"weights {self.name!r}: {os.fspath(where)!r} {reason(exc)}; expected a safetensors file."
            ) from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.sha256:
            raise WeightsError(
                f"weights {self.name!r}: sha256 mismatch for {os.fspath(where)!r}: expected "
                f"{self.sha256}, got {actual}. The file is corrupted or is a different version; "
                f"restore the original file or update the recorded sha256 if the change is intended."
            )
        return data

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Verify the sha256, then parse the safetensors file.

        Returns:
            The tensors of the file, by key (on CPU).

        Raises:
            WeightsError: missing file, sha256 mismatch, not a safetensors file,
                or the ``safetensors`` package is not installed.

        >>> tensors = Weights.from_json("torchfreeze:hub/weights/digits_cnn.json").state_dict()
        >>> tuple(tensors["block1.0.weight"].shape)
        (32, 1, 3, 3)
        """
        data = self.read_bytes()
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load as _load
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise WeightsError(
                "loading weights needs the optional package 'safetensors': pip install 'torchfreeze[io]'"
            ) from exc
        try:
            tensors: dict[str, torch.Tensor] = _load(data)
            return tensors
        except SafetensorError as exc:
            raise WeightsError(
                f"weights {self.name!r}: {os.fspath(self.path)!r} is not a valid safetensors "
                f"file ({exc}). torchfreeze reads safetensors only, never pickles."
            ) from exc

    # ------------------------------------------------------------------ load
    def load_into(self, module: nn.Module, *, strict: bool = True) -> nn.Module:
        """Load the verified weights into ``module`` (into ``module.<target>``), atomically.

        Every key, shape and dtype class is checked before anything is copied;
        values are copied in place, so parameter identity, ``requires_grad`` and
        pins are unchanged.

        Args:
            module: the model (the submodule named by ``target`` receives the tensors).
            strict: when True (default) missing and unexpected keys are errors;
                when False only the keys present in both are loaded.

        Returns:
            ``module``.

        Raises:
            ArgumentTypeError: ``module`` is not an ``nn.Module``, ``strict`` not a bool.
            WeightsError: file problems, or missing/unexpected/mis-shaped keys
                (all listed in one message). The module is left unchanged.

        >>> import tempfile, pathlib, torch
        >>> from safetensors.torch import save_file
        >>> p = str(pathlib.Path(tempfile.mkdtemp()) / "lin.safetensors")
        >>> save_file({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, p)
        >>> w = Weights("lin", p, sha256_file(p))
        >>> lin = w.load_into(torch.nn.Linear(2, 2))
        >>> lin.weight.sum().item()
        4.0
        """
        require_module(module, "Weights.load_into", "module")
        require_bool(strict, "Weights.load_into", "strict")
        dest = _submodule(module, self.target, self.name)
        tensors = self.state_dict()
        _copy_checked(dest, tensors, name=self.name, strict=strict, ignore=self.ignore_keys)
        return module


def _submodule(module: nn.Module, target: str, name: str) -> nn.Module:
    if not target:
        return module
    try:
        return module.get_submodule(target)
    except AttributeError as exc:
        raise WeightsError(
            f"weights {name!r}: target={target!r} is not a submodule of {type(module).__name__}; "
            f"expected one of its qualified module names, e.g. "
            f"{[n for n, _ in module.named_modules() if n][:5]}."
        ) from exc


def _short(keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _copy_checked(
    dest: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    name: str,
    strict: bool,
    ignore: tuple[str, ...] = (),
) -> None:
    """Check every key/shape first, then copy in place; restore on any failure."""
    own = dest.state_dict(keep_vars=True)
    incoming = {k: v for k, v in tensors.items() if k not in ignore}
    missing = [k for k in own if k not in incoming]
    unexpected = [k for k in incoming if k not in own]
    mismatched = [
        f"{k!r}: file {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in incoming and tuple(incoming[k].shape) != tuple(own[k].shape)
    ]
    kinds = [
        f"{k!r}: file {incoming[k].dtype} vs model {own[k].dtype}"
        for k in own
        if k in incoming and incoming[k].is_floating_point() != own[k].is_floating_point()
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:8])}")
    if kinds:
        problems.append(f"dtype mismatches ({len(kinds)}): {'; '.join(kinds[:8])}")
    if problems:
        raise WeightsError(
            f"weights {name!r} do not fit {type(dest).__name__}: "
            + "; ".join(problems)
            + ". The model was left unchanged. Check that the weights belong to this "
            "architecture (and its configuration, e.g. num_classes), or pass strict=False "
            "to load only the matching keys."
        )
    backup: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for key, target in own.items():
                if key not in incoming:
                    continue
                backup.append((target, target.detach().clone()))
                target.copy_(incoming[key])
    except BaseException:
        with torch.no_grad():
            for target, old in backup:
                target.copy_(old)
        raise
