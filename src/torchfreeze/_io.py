"""Small I/O helpers shared by the library: tensor bytes, atomic writes, process memory.

* :func:`tensor_bytes` / :func:`hash_tensor_bytes` — the raw bytes of a tensor,
  zero-copy where possible, and feeding them to a :mod:`hashlib` object (used by
  the feature cache's keys and by checkpoint fingerprints);
* :func:`atomic_write` — temporary file in the destination's directory, then
  ``os.replace`` (used by checkpoints, the feature cache's disk store and the demo);
* :func:`rss_kib`, :func:`peak_rss_kib`, :func:`reset_peak_rss` — the process's
  resident set size and its peak (used by the demo and ``torchfreeze bench``).
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchfreeze._errors import CheckpointError

__all__ = [
    "tensor_bytes",
    "hash_tensor_bytes",
    "atomic_write",
    "rss_kib",
    "peak_rss_kib",
    "reset_peak_rss",
]

_HASH_CHUNK = 16 * 2**20  # bytes per hashlib.update call


# --------------------------------------------------------------------------- tensor bytes


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy view of a dense tensor's bytes (flat, unsigned bytes).

    The tensor is detached, moved to CPU, conjugation/negation views are
    resolved and it is made contiguous first (a copy only when one of these is
    needed). The returned view keeps the memory it points to alive.

    Args:
        t: a strided (dense) tensor of any dtype.

    Returns:
        A ``memoryview`` of format ``"B"`` and ``t.numel() * t.element_size()`` bytes.

    >>> bytes(tensor_bytes(torch.tensor([1, 2], dtype=torch.uint8)))
    b'\\x01\\x02'
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    buf: Any = (ctypes.c_char * n).from_address(t.data_ptr())
    buf._owner = t  # the view below keeps ``buf`` alive, and ``buf`` keeps the tensor alive
    return memoryview(buf).cast("B")


def hash_tensor_bytes(h: Any, t: torch.Tensor) -> None:
    """Feed a tensor's raw bytes (nothing else: no dtype, no shape) to a hashlib object.

    Streams in 16 MiB slices of a zero-copy view, so it works on tensors of any size.

    Args:
        h: a :mod:`hashlib` object (anything with ``update(bytes-like)``).
        t: a strided tensor.

    >>> import hashlib
    >>> h = hashlib.sha256(); hash_tensor_bytes(h, torch.zeros(2, dtype=torch.uint8))
    >>> h.hexdigest() == hashlib.sha256(b"\\0\\0").hexdigest()
    True
    """
    mv = tensor_bytes(t)
    if mv.nbytes <= _HASH_CHUNK:
        h.update(mv)
        return
    for start in range(0, mv.nbytes, _HASH_CHUNK):
        h.update(mv[start : start + _HASH_CHUNK])


# --------------------------------------------------------------------------- atomic write


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[str], Any], *, durable: bool = True) -> Path:
    """Write a file atomically: ``write_fn`` writes a temporary file next to ``path``, then rename.

    The temporary file lives in the same directory (so the rename is atomic), gets the
    usual permissions (``0o666`` minus the umask), and is removed if ``write_fn`` fails.
    With ``durable=True`` it is flushed to disk with ``fsync`` before ``os.replace`` puts
    it in place, and the directory is synced after. A process killed at any moment leaves
    either the previous file or the new one, never a mix.

    Args:
        path: the destination file; its directory must exist.
        write_fn: called with the temporary path (a ``str``); it must write the whole file there.
        durable: also ``fsync`` the file and its directory (checkpoints); ``False`` for
            entries that can be recomputed (the feature cache), where the rename alone suffices.

    Returns:
        The destination as a ``Path``.

    Raises:
        CheckpointError: the directory does not exist or ``path`` is a directory.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> p = atomic_write(os.path.join(d, "x.txt"), lambda tmp: open(tmp, "w").write("hi"))
        >>> p.read_text()
        'hi'
    """
    dest = Path(os.fspath(path))
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(
            f"path={str(dest)!r}: the directory {str(parent)!r} does not exist; "
            f"create it first (os.makedirs({str(parent)!r}, exist_ok=True))."
        )
    if dest.is_dir():
        raise CheckpointError(f"path={str(dest)!r} is a directory; pass a file path such as {str(dest / 'trainable.safetensors')!r}.")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        try:  # make the rename itself durable
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    return dest


# --------------------------------------------------------------------------- process memory


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or -1 when unavailable."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def peak_rss_kib() -> int:
    """Peak resident set size in KiB since the last :func:`reset_peak_rss` (or process start).

    Linux ``VmHWM``; elsewhere ``getrusage`` (which cannot be reset).

    >>> peak_rss_kib() > 0
    True
    """
    peak = _status_kib("VmHWM")
    if peak >= 0:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss // 1024 if sys.platform == "darwin" else maxrss


def rss_kib() -> int:
    """Current resident set size in KiB (Linux ``VmRSS``; elsewhere the peak).

    >>> rss_kib() > 0
    True
    """
    now = _status_kib("VmRSS")
    return now if now >= 0 else peak_rss_kib()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: ``/proc/self/clear_refs``); False if impossible.

    >>> isinstance(reset_peak_rss(), bool)
    True
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
