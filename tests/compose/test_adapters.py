"""The backbone adapters: plain modules (captured submodule output) and HF encoders."""

from __future__ import annotations

import re

import pytest
import torch
from _compose_models import mlp
from torch import nn

import torchfreeze
from torchfreeze import Composite
from torchfreeze.compose import HFEncoder, ModuleBackbone
from torchfreeze.errors import ArgumentError, ArgumentTypeError


# ---------------------------------------------------------------------------- ModuleBackbone
def test_capture_named_submodule_output_and_stop_early() -> None:
    net = mlp()
    bb = ModuleBackbone(net, output="2", feature_dim=5)
    x = torch.randn(3, 4)
    expected = net[2].inner(net[1](net[0](x)))
    net[2].calls = net[4].calls = 0
    assert torch.allclose(bb.forward_features(x), expected)
    assert (net[2].calls, net[4].calls) == (1, 0)  # the rest of the forward was skipped
    assert not net[2]._forward_hooks  # hook removed


def test_capture_without_stopping_runs_everything() -> None:
    net = mlp()
    bb = ModuleBackbone(net, output="2", feature_dim=5, stop=False)
    bb(torch.randn(3, 4))
    assert net[4].calls == 1
    assert not net[2]._forward_hooks


def test_hook_removed_when_forward_raises() -> None:
    net = mlp()
    bb = ModuleBackbone(net, output="4", feature_dim=2)
    with pytest.raises(RuntimeError):
        bb(torch.randn(3, 7))  # wrong width: fails inside the first Linear
    assert not net[4]._forward_hooks


def test_gradients_reach_the_captured_part_only() -> None:
    net = mlp()
    model = Composite(ModuleBackbone(net, output="2", feature_dim=5), nn.Linear(5, 1))
    model(torch.randn(3, 4)).sum().backward()
    assert net[0].weight.grad is not None and net[2].inner.weight.grad is not None
    assert net[4].inner.weight.grad is None


def test_parameter_names_are_module_paths_and_selectors_work() -> None:
    model = Composite(ModuleBackbone(mlp(), output="2", feature_dim=5), nn.Linear(5, 1))
    assert "backbone.module.0.weight" in dict(model.named_parameters())
    torchfreeze.freeze(model, "backbone", mode="eval")
    assert [n for n, _ in torchfreeze.trainable_parameters(model)] == ["head.weight", "head.bias"]
    model.train()
    assert not model.backbone.module[0].training


@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        pytest.param(None, (2, 4, 3, 3), id="none"),
        pytest.param("avg", (2, 4), id="avg"),
        pytest.param("max", (2, 4), id="max"),
        pytest.param("flatten", (2, 36), id="flatten"),
    ],
)
def test_pooling_feature_maps(pool: str | None, shape: tuple[int, ...]) -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    x = torch.randn(2, 1, 5, 5)
    bb = ModuleBackbone(conv, output="0", pool=pool, example_input=x)
    out = bb.forward_features(x)
    assert tuple(out.shape) == shape
    assert bb.feature_dim == shape[-1]
    if pool == "avg":
        assert torch.allclose(out, conv[0](x).mean(dim=(2, 3)))


def test_measuring_feature_dim_restores_modes() -> None:
    net = mlp()
    net.train()
    net[2].eval()
    before = {n: m.training for n, m in net.named_modules()}
    ModuleBackbone(net, output="2", example_input=torch.randn(1, 4))
    assert {n: m.training for n, m in net.named_modules()} == before


def test_tuple_outputs_take_the_first_element() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 5, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0][:, -1]

    bb = ModuleBackbone(Seq(), output="rnn", feature_dim=5)
    assert bb.forward_features(torch.randn(2, 4, 3)).shape == (2, 4, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"output": "9"}, "closest", id="unknown-output"),
        pytest.param({"pool": "mean"}, "pool=", id="unknown-pool"),
        pytest.param({"feature_dim": 0}, "feature_dim=", id="bad-feature-dim"),
    ],
)
def test_module_backbone_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ArgumentError, match=match):
        ModuleBackbone(mlp(), **kwargs)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda: ModuleBackbone([1]), r"^ModuleBackbone\(module=\[1\]\): expected a torch.nn.Module", id="module"
        ),
        pytest.param(lambda: ModuleBackbone(mlp(), feature_dim=2.0), "feature_dim=2.0", id="feature-dim-float"),
        pytest.param(
            lambda: HFEncoder("bert"), r"^HFEncoder\(model='bert'\): expected a torch.nn.Module", id="hf-model"
        ),
    ],
)
def test_adapters_wrong_types(call, match: str) -> None:
    with pytest.raises(ArgumentTypeError, match=match):
        call()


