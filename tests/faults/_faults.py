"""Shared pieces of the fault-injection tests: a tiny model, a deadline, a read-only directory."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchfreeze as tf


def model(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
    return tf.freeze(m, "0", mode="eval")


def leftovers(directory: Path) -> list[str]:
    """Temporary files of ours (``.<name>.*.tmp``) or of safetensors (``*.tmp*``) left in ``directory``."""
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name)


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block blocks longer than ``seconds``."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def read_only(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A directory nobody may create files in; as root (who ignores modes) creation fails with EACCES."""
    mode = directory.stat().st_mode
    os.chmod(directory, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.geteuid() == 0:
            real_open = os.open

            def refuse(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
                if flags & os.O_CREAT and Path(os.fspath(path)).resolve().is_relative_to(directory.resolve()):
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", refuse)
            real_mkdir = os.mkdir

            def refuse_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
                if Path(os.fspath(path)).resolve().is_relative_to(directory.resolve()):
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", refuse_mkdir)
        yield
    finally:
        monkeypatch.undo()
        os.chmod(directory, mode)
