"""Process memory: resident set size and its peak (the demo and ``torchfreeze bench``)."""

from __future__ import annotations

import resource
import sys

__all__ = ["rss_kib", "peak_rss_kib", "reset_peak_rss"]


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
