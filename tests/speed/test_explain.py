"""Tests of explain on models where the answer is known."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import torchfreeze as tf
from torchfreeze.speed import explain


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32),  # 0
        nn.ReLU(),
        nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32)),  # 2
        nn.Linear(32, 3),  # 3
    )


def x() -> torch.Tensor:
    return torch.randn(16, 8)


def test_frozen_prefix_is_off_the_backward_path_and_cacheable() -> None:
    model = tf.freeze(mlp(), "0", "2")
    report = explain(model, x())
    assert [p.name for p in report.parts] == ["0", "2"]
    for p in report.parts:
        assert not p.on_backward_path and p.can_skip_autograd and p.cacheable
        assert p.upstream == [] and p.activation_bytes == 0
    assert any("cache_features(model[2])" in s for s in report.steps)


def test_frozen_middle_behind_a_trainable_layer_is_on_the_path() -> None:
    model = tf.freeze(mlp(), "2")
    report = explain(model, x())
    part = report.part("2")
    assert part.on_backward_path and not part.can_skip_autograd and not part.cacheable
    assert part.upstream[0] in ("parameter '0.weight'", "parameter '0.bias'")
    assert "cut the gradient path" in part.not_cacheable_because[0]
    assert part.activation_bytes > 0 and 0 < part.activation_share <= 1
    assert part.backward_ms >= 0 and report.backward_ms > 0
    assert "on the backward path because parameter '0." in report.steps[0]


def test_input_that_requires_grad_is_named_as_the_cause() -> None:
    model = tf.freeze(mlp())
    inp = x().requires_grad_(True)
    report = explain(model, inp)
    assert report.part("").on_backward_path
    assert report.part("").upstream == ["example input #0"]


def test_dropout_in_train_mode_blocks_caching_and_is_named() -> None:
    model = mlp()
    model[2].insert(1, nn.Dropout(0.2))
    tf.freeze(model, "0", "2")
    report = explain(model, x())
    part = report.part("2")
    assert not part.cacheable and part.stochastic_layers == ["2.1"]
    assert any("Pin '2' to eval mode" in s for s in report.steps)
    tf.pin_mode(model, "2", mode="eval")
    assert explain(model, x()).part("2").cacheable


def test_frozen_use_wrapper_is_a_frozen_part() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), tf.Frozen(nn.Linear(16, 16)), nn.Linear(16, 2))
    report = explain(model, x())
    assert [p.name for p in report.parts] == ["1"]
    assert report.part("1").on_backward_path


def test_batchnorm_updates_are_reported_and_folding_suggested() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    tf.freeze(model, "0", "1")
    img = torch.randn(2, 3, 6, 6)
    assert explain(model, img).part("0").cacheable
    part = explain(model, img).part("1")
    assert part.updating_batchnorms == ["1"] and not part.cacheable
    tf.freeze_batchnorm(model, "1")
    report = explain(model, img)
    assert report.part("1").cacheable
    seq = nn.Sequential(nn.Sequential(model[0], model[1]), *list(model)[2:])
    assert any("fold_batchnorm(model, '0')" in s for s in explain(seq, img).steps)


def test_model_is_left_exactly_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    tf.freeze(model, "3")
    model.eval()
    stats = [b.clone() for b in model.buffers()]
    inp = x()
    rng = torch.get_rng_state()
    explain(model, inp)
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())


def test_existing_gradients_and_input_tensors_are_left_as_they_were() -> None:
    model = tf.freeze(mlp(), "2")
    model(x()).sum().backward()
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    inp = x().requires_grad_(True)
    explain(model, inp)
    for n, p in model.named_parameters():
        if n in grads:
            assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1]), n
        else:
            assert p.grad is None, n
    assert inp.grad is None and not inp._backward_hooks


def test_nothing_frozen_and_everything_frozen() -> None:
    report = explain(mlp(), x())
    assert report.parts == [] and "No frozen part" in str(report)
    frozen = explain(tf.freeze(mlp()), x())
    assert frozen.trainable_parameters == 0 and frozen.backward_ms == 0
    assert "inference_mode" in frozen.steps[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"mode": "training"}, "mode", id="bad-mode"),
        pytest.param({"loss_fn": lambda out: out}, "scalar", id="loss-not-scalar"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    model = tf.freeze(mlp(), "0")
    with pytest.raises(tf.errors.ArgumentError, match=match):
        explain(model, x(), **kwargs)
    assert model[0].weight.grad is None and model[3].weight.grad is None


#: explain's refusals, before anything runs: (example inputs, kwargs, class, message pattern)
EXPLAIN_ERRORS = [
    pytest.param(
        (),
        {},
        tf.errors.ArgumentError,
        r"^explain\(example_inputs=\(\)\): Sequential\.forward cannot take no example inputs "
        r"\(missing a required argument: 'input'\).*Fix: pass them after the model, e.g\. explain\(model, batch\)",
        id="no-example-inputs",
    ),
    pytest.param(
        (torch.zeros(2, 8), torch.zeros(2, 8)),
        {},
        tf.errors.ArgumentError,
        r"^explain\(example_inputs=\(tensor of shape \(2, 8\), tensor of shape \(2, 8\)\)\): Sequential\.forward cannot take 2 example input\(s\).*Fix: ",
        id="too-many-example-inputs",
    ),
    pytest.param(
        (torch.zeros(2, 8),),
        {"warmup": "yes"},
        tf.errors.ArgumentTypeError,
        r"^explain\(warmup='yes'\): expected True or False, got str\. Fix: ",
        id="warmup-str",
    ),
]


@pytest.mark.parametrize(("inputs", "kwargs", "error", "match"), EXPLAIN_ERRORS)
def test_explain_refuses_before_running_anything(inputs: tuple, kwargs: dict, error, match: str) -> None:
    model = tf.freeze(mlp(), "0")
    model.train()
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    rng = torch.get_rng_state()
    with pytest.raises(error) as caught:
        explain(model, *inputs, **kwargs)
    assert isinstance(caught.value, TypeError if error is tf.errors.ArgumentTypeError else ValueError)
    assert re.search(match, str(caught.value)), str(caught.value)
    assert len(str(caught.value)) < 400
    assert calls == [] and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())


def test_a_forward_without_inputs_is_explained() -> None:
    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seed = nn.Parameter(torch.ones(1, 4))
            self.body = nn.Linear(4, 4)

        def forward(self) -> torch.Tensor:
            return self.body(self.seed)

    report = explain(tf.freeze(Generator(), "body"))
    assert [p.name for p in report.parts] == ["body"]


def test_loss_fn_that_is_not_callable() -> None:
    with pytest.raises(tf.errors.ArgumentTypeError, match="loss_fn"):
        explain(tf.freeze(mlp(), "0"), x(), loss_fn=3)  # type: ignore[arg-type]


def test_not_a_module() -> None:
    with pytest.raises(tf.errors.ArgumentTypeError, match="nn.Module"):
        explain("model", x())  # type: ignore[arg-type]


def test_composite_backbone_called_through_forward_features_is_found_and_lifted() -> None:
    from torchfreeze.compose.composite import Composite, ModuleBackbone

    torch.manual_seed(0)
    model = Composite(ModuleBackbone(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), feature_dim=16), nn.Linear(16, 2))
    tf.freeze(model, "backbone", mode="eval")
    report = explain(model, x())
    assert [p.name for p in report.parts] == ["backbone.module"]
    assert report.steps[0].startswith("Cache 'backbone' with `model.backbone = cache_features(model.backbone)`")


def test_a_compiled_model_without_inputs_is_refused_by_its_inner_forward() -> None:
    compiled = torch.compile(tf.freeze(mlp(), "0"))
    with pytest.raises(tf.errors.ArgumentError, match=r"Sequential\.forward cannot take no example inputs"):
        explain(compiled)


def test_frozen_leading_parts_that_are_not_one_module_point_to_cache_frozen_prefix() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 3))
    tf.freeze(model, "0", "2", mode="eval")
    report = tf.explain(model, torch.randn(32, 64))
    assert any("cache_frozen_prefix(model)" in step for step in report.steps)
