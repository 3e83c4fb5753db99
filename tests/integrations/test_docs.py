"""The complete examples of docs/lightning.md and docs/transformers.md run as written."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"

PAGES = {"lightning": ("lightning.md", "lightning"), "transformers": ("transformers.md", "transformers")}


def _example(page: str) -> str:
    text = (DOCS / page).read_text()
    section = text[text.index("## A complete example") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"{page} has no python block under '## A complete example'"
    return match.group(1)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("page, needs", PAGES.values(), ids=PAGES.keys())
def test_complete_example_runs_and_prints_what_it_says(
    page: str, needs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip(needs)
    code = _example(page)
    lines = code.splitlines()
    expected = [line[2:] for prev, line in pairwise(lines) if prev.startswith("print(") and line.startswith("# ")]
    exec(compile(code, page, "exec"), {"__name__": "__doc_example__"})
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("{")]
    assert expected and all(line in printed for line in expected), (expected, printed)
