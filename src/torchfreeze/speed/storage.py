"""Where cache entries live: memory within a byte budget, and an optional directory.

:class:`EntryStore` holds the entries of one :class:`~torchfreeze.speed.FeatureCache`
and its :class:`CacheStats`; memory is looked up first, then the directory. Per-sample
rows (``granularity="sample"``) live in slabs (:class:`~torchfreeze.speed._rows.RowLayouts`:
oldest rows out first within a layout, least recently used layout out first);
whole-call entries (``granularity="batch"``) in a least-recently-used dict.

The directory is untrusted input. Its entries are authenticated with HMAC-SHA256
under a per-directory secret (``.tfc-secret``, 32 random bytes, created once with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode ``0600``; a secret that is not a regular
file of ours, private to us, disables the directory). A file that is not a regular
file (a FIFO, a symlink, a device, a directory), larger than the bound, truncated,
corrupted, not authenticated, written for another key or describing anything but
tensors in plain tuples/lists/dicts is counted in ``stats().corrupt`` and treated
as a miss, never returned. A write that fails (read-only directory, full disk) is
counted in ``stats().write_errors`` and skipped: the call still returns its output.
``clear(disk=True)`` never leaves the directory (no symlink is followed).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torchfreeze._core.files import read_regular_file, write_bytes_atomic
from torchfreeze.errors import CheckpointError
from torchfreeze.speed._entry import Entry, Unstorable, decode_entry, encode_entry
from torchfreeze.speed._rows import RowLayouts

__all__ = ["CacheStats", "EntryStore"]

SECRET_NAME = ".tfc-secret"
_SECRET_BYTES = 32
#: the largest entry file read back (a bound on every read; larger files are a miss)
MAX_ENTRY_BYTES = 1 << 32
_HEX = frozenset("0123456789abcdef")


@dataclass
class CacheStats:
    """Counters of a :class:`~torchfreeze.speed.FeatureCache` (per process).

    ``hits``/``misses`` count entries (samples with ``granularity="sample"``,
    calls with ``"batch"``); ``bytes`` is the memory held now. ``corrupt`` counts
    directory entries refused (damaged, not authenticated, not a regular file),
    ``write_errors`` disk writes that failed and were skipped, ``unstorable``
    outputs whose structure a file cannot hold (kept in memory only).

    >>> s = CacheStats(hits=3, misses=1)
    >>> s.hit_rate, s.to_dict()["hits"]
    (0.75, 3)
    """

    hits: int = 0
    misses: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    disk_writes: int = 0
    corrupt: int = 0
    evictions: int = 0
    skipped: int = 0
    write_errors: int = 0
    unstorable: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0
    call_seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def overhead_seconds(self) -> float:
        """Time spent in the cache itself (hashing, lookups, storing): calls minus the wrapped module's compute."""
        return max(0.0, self.call_seconds - self.compute_seconds)

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0.0 before the first lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (plus ``hit_rate`` and ``overhead_seconds``)."""
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["overhead_seconds"] = self.overhead_seconds
        return d

    def __str__(self) -> str:
        return (
            f"hits={self.hits} misses={self.misses} (hit rate {self.hit_rate:.1%}; memory {self.memory_hits},"
            f" disk {self.disk_hits}) entries={self.entries} bytes={self.bytes}/{self.max_bytes}"
            f" evictions={self.evictions} disk_writes={self.disk_writes} corrupt={self.corrupt}"
            f" write_errors={self.write_errors}"
            f" time in cache {self.overhead_seconds * 1000:.1f} ms (+{self.compute_seconds * 1000:.1f} ms computing)"
        )


class EntryStore:
    """The entries of one cache: memory (least recently used first out) in front of an optional directory.

    Thread-safe (one lock). Pickles without its entries, lock and counters, so a
    cache can go to ``DataLoader`` workers; each process starts empty.
    """

    def __init__(self, max_bytes: int, directory: Path | None) -> None:
        self.max_bytes = max_bytes
        self.directory = directory
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.rows = RowLayouts(self.max_bytes)
        self.bytes = 0
        self.lock = threading.Lock()
        self.stats = CacheStats(max_bytes=self.max_bytes)
        self._secret: bytes | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def snapshot(self) -> CacheStats:
        """A copy of the counters, with the current entry count and bytes."""
        with self.lock:
            rows, evicted, skipped = self.rows.counts()
            s = asdict(self.stats)
            s.update(entries=len(self.entries) + rows, bytes=self.bytes + self.rows.nbytes)
            s.update(evictions=s["evictions"] + evicted, skipped=s["skipped"] + skipped)
            return CacheStats(**s)

    def clear(self, *, disk: bool = False) -> None:
        """Drop every in-memory entry (and with ``disk=True`` the directory's entry files).

        Only ``<directory>/<2 hex>/<name>.tfc`` files are removed, and no symlink is followed:
        a symlinked subdirectory is left alone, a symlink named like an entry is removed itself.
        """
        with self.lock:
            self.entries.clear()
            self.rows.clear()
            self.bytes = 0
        if not disk or self.directory is None:
            return
        try:
            top = list(os.scandir(self.directory))
        except OSError:
            return
        for sub in top:
            if len(sub.name) != 2 or not set(sub.name) <= _HEX or not sub.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(sub.path))
            except OSError:
                continue
            for f in files:
                if f.name.endswith(".tfc") and not f.is_dir(follow_symlinks=False):
                    try:
                        os.unlink(f.path)
                    except OSError:
                        pass

    # -- lookups -------------------------------------------------------------
    def lookup(self, keys: list[str]) -> list[Entry | None]:
        """Entries for ``keys`` (None where absent): memory first, then disk; one lock for the memory pass."""
        with self.lock:
            found: list[Entry | None] = [self.entries.get(k) for k in keys]
            hits = 0
            for k, e in zip(keys, found, strict=True):
                if e is not None:
                    self.entries.move_to_end(k)
                    hits += 1
            self.stats.hits += hits
            self.stats.memory_hits += hits
        if hits == len(keys):
            return found
        misses = 0
        for r, k in enumerate(keys):
            if found[r] is not None:
                continue
            e = self.read(k) if self.directory is not None else None
            if e is not None:
                with self.lock:
                    self.stats.hits += 1
                    self.stats.disk_hits += 1
                self.insert([(k, e)], write=False)
                found[r] = e
            else:
                misses += 1
        with self.lock:
            self.stats.misses += misses
        return found

    def insert(self, items: list[tuple[str, Entry]], *, write: bool = True) -> None:
        """Keep ``items`` in memory (evicting the least recently used) and, with ``write``, on disk."""
        if write and self.directory is not None:
            for key, entry in items:
                self.write(key, entry)
        with self.lock:
            for key, entry in items:
                if entry.nbytes > self.max_bytes:
                    self.stats.skipped += 1
                    continue
                old = self.entries.pop(key, None)
                if old is not None:
                    self.bytes -= old.nbytes
                self.entries[key] = entry
                self.bytes += entry.nbytes
                while self.bytes > self.max_bytes and self.entries:
                    _, evicted = self.entries.popitem(last=False)
                    self.bytes -= evicted.nbytes
                    self.stats.evictions += 1

    # -- disk ----------------------------------------------------------------
    def path(self, key: str) -> Path:
        """``<directory>/<2 hex>/<key>.tfc``."""
        return Path(self.directory or ".") / key[:2] / f"{key}.tfc"

    def _count(self, counter: str) -> None:
        with self.lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def secret(self, *, create: bool) -> bytes | None:
        """The directory's HMAC key: read (or, with ``create``, made once); ``None`` if absent or not trusted."""
        if self._secret is not None or self.directory is None:
            return self._secret
        where = self.directory / SECRET_NAME
        if create:
            _create_secret(where)
        try:
            data = read_regular_file(where, max_bytes=_SECRET_BYTES, follow_symlinks=False)
            info = os.stat(where, follow_symlinks=False)
        except OSError:
            return None
        private = info.st_uid == os.getuid() and not info.st_mode & 0o077 if hasattr(os, "getuid") else True
        if len(data) != _SECRET_BYTES or not private:
            return None  # someone else's secret: never trust the directory's entries
        self._secret = data
        return data

    def read(self, key: str) -> Entry | None:
        """The entry of ``key`` in the directory, or None (absent; refused entries are counted in ``corrupt``)."""
        path = self.path(key)
        try:
            raw = read_regular_file(path, max_bytes=MAX_ENTRY_BYTES, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno != errno.ENOTDIR:  # a FIFO, symlink, device, directory, too large: refused
                self._count("corrupt")
            return None
        key_bytes = self.secret(create=False)
        try:
            if key_bytes is None:
                raise ValueError("the directory has no secret of ours")
            return decode_entry(raw, key, key_bytes)
        except ValueError:
            self._count("corrupt")
            return None

    def write(self, key: str, entry: Entry) -> None:
        """Write ``entry`` under ``key`` to the directory (atomic); failures are counted, never raised."""
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            secret = self.secret(create=True)
            if secret is None:
                raise CheckpointError(f"directory {str(self.directory)!r} holds a secret that is not ours")
            data = encode_entry(key, entry, secret)
            sub = self.directory / key[:2]
            try:
                os.mkdir(sub)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(sub).st_mode):  # a symlink or a file: never write through it
                raise CheckpointError(f"{str(sub)!r} is not a directory")
            # an entry can always be recomputed: the rename makes it atomic, no fsync needed
            write_bytes_atomic(sub / f"{key}.tfc", data, durable=False, verb="cache_features", argument="directory")
        except Unstorable:
            self._count("unstorable")
            return
        except (OSError, CheckpointError):
            self._count("write_errors")
            return
        self._count("disk_writes")


def _create_secret(where: Path) -> None:
    """Create ``where`` with 32 random bytes, mode 0600, unless it exists; the file appears complete or not at all."""
    if os.path.lexists(where):
        return
    tmp = where.with_name(f"{where.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, where)  # fails if another process made it first: theirs is kept
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
