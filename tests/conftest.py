"""pytest fixtures; the shared models and helpers live in tests/_helpers.py (import them from there)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests in sub-folders import _helpers

import pytest

from _helpers import Net, TiedLM


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def tied_lm() -> TiedLM:
    import torch

    torch.manual_seed(0)
    return TiedLM()