#: bad arguments of the adapters: (call, class, message pattern); each message names the adapter and
#: the argument, says what was expected and ends with the fix, and the wrapped module is left unchanged
ADAPTER_ERRORS = [
    pytest.param(
        lambda m: ModuleBackbone(m, output=5),
        ArgumentTypeError,
        r"^ModuleBackbone\(output=5\): expected a qualified submodule name \(str\) or None, got int\. Fix: ",
        id="output-int",
    ),
    pytest.param(
        lambda m: ModuleBackbone(m, output="9"),
        ArgumentError,
        r"^ModuleBackbone\(output='9'\): no submodule.*closest: .*Fix: ",
        id="output-unknown",
    ),
    pytest.param(
        lambda m: ModuleBackbone(m, stop="no"),
        ArgumentTypeError,
        r"^ModuleBackbone\(stop='no'\): expected True or False, got str\. Fix: ",
        id="stop-str",
    ),
    pytest.param(
        lambda m: ModuleBackbone(m, pool="mean"),
        ArgumentError,
        r"^ModuleBackbone\(pool='mean'\): expected one of None, 'flatten', 'avg', 'max'\. Fix: ",
        id="pool-unknown",
    ),
    pytest.param(
        lambda m: ModuleBackbone(m, feature_dim="8"),
        ArgumentTypeError,
        r"^ModuleBackbone\(feature_dim='8'\): expected a positive int, got str\. Fix: ",
        id="feature-dim-str",
    ),
    pytest.param(
        lambda m: ModuleBackbone(m, feature_dim=-1),
        ArgumentError,
        r"^ModuleBackbone\(feature_dim=-1\): expected a positive int\. Fix: ",
        id="feature-dim-negative",
    ),
    pytest.param(
        lambda m: HFEncoder(m),
        ArgumentError,
        r"^HFEncoder\(model=Sequential\(\.\.\.\)\): expected a transformers encoder.*Fix: .*ModuleBackbone",
        id="hf-module-that-is-not-transformers",
    ),
    pytest.param(
        lambda m: HFEncoder(None),
        ArgumentTypeError,
        r"^HFEncoder\(model=None\): expected a torch.nn.Module, got NoneType\. Fix: ",
        id="hf-not-a-module",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), ADAPTER_ERRORS)
def test_adapter_errors_follow_the_error_rule(call, error: type[Exception], match: str) -> None:
    from _helpers import requires_grad_map, tensors_snapshot, training_map

    m = mlp()
    before = (requires_grad_map(m), training_map(m), tensors_snapshot(m))
    with pytest.raises(error) as caught:
        call(m)
    builtin = TypeError if error is ArgumentTypeError else ValueError
    other = ValueError if builtin is TypeError else TypeError
    assert isinstance(caught.value, builtin) and not isinstance(caught.value, other)
    assert re.search(match, str(caught.value)), str(caught.value)
    assert len(str(caught.value)) < 400
    after = (requires_grad_map(m), training_map(m), tensors_snapshot(m))
    assert after[:2] == before[:2]
    assert all(torch.equal(after[2][k], v) for k, v in before[2].items())


def test_unknown_feature_dim_is_explained() -> None:
    bb = ModuleBackbone(mlp())
    with pytest.raises(ArgumentError, match="example_input"):
        _ = bb.feature_dim


def test_submodule_that_does_not_run() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ArgumentError, match="did not run"):
        ModuleBackbone(Skips(), output="unused", feature_dim=2)(torch.randn(1, 2))


# ---------------------------------------------------------------------------- HFEncoder
@pytest.fixture(scope="module")
def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def padded(ids: list[int], length: int) -> dict[str, torch.Tensor]:
    n = len(ids)
    return {
        "input_ids": torch.tensor([ids + [0] * (length - n)]),
        "attention_mask": torch.tensor([[1] * n + [0] * (length - n)]),
    }


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_pooled_features_ignore_padding(tiny_bert: nn.Module, pooling: str) -> None:
    enc = HFEncoder(tiny_bert, pooling=pooling)  # type: ignore[arg-type]
    with torch.no_grad():
        short = enc.forward_features(padded([5, 6, 7], 3))
        long = enc.forward_features(padded([5, 6, 7], 9))
    assert short.shape == (1, 8)
    assert torch.allclose(short, long, atol=1e-5)


