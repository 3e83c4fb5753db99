"""Process memory and the measuring child process (torchfreeze.cli.memory)."""

from __future__ import annotations

import pytest

from torchfreeze.cli.memory import ChildFailedError, peak_window, run_child
from torchfreeze.errors import ArgumentError


def test_peak_window_sees_an_allocation() -> None:
    with peak_window() as window:
        block = bytearray(64 << 20)  # 64 MiB, touched
        block[::4096] = b"x" * len(block[::4096])
    assert window.rss_before_kib > 0
    if window.reset:  # Linux: the peak of the window alone
        assert window.peak_kib - window.rss_before_kib > 32 << 10


def test_run_child_runs_only_cli_functions() -> None:
    with pytest.raises(ArgumentError, match="torchfreeze.cli.MODULE:FUNCTION"):
        run_child("os:system", {})


def test_run_child_failure_names_the_spec_and_the_error() -> None:
    with pytest.raises(ChildFailedError, match=r"(?s)\{'n': 1\} failed \(exit 1\).*AttributeError") as info:
        run_child("torchfreeze.cli.memory:no_such_function", {"n": 1}, timeout=120)
    assert "no_such_function" in info.value.output
