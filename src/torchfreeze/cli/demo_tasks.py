"""The demo's models, data and training loop: what ``torchfreeze demo`` trains and how.

Data. ``digits-cnn``: scikit-learn's bundled digits 5-9 (the backbone was
pretrained on digits 0-4 only), 30% held out. ``minilm``: 160 short English
sentences in four topics written by hand for this project (MIT), in
``demo_text.json`` next to this module, 40% held out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import torchfreeze as tf
from torchfreeze.errors import ArgumentError

__all__ = [
    "ModelKey",
    "ModelSetup",
    "MODELS",
    "TOPICS",
    "TOPIC_TEXTS",
    "Task",
    "make_task",
    "classes",
    "accuracy",
    "evaluate",
    "train_epoch",
]

ModelKey = Literal["digits-cnn", "minilm"]


def _load_text() -> dict[str, Any]:
    text = resources.files("torchfreeze.cli").joinpath("demo_text.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


_TEXT = _load_text()

#: The topics of the hand-written text set; a sentence's label is the index of its topic.
TOPICS: tuple[str, ...] = tuple(_TEXT["topics"])

#: A small labelled text set written by hand for this project (MIT, like the code):
#: 40 short sentences per topic, label = index into :data:`TOPICS`.
TOPIC_TEXTS: tuple[tuple[str, int], ...] = tuple(
    (sentence, label) for label, topic in enumerate(TOPICS) for sentence in _TEXT["topics"][topic]
)

_DIGITS = ("5", "6", "7", "8", "9")


@dataclass(frozen=True)
class ModelSetup:
    """How the demo trains one registered model."""

    registry: str
    epochs: int
    batch_size: int
    head_lr: float
    backbone_lr: float
    unfreeze_groups: int
    summary_depth: int | None
    description: str


MODELS: dict[str, ModelSetup] = {
    "digits-cnn": ModelSetup(
        registry="digits-cnn",
        epochs=10,
        batch_size=32,
        head_lr=3e-2,
        backbone_lr=1e-3,
        unfreeze_groups=2,
        summary_depth=None,
        description="CNN pretrained on digits 0-4, transferred to digits 5-9 (scikit-learn digits)",
    ),
    "minilm": ModelSetup(
        registry="minilm-classifier",
        epochs=8,
        batch_size=16,
        head_lr=1e-2,
        backbone_lr=5e-5,
        unfreeze_groups=2,
        summary_depth=3,
        description="all-MiniLM-L6-v2 + linear head on 160 hand-written sentences in 4 topics",
    ),
}


@dataclass
class Task:
    """Inputs and labels of one demo, with train/test indices."""

    inputs: Any  # a tensor, or a mapping of equally long tensors (tokenizer output)
    labels: torch.Tensor
    train: torch.Tensor
    test: torch.Tensor
    classes: Sequence[str]
    data_note: str

    def batch(self, index: torch.Tensor) -> Any:
        """The inputs at ``index`` (every tensor of a mapping indexed alike)."""
        if isinstance(self.inputs, Mapping):
            return {k: v[index] for k, v in self.inputs.items()}
        return self.inputs[index]


def classes(model_key: str) -> Sequence[str]:
    """Class names of the demo of ``model_key``.

    >>> classes("digits-cnn")
    ('5', '6', '7', '8', '9')
    """
    return _DIGITS if model_key == "digits-cnn" else TOPICS


def make_task(model_key: str, model: nn.Module | None = None) -> Task:
    """The data of the demo of ``model_key``; ``minilm`` needs the model (its tokenizer)."""
    from torchfreeze.hub.models import load_digits_tensors, stratified_split

    notes: dict[str, str] = _TEXT["data_notes"]
    if model_key == "digits-cnn":
        images, labels = load_digits_tensors(tuple(int(d) for d in _DIGITS))
        train, test = stratified_split(labels, test_fraction=0.3, seed=0)
        return Task(images, labels, train, test, _DIGITS, notes["digits-cnn"])
    texts = [t for t, _ in TOPIC_TEXTS]
    labels = torch.tensor([y for _, y in TOPIC_TEXTS], dtype=torch.int64)
    tokenize: Callable[[list[str]], Mapping[str, torch.Tensor]] | None = (
        None if model is None else getattr(model.get_submodule("backbone"), "tokenize", None)
    )
    if tokenize is None:
        raise ArgumentError("internal: the minilm task needs the model's tokenizer")
    encoded = tokenize(texts)
    inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    train, test = stratified_split(labels, test_fraction=0.4, seed=0)
    return Task(inputs, labels, train, test, TOPICS, notes["minilm"].format(count=len(texts)))


def accuracy(model: nn.Module, task: Task, index: torch.Tensor, batch: int = 256) -> float:
    """Share of ``index`` that ``model`` classifies right (in eval mode, no gradients)."""
    correct = 0
    with tf.eval_mode(model), torch.no_grad():
        for start in range(0, len(index), batch):
            part = index[start : start + batch]
            correct += int((model(task.batch(part)).argmax(-1) == task.labels[part]).sum())
    return correct / max(1, len(index))


def evaluate(model: nn.Module, task: Task, index: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """Accuracy and mean cross-entropy loss of ``model`` on ``index`` (eval mode, no gradients)."""
    correct, loss = 0, 0.0
    with tf.eval_mode(model), torch.no_grad():
        for start in range(0, len(index), batch):
            part = index[start : start + batch]
            logits = model(task.batch(part))
            correct += int((logits.argmax(-1) == task.labels[part]).sum())
            loss += float(F.cross_entropy(logits, task.labels[part], reduction="sum"))
    n = max(1, len(index))
    return correct / n, loss / n


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    batch: int,
    gen: torch.Generator,
    advance: Callable[..., None],
) -> float:
    """One epoch over the training examples in a random order; returns the mean loss."""
    model.train()
    order = task.train[torch.randperm(len(task.train), generator=gen)]
    total, seen = 0.0, 0
    for start in range(0, len(order), batch):
        part = order[start : start + batch]
        loss = F.cross_entropy(model(task.batch(part)), task.labels[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        optimizer.step()
        total += loss.item() * len(part)
        seen += len(part)
        advance(1, loss=f"{total / seen:.3f}")
    return total / max(1, seen)
