"""Freezing real models (issue 9, section 2): LayerDrop, the model's own gradient switch, PEFT LoRA."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _real_models import bert, wav2vec2
from torch import nn

import torchfreeze as tf
from torchfreeze.hub import FreezePlan

pytest.importorskip("transformers")

LAYERS = "wav2vec2.encoder.layers"


def _layer_runs(model: nn.Module, forwards: int = 8) -> list[int]:
    """How many of ``forwards`` training forward passes ran each encoder layer."""
    layers = list(model.get_submodule(LAYERS).children())
    counts = [0] * len(layers)
    handles = [
        layer.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(layers)
    ]
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(forwards):
            model(torch.randn(2, 64))
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize(
    "preset",
    [
        pytest.param(lambda m: tf.freeze(m, LAYERS, mode="eval"), id="freeze-mode-eval"),
        pytest.param(lambda m: FreezePlan(freeze=(LAYERS,)).apply(m), id="get_model-freeze-plan"),
    ],
)
def test_feature_extractor_preset_leaves_no_layerdrop_over_frozen_layers(preset: Callable[[nn.Module], object]) -> None:
    """Issue 9: with layerdrop=0.5 the parent encoder skipped frozen, eval-pinned layers at random."""
    model = wav2vec2(layerdrop=0.5)
    preset(model)
    model.train()
    assert _layer_runs(model) == [8, 8]  # every frozen layer runs every time
    assert model.get_submodule("wav2vec2.encoder.layer_norm").training  # the parent's other children still train
    assert "stochastic-depth-over-frozen" not in [p.code for p in tf.check(model)]
    tf.unfreeze(model, LAYERS)  # the way back: the parent follows model.train() again
    assert model.train().get_submodule("wav2vec2.encoder").training


def test_check_reports_layerdrop_that_defeats_a_pin() -> None:
    model = wav2vec2(layerdrop=0.5)
    for p in model.get_submodule(LAYERS).parameters():
        p.requires_grad_(False)
    tf.pin_mode(model, LAYERS, mode="eval")  # the layers are pinned; their parent still rolls the dice
    model.train()
    assert _layer_runs(model, 16) != [16, 16]
    (problem,) = [p for p in tf.check(model) if p.code == "stochastic-depth-over-frozen"]
    assert problem.names[0] == "wav2vec2.encoder" and "layerdrop=0.5" in problem.message
    assert "freeze(model, 'wav2vec2.encoder.layers', mode='eval')" in problem.fix
    tf.freeze(model, LAYERS, mode="eval")  # the fix it names
    assert "stochastic-depth-over-frozen" not in [p.code for p in tf.check(model.train())]


def _explained(model: nn.Module) -> tf.speed.Explanation:
    torch.manual_seed(0)
    return tf.explain(model.train(), torch.randn(2, 64), loss_fn=lambda out: out.logits.sum())


def test_freezing_the_feature_encoder_costs_what_hf_own_freeze_costs() -> None:
    """Issue 9: freeze() left HF's switch on, so autograd ran through the frozen CNN and kept its activations."""
    ours, theirs = wav2vec2(), wav2vec2()
    theirs.load_state_dict(ours.state_dict())
    tf.freeze(ours, "wav2vec2.feature_extractor")
    theirs.freeze_feature_encoder()
    a, b = _explained(ours), _explained(theirs)
    part = {p.name: p for p in a.parts}["wav2vec2.feature_extractor"]
    assert not part.on_backward_path and part.activation_bytes == 0
    assert a.activation_bytes == b.activation_bytes
    assert tf.check(ours) == tf.check(theirs) == []


def test_explain_and_check_name_the_module_that_re_enables_gradients() -> None:
    model = wav2vec2()
    for p in model.get_submodule("wav2vec2.feature_extractor").parameters():
        p.requires_grad_(False)  # frozen by hand: the model's own switch stays on
    report = _explained(model)
    part = {p.name: p for p in report.parts}["wav2vec2.feature_extractor"]
    assert part.on_backward_path and part.activation_bytes > 0
    assert "module 'wav2vec2.feature_extractor'" in part.upstream[0]
    assert any("freeze(model, 'wav2vec2.feature_extractor')" in step for step in report.steps)
    (problem,) = tf.check(model)
    assert problem.code == "frozen-module-forces-grad" and problem.names == ("wav2vec2.feature_extractor",)


def test_peft_lora_model_in_train_mode_has_no_randomness_problem() -> None:
    """Issue 9: dropout inside frozen layers with LoRA adapters is a regulariser, not a mistake."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.1))
    model.train()
    assert [p.code for p in tf.check(model)] == []
    feature_extractor = tf.freeze(bert(), "bert").train()  # the same dropout in a frozen backbone is reported
    assert [p.code for p in tf.check(feature_extractor)] == ["train-mode-in-frozen-subtree"]
