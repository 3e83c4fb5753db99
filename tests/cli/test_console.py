"""Terminal output of the command (torchfreeze.cli.console): rich, else tqdm, else plain text."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import torchfreeze
from torchfreeze.cli.console import Output


@pytest.mark.parametrize("blocked", [("rich.console",), ("rich.console", "tqdm")], ids=["tqdm", "plain"])
def test_output_without_rich(blocked: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    stream = io.StringIO()
    out = Output(progress=True, stream=stream)
    assert out.console is None
    out.heading("phase")
    out.render(torchfreeze.summary(torch.nn.Linear(2, 1)))
    with out.bar(3, "epoch 1") as advance:
        for _ in range(3):
            advance(1, loss="0.1")
    text = stream.getvalue()
    assert "== phase ==" in text and "Linear" in text and "epoch 1" in text
