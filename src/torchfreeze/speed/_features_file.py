"""The file of :func:`~torchfreeze.speed.precompute_features`: safetensors, written in place, read back zero-copy.

Layout (the safetensors format, so ``safetensors.safe_open`` reads it too): 8 bytes (little-endian
length ``N`` of the header), ``N`` bytes of JSON padded with spaces so that the data starts on an
8-byte boundary, then the tensors back to back, widest element type first (every tensor starts on
a multiple of its element size, so a view of the mapped bytes needs no copy). The header's
``__metadata__`` holds the format name, the key the file was computed for, the structure of the
items and of the backbone's output, and a SHA-256 over the rest of the header and the data bytes.

:func:`create` maps a new file (``torch.UntypedStorage.from_file``, shared) so that rows are
written straight into it; :func:`seal` writes the checksum into the header. :func:`load` treats the
file as untrusted input: regular file, bounded header, JSON of the expected shape, the expected
format and key, every tensor's dtype, shape and offsets consistent with the file's size, and the
checksum of the data; anything else raises :class:`FileProblem` (the caller recomputes). The file
is then mapped copy-on-write (``shared=False``): nothing is read until a row is used, and writing
to a returned tensor never changes the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchfreeze._core.fingerprint import hash_tensor_bytes

__all__ = ["FORMAT", "Column", "FileProblem", "create", "seal", "load"]

FORMAT = "torchfreeze.precompute/1"
#: the largest header read back (a bound on the untrusted read)
MAX_HEADER_BYTES = 1 << 24
_PLACEHOLDER = "0" * 64
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


class FileProblem(Exception):
    """Why a file is not reused (missing, foreign, written for other settings, truncated, damaged)."""


@dataclass(frozen=True)
class Column:
    """One tensor of the file: its name, dtype and full shape (rows first)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the column's data."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def storable(dtype: torch.dtype) -> bool:
    """Whether a tensor of ``dtype`` can go into the file."""
    return dtype in _DTYPES


