"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    import torchfreeze as tf

    assert tf.is_frozen(model, "backbone") and not tf.is_frozen(model, "head")
    trainable = {id(p) for _, p in tf.trainable_parameters(model)}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert "total" in capsys.readouterr().out  # the summary was printed
