"""The demo's data (torchfreeze.cli.demo_tasks): the hand-written sentences come from demo_text.json."""

from __future__ import annotations

from collections import Counter

import pytest

from torchfreeze.cli.demo_tasks import MODELS, TOPIC_TEXTS, TOPICS, classes, make_task
from torchfreeze.errors import ArgumentError


def test_topic_texts_are_40_sentences_per_topic() -> None:
    assert TOPICS == ("sport", "cooking", "weather", "computing")
    assert Counter(label for _, label in TOPIC_TEXTS) == {0: 40, 1: 40, 2: 40, 3: 40}
    assert TOPIC_TEXTS[0] == ("The striker scored twice in the second half.", 0)
    assert len({text for text, _ in TOPIC_TEXTS}) == 160


def test_digits_task_holds_out_30_percent() -> None:
    task = make_task("digits-cnn")
    assert task.classes == classes("digits-cnn") == ("5", "6", "7", "8", "9")
    assert len(task.train) == 627 and len(task.test) == 269
    assert "pretrained on digits 0-4 only" in task.data_note
    assert set(MODELS) == {"digits-cnn", "minilm"}


def test_minilm_task_needs_the_tokenizer() -> None:
    with pytest.raises(ArgumentError, match="tokenizer"):
        make_task("minilm")
