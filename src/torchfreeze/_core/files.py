"""Atomic file writes: temporary file in the destination's directory, fsync, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchfreeze.errors import CheckpointError

__all__ = ["atomic_write"]


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
        raise CheckpointError(
            f"path={str(dest)!r} is a directory; pass a file path such as {str(dest / 'trainable.safetensors')!r}."
        )
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
