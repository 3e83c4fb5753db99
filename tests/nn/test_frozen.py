"""Frozen: the constant function of the wrapped parameters, per use."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchfreeze import Frozen, frozen_parameters, prepare_for_distributed, trainable_parameters, unfreeze
from torchfreeze.errors import ArgumentError, ArgumentTypeError, ModeError


def layers() -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    return nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)


def ids(named) -> set[int]:
    return {id(p) for _, p in named}


def test_trainable_parameters_exclude_frozen_use_only():
    l1, l2, l3 = layers()
    m0 = nn.Sequential(l1, l2, l3)
    m1 = nn.Sequential(l1, Frozen(l2), l3)
    assert ids(trainable_parameters(m1)) == {id(p) for p in [*l1.parameters(), *l3.parameters()]}
    assert ids(trainable_parameters(m0)) == {id(p) for p in m0.parameters()}
    assert ids(frozen_parameters(m1)) == {id(p) for p in l2.parameters()}


def test_gradient_reaches_neighbours_equal_to_unwrapped_and_not_wrapped():
    l1, l2, l3 = layers()
    m0 = nn.Sequential(l1, l2, l3)
    m1 = nn.Sequential(l1, Frozen(l2), l3)
    x = torch.randn(5, 3)
    m0(x).sum().backward()
    expected = {id(p): p.grad.clone() for p in [*l1.parameters(), *l3.parameters()]}
    for p in m0.parameters():
        p.grad = None
    m1(x).sum().backward()
    for p in [*l1.parameters(), *l3.parameters()]:
        assert torch.equal(p.grad, expected[id(p)])
    assert all(p.grad is None for p in l2.parameters())


def test_difference_of_uses_trains_only_the_unwrapped_use():
    l1, l2, l3 = layers()
    m0 = nn.Sequential(l1, l2, l3)
    m1 = nn.Sequential(l1, Frozen(l2), l3)
    x = torch.randn(5, 3)
    (m0(x) - m1(x)).sum().backward()
    for p in [*l1.parameters(), *l3.parameters()]:
        assert torch.count_nonzero(p.grad) == 0
    assert all(torch.count_nonzero(p.grad) > 0 for p in l2.parameters())


def test_output_equals_unwrapped_module():
    _, l2, _ = layers()
    x = torch.randn(2, 4)
    assert torch.equal(Frozen(l2)(x), l2(x))


def test_tied_use_keeps_requires_grad_and_trains():
    l1, l2, l3 = layers()
    model = nn.Sequential(l1, Frozen(l2), l2, l3)  # l2 used frozen and trainable
    assert l2.weight.requires_grad
    assert id(l2.weight) in ids(trainable_parameters(model))
    model(torch.randn(2, 3)).sum().backward()
    assert l2.weight.grad is not None


def _filled(model: nn.Module, value: float) -> nn.Module:
    for p in model.parameters():
        nn.init.constant_(p, value)
    return model


def _plain_and_wrapped() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    wrapped = nn.Sequential(Frozen(nn.Linear(4, 4), mode="eval"), nn.Linear(4, 2))
    return plain, wrapped


def test_state_dict_keys_are_the_plain_models():
    """Issue 9: a model trained with Frozen saved '0.module.weight', which the plain model refused."""
    plain, wrapped = _plain_and_wrapped()
    assert list(wrapped.state_dict()) == list(plain.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not-strict"])
@pytest.mark.parametrize("direction", ["wrapped-to-plain", "plain-to-wrapped"])
def test_checkpoints_load_both_ways(direction: str, strict: bool):
    plain, wrapped = _plain_and_wrapped()
    source, target = (wrapped, plain) if direction == "wrapped-to-plain" else (plain, wrapped)
    _filled(source, 0.5)
    result = target.load_state_dict(source.state_dict(), strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []  # strict=False skips nothing
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in target.parameters())


def test_checkpoint_of_torchfreeze_0_2_with_module_keys_still_loads():
    _, wrapped = _plain_and_wrapped()
    old = {k.replace("0.", "0.module.", 1) if k.startswith("0.") else k: v for k, v in wrapped.state_dict().items()}
    assert "0.module.weight" in old
    fresh = _filled(_plain_and_wrapped()[1], 0.0)
    fresh.load_state_dict(old)
    assert torch.equal(fresh[0].module.weight, wrapped[0].module.weight)


def test_strict_loading_still_reports_what_is_really_missing():
    _, wrapped = _plain_and_wrapped()
    state = wrapped.state_dict()
    del state["0.bias"]
    with pytest.raises(RuntimeError, match=r"0\.module\.bias"):
        wrapped.load_state_dict(state)


def test_attributes_and_indexing_reach_the_wrapped_module():
    """Issue 9: Frozen(nn.Sequential(...))[0] failed, and so did a method of the wrapped module."""
    inner = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    inner.custom = lambda: "mine"  # type: ignore[assignment]
    frozen = Frozen(inner)
    assert frozen[0] is inner[0] and len(frozen) == 3 and list(frozen) == list(inner)
    assert frozen.custom() == "mine" and frozen.mode is None  # Frozen's own attributes win
    assert bool(Frozen(nn.Linear(1, 1)))  # truthy although a Linear has no len()
    with pytest.raises(TypeError):
        len(Frozen(nn.Linear(1, 1)))
    with pytest.raises(AttributeError, match="no_such_thing"):
        frozen.no_such_thing


def test_forward_features_through_frozen_is_a_frozen_use():
    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * 2

    backbone = Backbone()
    x = torch.randn(3, 2, requires_grad=True)
    out = Frozen(backbone).forward_features(x)
    out.sum().backward()
    assert backbone.lin.weight.grad is None and x.grad is not None  # gradients flow to the input only
    assert torch.allclose(out, backbone.forward_features(x))


def test_hf_freeze_feature_encoder_works_after_wrapping():
    """Issue 9: m.freeze_feature_encoder() raised AttributeError on a Frozen feature encoder."""
    pytest.importorskip("transformers")
    import transformers as t

    config = t.Wav2Vec2Config(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )  # fmt: skip
    model = t.Wav2Vec2ForCTC(config)
    model.wav2vec2.feature_extractor = Frozen(model.wav2vec2.feature_extractor)
    model.freeze_feature_encoder()
    inner = model.wav2vec2.feature_extractor.module
    assert inner._requires_grad is False and not any(p.requires_grad for p in inner.parameters())
    model.train()
    model(torch.randn(2, 64)).logits.sum().backward()  # still runs end to end


def test_mode_pins_the_wrapped_subtree():
    inner = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model = nn.Sequential(Frozen(inner, mode="eval"), nn.Dropout(0.5))
    model.train()
    assert not inner.training and not inner[1].training
    assert model[1].training


@pytest.mark.parametrize(
    ("bad", "error"),
    [("evaluation", ModeError), (True, ArgumentTypeError), (0, ArgumentTypeError)],
    ids=["typo", "bool", "int"],
)
def test_invalid_mode(bad, error):
    inner = nn.Linear(2, 2)
    with pytest.raises(error, match="mode="):
        Frozen(inner, mode=bad)
    assert inner.__dict__.get("train") is None


def test_not_a_module():
    from torchfreeze.errors import ArgumentTypeError, TorchFreezeError

    with pytest.raises(ArgumentTypeError, match=r"^Frozen\(module=<function .*expected a torch.nn.Module") as info:
        Frozen(lambda x: x)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, TorchFreezeError)


def test_prepare_for_distributed_only_touches_parameters_without_trainable_use():
    l1, l2, l3 = layers()
    tied = nn.Linear(4, 4)
    model = nn.Sequential(l1, Frozen(l2), Frozen(tied), tied, l3)
    prepare_for_distributed(model)
    assert not any(p.requires_grad for p in l2.parameters())
    assert all(p.requires_grad for p in tied.parameters())
    assert all(p.requires_grad for p in [*l1.parameters(), *l3.parameters()])
    # every parameter that still requires grad receives one: what DDP needs
    model(torch.randn(2, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_frozen_deepcopy_and_pickle_roundtrip():
    import pickle

    _, l2, _ = layers()
    model = nn.Sequential(Frozen(l2, mode="eval"))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert not clone[0].module.training
        x = torch.randn(2, 4)
        assert torch.equal(clone(x), model(x))


def test_nested_frozen_keys_and_plain_checkpoint():
    torch.manual_seed(0)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    plain = nn.Sequential(copy.deepcopy(a), copy.deepcopy(b))
    for p in plain.parameters():
        nn.init.constant_(p, 0.25)
    model = Frozen(nn.Sequential(Frozen(a), b))  # a Frozen at the root and one inside it
    assert sorted(model.state_dict()) == sorted(plain.state_dict()) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    model.load_state_dict(plain.state_dict())
    assert all(torch.equal(p, torch.full_like(p, 0.25)) for p in model.parameters())
    assert list(trainable_parameters(model)) == []
    assert list(Frozen(Frozen(a)).state_dict()) == ["weight", "bias"]  # re-wrapping unwraps
    assert [n for n, _ in model.named_parameters()][0] == "module.0.module.weight"  # names keep the level


def test_lazy_module_needs_weights_before_a_frozen_forward():
    model = nn.Sequential(Frozen(nn.LazyLinear(2)), nn.Linear(2, 1))
    with pytest.raises(ArgumentError, match="lazy"):
        model(torch.randn(3, 4))
    source = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1))
    model.load_state_dict(source.state_dict())  # materialises the lazy layer from the plain keys
    x = torch.randn(3, 4)
    model(x).sum().backward()
    assert torch.equal(model(x), source(x))
    assert model[0].module.weight.grad is None and model[1].weight.grad is not None


def test_frozen_batchnorm_statistics_follow_the_mode():
    """Buffers are the module's own: a train-mode BatchNorm inside Frozen still updates them unless pinned."""
    x = torch.randn(8, 3)
    free, pinned = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    model = nn.Sequential(Frozen(free), Frozen(pinned, mode="eval")).train()
    model(x)
    assert not torch.equal(free.running_mean, torch.zeros(3))
    assert torch.equal(pinned.running_mean, torch.zeros(3))


def test_unfreezing_only_a_frozen_use_warns_that_it_stays_frozen():
    model = nn.Sequential(nn.Linear(4, 4), Frozen(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"used only through Frozen.*Fix:"):
        unfreeze(model, "1")
    assert [n for n, _ in frozen_parameters(model)] == ["1.module.weight", "1.module.bias"]


def test_unfreezing_a_selection_with_trainable_uses_does_not_warn():
    import warnings

    model = nn.Sequential(nn.Linear(4, 4), Frozen(nn.Linear(4, 4)), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unfreeze(model)  # the plain layers train; the Frozen use is part of a wider selection
