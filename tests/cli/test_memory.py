"""Process memory and the measuring child process (torchfreeze.cli.memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from torchfreeze.cli.memory import ChildFailedError, run_child
from torchfreeze.errors import ArgumentError


def test_peak_window_sees_an_allocation() -> None:
    # In a fresh interpreter, as the demo and the bench use it: a long-lived test process may serve
    # the allocation from memory that is already resident, which the peak mark cannot see.
    code = (
        "from torchfreeze.cli.memory import peak_window\n"
        "with peak_window() as w:\n"
        "    block = bytearray(64 << 20)\n"
        "    block[::4096] = b'x' * len(block[::4096])\n"
        "print(w.rss_before_kib, int(w.reset), w.peak_kib)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    before, reset, peak = (int(v) for v in out.stdout.split())
    assert before > 0
    if reset:  # Linux: the peak of the window alone
        assert peak - before > 32 << 10


def test_run_child_runs_only_cli_functions() -> None:
    with pytest.raises(ArgumentError, match="torchfreeze.cli.MODULE:FUNCTION"):
        run_child("os:system", {})


def test_run_child_failure_names_the_spec_and_the_error() -> None:
    with pytest.raises(ChildFailedError, match=r"(?s)\{'n': 1\} failed \(exit 1\).*AttributeError") as info:
        run_child("torchfreeze.cli.memory:no_such_function", {"n": 1}, timeout=120)
    assert "no_such_function" in info.value.output
