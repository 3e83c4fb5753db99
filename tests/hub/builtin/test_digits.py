"""The built-in "digits-cnn": pretrained weights, plans, data helpers; nothing heavy imported to register it."""

from __future__ import annotations

import torch
from torch import nn

import torchfreeze
from torchfreeze import Weights, get_model
from torchfreeze.hub.builtin.digits import DigitsBackbone, digits_weights


def requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_digits_cnn_pretrained_and_frozen() -> None:
    model = get_model("digits-cnn", freeze=True)
    w = Weights.from_json("torchfreeze:hub/weights/digits_cnn.json")
    for key, value in w.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert [n for n, _ in torchfreeze.trainable_parameters(model)] == ["head.1.weight", "head.1.bias"]
    assert torchfreeze.layer_groups(model) == [["backbone.block1"], ["backbone.block2"], ["backbone.block3"], ["head"]]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)


def test_digits_cnn_plans() -> None:
    model = get_model("digits-cnn", freeze="all_but_last_block")
    assert torchfreeze.is_frozen(model, "backbone.block1", "backbone.block2")
    assert not torchfreeze.is_frozen(model, "backbone.block3")
    none = get_model("digits-cnn", freeze="none")
    assert all(requires_grad(none).values())


def test_digits_data_split_is_deterministic_and_disjoint() -> None:
    from torchfreeze.hub.models import load_digits_tensors, stratified_split

    x, y = load_digits_tensors((5, 6, 7, 8, 9))
    a = stratified_split(y, test_fraction=0.3)
    b = stratified_split(y, test_fraction=0.3)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not set(a[0].tolist()) & set(a[1].tolist())
    assert len(a[0]) + len(a[1]) == len(y)
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0


def test_weights_description_is_read_without_loading_the_file() -> None:
    w = digits_weights()
    assert (
        w is not None
        and w.target == "backbone"
        and w.metadata["parameters"] == sum(p.numel() for p in DigitsBackbone().parameters())
    )