def _layout(
    columns: Sequence[Column], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, int], int, dict[str, Any]]:
    order = sorted(columns, key=lambda c: (-torch.empty((), dtype=c.dtype).element_size(), c.name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offsets: dict[str, int] = {}
    position = 0
    for column in order:
        offsets[column.name] = position
        header[column.name] = {
            "dtype": _DTYPES[column.dtype],
            "shape": list(column.shape),
            "data_offsets": [position, position + column.nbytes],
        }
        position += column.nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return text, offsets, position, header


def _digest(header: dict[str, Any], data: Tensor) -> str:
    """SHA-256 over the header (without the digest itself, in canonical JSON) and the data bytes."""
    described = {**header, "__metadata__": {k: v for k, v in header["__metadata__"].items() if k != "data_sha256"}}
    h = hashlib.sha256(json.dumps(described, separators=(",", ":"), sort_keys=True).encode())
    hash_tensor_bytes(h, data)
    return h.hexdigest()


def _map(path: str, *, shared: bool, size: int) -> Tensor:
    """The file's first ``size`` bytes as a ``uint8`` tensor over a memory map (``shared``: writes reach the file)."""
    storage: Any = torch.UntypedStorage.from_file(path, shared=shared, nbytes=size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _view(raw: Tensor, start: int, column: Column) -> Tensor:
    return raw[start : start + column.nbytes].view(column.dtype).view(column.shape)


def _reserve(path: str, size: int) -> None:
    """Give the file its blocks now: a full disk is an ``OSError`` here, not a ``SIGBUS`` while writing the map."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except (AttributeError, OSError) as error:  # no fallocate here (some file systems, macOS)
            if isinstance(error, OSError) and error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def create(path: str, columns: Sequence[Column], metadata: Mapping[str, str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Size and map a new file at ``path``; the header is written, the columns are views to fill.

    Returns:
        The whole file as a ``uint8`` tensor (pass it to :func:`seal`), and one writable view per column.
    """
    header, offsets, total, _ = _layout(columns, {**metadata, "data_sha256": _PLACEHOLDER})
    size = 8 + len(header) + total
    _reserve(path, size)
    raw = _map(path, shared=True, size=size)
    raw[:8].copy_(torch.frombuffer(bytearray(len(header).to_bytes(8, "little")), dtype=torch.uint8))
    raw[8 : 8 + len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    base = 8 + len(header)
    return raw, {c.name: _view(raw, base + offsets[c.name], c) for c in columns}


def seal(raw: Tensor, columns: Sequence[Column], metadata: Mapping[str, str]) -> None:
    """Write the SHA-256 of header and data (now complete) into the header of a file from :func:`create`."""
    header, _, _, described = _layout(columns, {**metadata, "data_sha256": _PLACEHOLDER})
    digest = _digest(described, raw[8 + len(header) :])
    final, _, _, _ = _layout(columns, {**metadata, "data_sha256": digest})
    if len(final) != len(header):  # pragma: no cover - the digest has the placeholder's length
        raise RuntimeError("precompute_features: header length changed while sealing")
    raw[8 : 8 + len(final)].copy_(torch.frombuffer(bytearray(final), dtype=torch.uint8))


def _read_header(path: str) -> tuple[bytes, int]:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as error:
        raise FileProblem("no file") from error
    except OSError as error:
        why = "a symbolic link" if error.errno == errno.ELOOP else (error.strerror or "unreadable")
        raise FileProblem(f"not readable ({why})") from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem("not a regular file")
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise FileProblem("truncated (no header)")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES or 8 + length > info.st_size:
            raise FileProblem(f"header length {length} does not fit the file ({info.st_size} bytes)")
        header = os.pread(fd, length, 8)
        if len(header) < length:
            raise FileProblem("truncated header")
        return header, info.st_size
    finally:
        os.close(fd)


def _entries(header: bytes, key: str) -> tuple[dict[str, Any], dict[str, tuple[Column, int]], int]:
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise FileProblem("the header is not JSON") from error
    if not isinstance(parsed, dict):
        raise FileProblem("the header is not a JSON object")
    whole = dict(parsed)
    metadata = parsed.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileProblem("no metadata")
    if metadata.get("format") != FORMAT:
        raise FileProblem(f"another format ({str(metadata.get('format'))[:40]!r})")
    if metadata.get("key") != key:
        raise FileProblem("written for another backbone, data set or settings")
    entries: dict[str, tuple[Column, int]] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in parsed.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FileProblem(f"entry {name[:40]!r} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        if not ints or not all(type(v) is int and v >= 0 for v in [*shape, *offsets]) or dtype not in _BY_NAME:
            raise FileProblem(f"entry {name[:40]!r} is malformed")
        column = Column(name, _BY_NAME[dtype], tuple(shape))
        begin, end = offsets
        if end - begin != column.nbytes or begin % torch.empty((), dtype=column.dtype).element_size():
            raise FileProblem(f"entry {name[:40]!r} has inconsistent offsets")
        entries[name] = (column, begin)
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise FileProblem("the data has gaps or overlaps")
        position = end
    return whole, entries, position


def load(path: str, key: str, *, check: bool = True) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Validate and map the file at ``path`` written for ``key``; :class:`FileProblem` if it is not usable.

    Args:
        path: the file.
        key: the key it must have been written for (metadata ``key``).
        check: verify the SHA-256 of header and data (``False`` only for a file this process just sealed).

    Returns:
        The metadata, and one read-only-by-convention tensor per column (copy-on-write views of the map).
    """
    header, size = _read_header(path)
    whole, entries, total = _entries(header, key)
    metadata: dict[str, str] = whole["__metadata__"]
    base = 8 + len(header)
    if base % 8:
        raise FileProblem("the data is not 8-byte aligned")
    if base + total != size:
        raise FileProblem(f"size {size} bytes, expected {base + total} (truncated or extended)")
    try:
        raw = _map(path, shared=False, size=size)
    except RuntimeError as error:  # replaced or truncated since the header was read
        raise FileProblem(f"cannot be mapped ({str(error)[:80]})") from error
    if check and _digest(whole, raw[base:]) != metadata.get("data_sha256"):
        raise FileProblem("damaged (the checksum of header and data does not match)")
    return metadata, {name: _view(raw, base + begin, column) for name, (column, begin) in entries.items()}
