"""Default layer groups on real architectures (issue 9, section 1): names, lr ladder, one unfreezing step."""

from __future__ import annotations

import pytest
import torch
from _real_models import BUILDERS, example_input
from torch import nn

import torchfreeze as tf

pytest.importorskip("transformers")

W2V = "wav2vec2.feature_extractor.conv_layers"
GROUPS: dict[str, list[list[str]]] = {
    "bert": [
        ["bert.embeddings"],
        ["bert.encoder.layer.0"],
        ["bert.encoder.layer.1"],
        ["bert.pooler", "classifier"],
    ],
    "distilbert": [
        ["distilbert.embeddings"],
        ["distilbert.transformer.layer.0"],
        ["distilbert.transformer.layer.1"],
        ["pre_classifier", "classifier"],
    ],
    # lm_head.weight is transformer.wte.weight: the head moves to the group of its first use
    "gpt2": [
        ["transformer.wte", "transformer.wpe", "lm_head"],
        ["transformer.h.0"],
        ["transformer.h.1"],
        ["transformer.ln_f"],
    ],
    "vit": [["vit.embeddings"], ["vit.layers.0"], ["vit.layers.1"], ["vit.layernorm", "classifier"]],
    "wav2vec2": [
        ["wav2vec2.masked_spec_embed"],
        [f"{W2V}.0"],
        [f"{W2V}.1"],
        ["wav2vec2.feature_projection", "wav2vec2.encoder.pos_conv_embed", "wav2vec2.encoder.layer_norm"],
        ["wav2vec2.encoder.layers.0"],
        ["wav2vec2.encoder.layers.1"],
        ["lm_head"],
    ],
    "hf_resnet": [["resnet.embedder"], ["resnet.encoder.stages.0"], ["resnet.encoder.stages.1"], ["classifier"]],
    # the stem's conv and its BatchNorm stay together
    "resnet": [["conv1", "bn1"], ["layer1.0"], ["layer1.1"], ["layer2.0"], ["layer2.1"], ["fc"]],
}
LAST_BLOCK = {
    "bert": "bert.encoder.layer.1",
    "distilbert": "distilbert.transformer.layer.1",
    "gpt2": "transformer.h.1",
    "vit": "vit.layers.1",
    "wav2vec2": "wav2vec2.encoder.layers.1",
    "hf_resnet": "resnet.encoder.stages.1",
    "resnet": "layer2.1",
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_default_groups_follow_the_blocks(name: str) -> None:
    assert tf.layer_groups(BUILDERS[name]()) == GROUPS[name]


@pytest.mark.parametrize("name", list(GROUPS))
def test_every_parameter_is_in_exactly_one_group(name: str) -> None:
    model = BUILDERS[name]()
    seen: dict[int, int] = {}
    for index, group in enumerate(tf.layer_groups(model)):
        for p in tf._core.select.resolve(model, group).unique_parameters().values():
            assert seen.setdefault(id(p), index) == index  # a tie never spans two groups
    assert set(seen) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", list(GROUPS))
def test_lr_mult_gives_lr_to_the_last_trainable_group(name: str) -> None:
    model = BUILDERS[name]()
    tf.freeze_to(model, -2)  # the last block and the tail train
    groups = tf.param_groups(model, 1e-3, lr_mult=2.6)
    assert max(g["lr"] for g in groups) == pytest.approx(1e-3)
    assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-3 / 2.6, 1e-3])
    last = {id(p) for p in tf._core.select.resolve(model, GROUPS[name][-1]).parameters.values()}
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups if any(id(p) in last for p in g["params"]))


@pytest.mark.parametrize("name", list(GROUPS))
def test_one_gradual_unfreezing_step_unfreezes_exactly_the_last_block(name: str) -> None:
    model = BUILDERS[name]()
    tf.freeze_to(model, -1)
    optimizer = torch.optim.AdamW(tf.param_groups(model, 1e-3))
    schedule = tf.GradualUnfreezing(model, optimizer, "one_group_per_epoch")
    before = {n for n, _ in tf.trainable_parameters(model)}
    schedule.step()
    added = {n for n, _ in tf.trainable_parameters(model)} - before
    block = dict(model.named_parameters())
    expected = {n for n in block if n.startswith(LAST_BLOCK[name] + ".")}
    assert added == expected and expected
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(block[n]) in held for n in added)
    # the model still trains end to end after the step
    out = model(**example_input(name))
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().sum().backward()
    assert all(block[n].grad is not None for n in expected)


def test_gpt2_tied_head_unfreezes_with_the_embeddings() -> None:
    model = BUILDERS["gpt2"]()
    head = model.get_submodule("lm_head").get_parameter("weight")
    assert head is model.get_parameter("transformer.wte.weight")
    tf.freeze_to(model, 1)
    assert not head.requires_grad and model.get_parameter("transformer.h.0.attn.c_attn.weight").requires_grad
    tf.freeze_to(model, 0)
    assert head.requires_grad


def test_a_model_defined_layer_groups_still_wins() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = BUILDERS["bert"]()

        def layer_groups(self) -> list[str]:
            return ["inner.bert", "inner.classifier"]

    assert tf.layer_groups(Custom()) == [["inner.bert"], ["inner.classifier"]]