def test_hf_mean_pooling_is_masked_mean(tiny_bert: nn.Module) -> None:
    enc = HFEncoder(tiny_bert)
    batch = padded([5, 6, 7], 6)
    with torch.no_grad():
        hidden = tiny_bert(**batch).last_hidden_state
        assert torch.allclose(enc.forward_features(batch), hidden[0, :3].mean(0, keepdim=True), atol=1e-6)


def test_hf_per_token_features_zero_padding(tiny_bert: nn.Module) -> None:
    enc = HFEncoder(tiny_bert, pooling="none")
    with torch.no_grad():
        out = enc.forward_features(padded([5, 6], 5))
    assert out.shape == (1, 5, 8)
    assert torch.count_nonzero(out[0, 2:]) == 0
    assert torch.count_nonzero(out[0, :2]) > 0


def test_hf_tensor_input_and_normalize(tiny_bert: nn.Module) -> None:
    enc = HFEncoder(tiny_bert, normalize=True)
    with torch.no_grad():
        out = enc.forward_features(torch.tensor([[3, 4, 5]]))
    assert torch.allclose(out.norm(dim=-1), torch.ones(1))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda m: HFEncoder(m, pooling="max"), "pooling=", id="bad-pooling"),
        pytest.param(lambda m: HFEncoder(nn.Linear(2, 2)), "hidden_size", id="not-hf"),
        pytest.param(lambda m: HFEncoder(m).forward_features({"x": torch.ones(1)}), "input_ids", id="no-ids"),
        pytest.param(lambda m: HFEncoder(m).tokenize(["a"]), "tokenizer", id="no-tokenizer"),
    ],
)
def test_hf_bad_arguments(tiny_bert: nn.Module, call, match: str) -> None:
    with pytest.raises(ArgumentError, match=match):
        call(tiny_bert)


#: bad flags of HFEncoder around a real (tiny) encoder: (kwargs, class, message pattern)
HF_FLAG_ERRORS = [
    pytest.param(
        {"normalize": "yes"},
        ArgumentTypeError,
        r"^HFEncoder\(normalize='yes'\): expected True or False, got str\. Fix: ",
        id="normalize-str",
    ),
    pytest.param(
        {"tokenizer": 5},
        ArgumentTypeError,
        r"^HFEncoder\(tokenizer=5\): expected a tokenizer .*got int\. Fix: ",
        id="tokenizer-int",
    ),
    pytest.param(
        {"pooling": "max"},
        ArgumentError,
        r"^HFEncoder\(pooling='max'\): expected one of 'mean', 'cls', 'none'\. Fix: ",
        id="pooling-unknown",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), HF_FLAG_ERRORS)
def test_hf_flag_errors_follow_the_error_rule(tiny_bert: nn.Module, kwargs: dict, error, match: str) -> None:
    flags = {n: m.training for n, m in tiny_bert.named_modules()}
    with pytest.raises(error) as caught:
        HFEncoder(tiny_bert, **kwargs)
    assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    assert re.search(match, str(caught.value)), str(caught.value)
    assert {n: m.training for n, m in tiny_bert.named_modules()} == flags


def test_hf_input_of_the_wrong_type(tiny_bert: nn.Module) -> None:
    with pytest.raises(ArgumentTypeError, match="input_ids"):
        HFEncoder(tiny_bert).forward_features([1, 2])


def test_hf_composite_groups_and_default_freeze(tiny_bert: nn.Module) -> None:
    import copy

    model = Composite(HFEncoder(copy.deepcopy(tiny_bert)), nn.Linear(8, 3))
    groups = torchfreeze.layer_groups(model)
    assert groups == [
        ["backbone.model.embeddings"],
        ["backbone.model.encoder.layer.0"],
        ["backbone.model.encoder.layer.1"],
        ["head"],
    ]
    torchfreeze.freeze(model, "backbone", mode="eval")
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    out = model(padded([5, 6], 4))
    out.sum().backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
