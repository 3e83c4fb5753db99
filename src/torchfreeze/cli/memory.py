"""Process memory for the demo and ``torchfreeze bench``: RSS, its peak, and measuring in a fresh process.

Peak memory of one configuration must not hide in another's, so both the demo
and the bench measure each configuration in a child Python process:
:func:`run_child` starts ``python -m torchfreeze.cli.memory MODULE:FUNCTION
JSON``, the child calls ``FUNCTION(spec)`` (a function of a
``torchfreeze.cli`` module, which measures with :func:`peak_window`) and
prints its result as one JSON line, which :func:`run_child` reads back.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torchfreeze.errors import ArgumentError

__all__ = ["rss_kib", "peak_rss_kib", "reset_peak_rss", "PeakWindow", "peak_window", "run_child", "ChildFailedError"]

#: Children may only run functions of the command's own modules.
_CHILD_PREFIX = "torchfreeze.cli."


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


@dataclass
class PeakWindow:
    """RSS when a :func:`peak_window` opened, and the peak reached inside it (KiB).

    ``reset`` is False where the kernel's peak mark could not be reset: then
    ``peak_kib`` is the peak of the whole process, not of the window alone.
    """

    rss_before_kib: int
    reset: bool
    peak_kib: int = -1


@contextlib.contextmanager
def peak_window() -> Iterator[PeakWindow]:
    """Measure the peak RSS of a block: current RSS, reset the peak mark, run the block, read the peak.

    >>> with peak_window() as window:
    ...     data = bytearray(1 << 20)
    >>> window.peak_kib >= 0 and window.rss_before_kib > 0
    True
    """
    window = PeakWindow(rss_before_kib=rss_kib(), reset=reset_peak_rss())
    yield window
    window.peak_kib = peak_rss_kib()


# --------------------------------------------------------------------------- child processes


class ChildFailedError(RuntimeError):
    """The measuring child process failed or printed no result; ``output`` is what it printed."""

    def __init__(self, message: str, *, output: str) -> None:
        super().__init__(message)
        self.output = output


def run_child(
    target: str,
    spec: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run ``target(spec)`` in a fresh Python process and return the dict it returned.

    Args:
        target: ``"torchfreeze.cli.MODULE:FUNCTION"``; the function takes the
            spec (a JSON object) and returns a JSON-serialisable dict.
        spec: the function's argument, passed as JSON.
        env: environment variables set for the child on top of this process's
            (``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` default to ``1``).
        timeout: seconds before the child is killed (``subprocess.TimeoutExpired``).

    Returns:
        The child's result.

    Raises:
        ChildFailedError: the child exited with an error or printed no JSON line.
    """
    if not target.startswith(_CHILD_PREFIX) or ":" not in target:
        raise ArgumentError(f"target={target!r}: expected '{_CHILD_PREFIX}MODULE:FUNCTION'")
    full_env = dict(os.environ)
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "torchfreeze.cli.memory", target, json.dumps(dict(spec))],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise ChildFailedError(
            f"the measurement process for {dict(spec)} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}",
            output=proc.stderr or proc.stdout,
        )
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise ChildFailedError(f"the measurement process for {dict(spec)} printed {lines[-1]!r}", output=proc.stdout)
    return result


def _child_main(argv: list[str]) -> int:
    """``python -m torchfreeze.cli.memory MODULE:FUNCTION JSON``: print ``FUNCTION(spec)`` as JSON."""
    if len(argv) != 2 or not argv[0].startswith(_CHILD_PREFIX) or ":" not in argv[0]:
        print(
            f"usage: python -m torchfreeze.cli.memory {_CHILD_PREFIX}MODULE:FUNCTION JSON (internal; "
            "use `torchfreeze demo` or `torchfreeze bench`)",
            file=sys.stderr,
        )
        return 2
    module_name, _, name = argv[0].partition(":")
    function = getattr(importlib.import_module(module_name), name)
    print(json.dumps(function(json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":  # the measuring child of run_child
    sys.exit(_child_main(sys.argv[1:]))
