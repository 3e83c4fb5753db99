"""docs/real-models.md runs as written: its outputs are produced by the code on the page."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "real-models.md"


def test_real_models_page_runs_as_written() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = doctest.testfile(
        str(PAGE), module_relative=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 40 and result.failed == 0
