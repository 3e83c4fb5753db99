"""``"digits-cnn"``: a small CNN pretrained by the project on scikit-learn digits 0-4, and its data helpers.

A convolutional backbone (3 blocks, ~93k parameters) that the project
pretrains itself on scikit-learn's bundled digits (classes 0-4 only; see
``scripts/pretrain_digits.py``), with a new linear head. Input:
``(batch, 1, 8, 8)`` float images with pixel values in ``[0, 1]``
(scikit-learn's 0..16 divided by 16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchfreeze._core.checks import require_positive_int
from torchfreeze.compose.composite import Composite
from torchfreeze.errors import ArgumentError, WeightsError
from torchfreeze.hub.registry import FreezePlan, register_model
from torchfreeze.hub.weights import Weights

__all__ = ["DigitsBackbone", "digits_cnn", "digits_weights", "register", "load_digits_tensors", "stratified_split"]

WEIGHTS_DESCRIPTION = "torchfreeze:hub/weights/digits_cnn.json"


def _block(cin: int, cout: int, *tail: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), *tail)


class DigitsBackbone(nn.Module):
    """Three conv blocks for 8x8 grey images; implements the backbone protocol.

    >>> DigitsBackbone().forward_features(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 128])
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.block1 = _block(1, 32)
        self.block2 = _block(32, 64, nn.MaxPool2d(2))
        self.block3 = _block(64, 128, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of shape ``(batch, 128)``."""
        features: torch.Tensor = self.block3(self.block2(self.block1(x)))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def layer_groups(self) -> list[Any]:
        """One group per block, input to output."""
        return [["block1"], ["block2"], ["block3"]]


def digits_cnn(*, num_classes: int = 5, dropout: float = 0.0) -> Composite:
    """``DigitsBackbone`` + a new linear head with ``num_classes`` outputs.

    Args:
        num_classes: outputs of the head (the demo uses 5: digits 5-9).
        dropout: dropout before the linear layer of the head.

    Returns:
        A :class:`~torchfreeze.Composite` (``backbone`` = :class:`DigitsBackbone`).

    Raises:
        ArgumentTypeError: ``num_classes`` is not an int.
        ArgumentError: ``num_classes`` < 1.

    >>> digits_cnn(num_classes=3)(torch.zeros(1, 1, 8, 8)).shape
    torch.Size([1, 3])
    """
    require_positive_int(num_classes, "digits_cnn", "num_classes", 5)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(DigitsBackbone.feature_dim, num_classes))
    return Composite(DigitsBackbone(), head)


def digits_weights() -> Weights | None:
    """The pretrained backbone's description (``None`` while ``scripts/pretrain_digits.py`` writes it).

    Reads the small JSON description only; the weights file is read when a model is built.

    >>> digits_weights().target
    'backbone'
    """
    try:
        return Weights.from_json(WEIGHTS_DESCRIPTION)
    except WeightsError:  # only while scripts/pretrain_digits.py is creating the file
        return None


def _none_plan(model: nn.Module) -> nn.Module:
    return model


def register() -> None:
    """Register ``"digits-cnn"`` (the registry calls this the first time the name is looked up)."""
    weights = digits_weights()
    register_model(
        "digits-cnn",
        digits_cnn,
        weights={"default": weights} if weights is not None else None,
        plans={
            "default": FreezePlan(),
            "all_but_last_block": FreezePlan(
                freeze=("backbone.block1", "backbone.block2"),
                description="blocks 1-2 frozen and pinned eval; block 3 and head train",
            ),
            "none": _none_plan,
        },
        description="small CNN pretrained by the project on scikit-learn digits 0-4 (8x8 images)",
        overwrite=True,
    )


# ---------------------------------------------------------------------------- data
def load_digits_tensors(
    classes: tuple[int, ...] | list[int] = (5, 6, 7, 8, 9),
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits restricted to ``classes``, as model inputs.

    Images become ``(N, 1, 8, 8)`` float32 in ``[0, 1]``; labels are relabelled
    ``0..len(classes)-1`` in the order given. Needs scikit-learn (no network:
    the data ship inside it).

    Args:
        classes: which digits to keep.

    Returns:
        ``(images, labels)``.

    >>> x, y = load_digits_tensors((0, 1))
    >>> x.shape[1:], sorted(set(y.tolist()))
    (torch.Size([1, 8, 8]), [0, 1])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ArgumentError(
            "the digits data need scikit-learn: pip install scikit-learn (or 'torchfreeze[demo]')."
        ) from exc
    data = load_digits()
    wanted = list(classes)
    if not wanted or any(c not in range(10) for c in wanted) or len(set(wanted)) != len(wanted):
        raise ArgumentError(f"classes={classes!r}: expected distinct digits in 0..9.")
    images = torch.as_tensor(data.images, dtype=torch.float32) / 16.0
    target = torch.as_tensor(data.target, dtype=torch.int64)
    keep = torch.zeros_like(target, dtype=torch.bool)
    labels = torch.full_like(target, -1)
    for new, digit in enumerate(wanted):
        keep |= target == digit
        labels[target == digit] = new
    return images[keep].unsqueeze(1).contiguous(), labels[keep].contiguous()


def stratified_split(labels: torch.Tensor, *, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified split: ``(train_index, test_index)``.

    >>> tr, te = stratified_split(torch.tensor([0, 0, 1, 1]), test_fraction=0.5)
    >>> len(tr), len(te)
    (2, 2)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ArgumentError(f"test_fraction={test_fraction!r}: expected a float in (0, 1).")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
