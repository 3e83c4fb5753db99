"""Where cache entries live: an in-memory LRU within a byte budget, and an optional directory.

:class:`EntryStore` holds the entries of one :class:`~torchfreeze.speed.FeatureCache`
and its :class:`CacheStats`; memory is looked up first, then the directory. A
file that is truncated, corrupted, written for another key or not a cache file
is counted in ``stats().corrupt`` and treated as a miss, never returned.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torchfreeze._core.files import atomic_write
from torchfreeze.speed._entry import Entry, decode_entry, encode_entry

__all__ = ["CacheStats", "EntryStore"]


@dataclass
class CacheStats:
    """Counters of a :class:`~torchfreeze.speed.FeatureCache` (per process).

    ``hits``/``misses`` count entries (samples with ``granularity="sample"``,
    calls with ``"batch"``); ``bytes`` is the memory held now.

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
        self.bytes = 0
        self.lock = threading.Lock()
        self.stats = CacheStats(max_bytes=self.max_bytes)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def snapshot(self) -> CacheStats:
        """A copy of the counters, with the current entry count and bytes."""
        with self.lock:
            return CacheStats(**{**asdict(self.stats), "entries": len(self.entries), "bytes": self.bytes})

    def clear(self, *, disk: bool = False) -> None:
        """Drop every in-memory entry (and with ``disk=True`` the directory's entry files)."""
        with self.lock:
            self.entries.clear()
            self.bytes = 0
        if disk and self.directory is not None and self.directory.exists():
            for f in self.directory.glob("*/*.tfc"):
                try:
                    f.unlink()
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
            e = self._read(k) if self.directory is not None else None
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
                self._write(key, entry)
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

    def _read(self, key: str) -> Entry | None:
        try:
            raw = self.path(key).read_bytes()
        except OSError:
            return None
        try:
            return decode_entry(raw, key)
        except ValueError:
            with self.lock:
                self.stats.corrupt += 1
            return None

    def _write(self, key: str, entry: Entry) -> None:
        path = self.path(key)
        data = encode_entry(key, entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        # an entry can always be recomputed: the rename makes it atomic, no fsync needed
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), durable=False)
        with self.lock:
            self.stats.disk_writes += 1
