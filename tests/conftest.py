"""pytest fixtures; the shared models and helpers live in tests/_helpers.py (import them from there)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests in sub-folders import _helpers

import pytest
import torch.distributed as dist

from _helpers import Net, TiedLM


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def tied_lm() -> TiedLM:
    import torch

    torch.manual_seed(0)
    return TiedLM()


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A default gloo process group of one rank (in-process, no port), destroyed afterwards."""
    if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover - CPU torch has gloo
        pytest.skip("needs gloo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
