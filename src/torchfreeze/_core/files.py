"""Files a user points us at: path arguments, bounded reads of regular files, atomic writes.

Every file torchfreeze reads or writes goes through here, so the rules of DESIGN.md hold in one
place: a path argument is a ``str`` or ``os.PathLike`` (never ``bytes``, ``None`` or a number);
reads accept regular files only (a FIFO, a device such as ``/dev/zero``, a directory or, when
asked, a symlink is refused before a byte is read) and never read more than a bound; writes go to
a temporary file beside the destination that is renamed over it, and a failed write (full disk,
read-only directory) removes the temporary file and raises a :class:`CheckpointError` naming the
argument.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchfreeze._core.checks import short_repr
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CheckpointError

__all__ = ["atomic_write", "write_bytes_atomic", "require_path", "read_regular_file", "UnreadableFileError", "reason"]

_CHUNK = 1 << 24


class UnreadableFileError(OSError):
    """A path that is not a regular file we may read (a FIFO, a device, a symlink, too large)."""


def require_path(path: Any, verb: str, argument: str = "path") -> Path:
    """``path`` as a :class:`~pathlib.Path`; :class:`ArgumentTypeError` / :class:`ArgumentError` otherwise.

    Args:
        path: what the caller passed.
        verb: the public function's name, for the message.
        argument: the argument's name.

    Returns:
        The path.

    Raises:
        ArgumentTypeError: not a ``str`` or ``os.PathLike`` of ``str`` (``bytes``, ``None``, a number).
        ArgumentError: the empty string.

    >>> require_path("a/b.safetensors", "save_trainable").name
    'b.safetensors'
    """
    text: Any = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str):
        raise ArgumentTypeError(
            f"{verb}({argument}={short_repr(path)}): expected a file path (str or pathlib.Path), got "
            f"{type(path).__name__}. Fix: pass e.g. {argument}='checkpoints/trainable.safetensors'."
        )
    if not text or "\0" in text:
        raise ArgumentError(
            f"{verb}({argument}={short_repr(path)}): expected a non-empty file path without NUL characters. "
            f"Fix: pass e.g. {argument}='checkpoints/trainable.safetensors'."
        )
    return Path(text)


def reason(error: OSError) -> str:
    """A short phrase for why a path could not be read or written (for error messages)."""
    if isinstance(error, UnreadableFileError):
        return str(error.strerror)
    if isinstance(error, FileNotFoundError):
        return "does not exist"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, PermissionError):
        return "is not accessible (permission denied)"
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"cannot be written: the disk or the file-size limit is full ({os.strerror(error.errno)})"
    if error.errno == errno.EROFS:
        return "cannot be written: read-only file system"
    if error.errno == errno.ELOOP:
        return "is a symbolic link (refused)"
    return f"cannot be accessed ({error.strerror or error})"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(
    path: str | os.PathLike[str], *, max_bytes: int | None = None, follow_symlinks: bool = True
) -> bytes:
    """The bytes of a regular file, read once, never more than ``max_bytes``.

    The file is opened without blocking (a FIFO cannot stall the caller) and checked with
    ``fstat`` on the open descriptor: anything but a regular file is refused before a byte is
    read. The read stops at the size the file had when opened, so a file that another process
    extends or truncates meanwhile gives a short or stale copy (which a checksum then rejects),
    never a crash or an endless read. Nothing is memory-mapped.

    Args:
        path: the file.
        max_bytes: refuse a larger file (``None``: no bound besides the file's size).
        follow_symlinks: ``False`` refuses a symbolic link at ``path`` itself (``O_NOFOLLOW``).

    Returns:
        The file's content.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, OSError: as ``open`` raises them.
        UnreadableFileError: a FIFO, device, socket, symlink (when refused) or a file over ``max_bytes``.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> _ = open(p, "wb").write(b"abc")
    >>> read_regular_file(p)
    b'abc'
    >>> read_regular_file("/dev/zero")
    Traceback (most recent call last):
    ...
    torchfreeze._core.files.UnreadableFileError: [Errno 22] is a character device, not a regular file
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(os.fspath(path), flags)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_symlinks:
            raise UnreadableFileError(errno.ELOOP, "is a symbolic link, not a regular file") from error
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            raise UnreadableFileError(errno.EINVAL, f"is {_kind(info.st_mode)}, not a regular file")
        size = info.st_size
        if max_bytes is not None and size > max_bytes:
            raise UnreadableFileError(errno.EFBIG, f"is {size} bytes, more than the {max_bytes} expected")
        chunks: list[bytes] = []
        left = size
        while left > 0:
            chunk = os.read(fd, min(left, _CHUNK))
            if not chunk:  # truncated meanwhile
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


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


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[str], Any],
    *,
    durable: bool = True,
    verb: str = "atomic_write",
    argument: str = "path",
) -> Path:
    """Write a file atomically: ``write_fn`` writes a temporary file next to ``path``, then rename.

    The temporary file (``.<name>.<random>.tmp``) lives in the same directory (so the rename
    is atomic), gets the usual permissions (``0o666`` minus the umask), and is removed if
    ``write_fn`` or anything after it fails, including a full disk. With ``durable=True`` it
    is flushed to disk with ``fsync`` before ``os.replace`` puts it in place, and the directory
    is synced after. A process killed at any moment leaves either the previous file or the new
    one, never a mix; a process killed by ``SIGKILL`` during the write can leave the temporary
    file behind (see docs/file-formats.md).

    Args:
        path: the destination file; its directory must exist.
        write_fn: called with the temporary path (a ``str``); it must write the whole file there.
        durable: also ``fsync`` the file and its directory (checkpoints); ``False`` for
            entries that can be recomputed (the feature cache), where the rename alone suffices.
        verb: the public function's name, for messages.
        argument: the argument's name, for messages.

    Returns:
        The destination as a ``Path``.

    Raises:
        ArgumentTypeError: ``path`` is not a ``str`` or ``os.PathLike``.
        CheckpointError: the directory does not exist, ``path`` is a directory, or the write
            failed (read-only directory, full disk); nothing is left behind.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> p = atomic_write(os.path.join(d, "x.txt"), lambda tmp: open(tmp, "w").write("hi"))
        >>> p.read_text()
        'hi'
    """
    dest = require_path(path, verb, argument)
    shown = f"{verb}({argument}={short_repr(str(dest))})"
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        fix = (
            f"create it first (os.makedirs({short_repr(str(parent))}, exist_ok=True))."
            if not parent.exists()
            else "pass a path inside a directory."
        )
        raise CheckpointError(f"{shown}: {short_repr(str(parent))} {what}. Fix: {fix}")
    if dest.is_dir():
        raise CheckpointError(
            f"{shown}: the path is a directory. Fix: pass a file path such as "
            f"{short_repr(str(dest / 'trainable.safetensors'))}."
        )
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as error:
        raise _write_error(shown, parent, error) from error
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise _write_error(shown, parent, error) from error
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


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, **kwargs: Any) -> Path:
    """:func:`atomic_write` of ``data`` (same keyword arguments)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, **kwargs)


def _write_error(shown: str, parent: Path, error: OSError) -> CheckpointError:
    """The message of a failed write: what failed and the fix that applies to that failure."""
    where = f"(in {str(parent)!r})"
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        why, fix = f"the file {reason(error)} {where}", "free disk space, or pass a path on another disk."
    elif isinstance(error, FileNotFoundError):  # the directory exists but takes no new file (/proc, removed)
        why = f"no file can be created in {str(parent)!r} (a virtual file system such as /proc, or a removed directory)"
        fix = "pass a path in an ordinary writable directory."
    else:  # permission denied, read-only file system, anything else
        why, fix = f"the file {reason(error)} {where}", "pass a path in a writable directory."
    return CheckpointError(f"{shown}: {why}; nothing was written and no temporary file is left. Fix: {fix}")
