"""Tests of BatchNorm folding: equal outputs, documented state_dict change, exact way back."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _resnet import TinyResNet, trained_resnet
from torch import nn

import torchfreeze as tf
from torchfreeze.nn.fold import FoldedBatchNorm, fold_batchnorm, foldable_pairs, folded_batchnorms, unfold_batchnorm


def randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


def conv1d_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 4, 3, bias=False), nn.BatchNorm1d(4), nn.ReLU())


def conv2d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, groups=1), nn.BatchNorm2d(5)
    )


def grouped_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, bias=False), nn.BatchNorm2d(4))


def conv3d_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2))


def linear_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


class Block(nn.Module):
    """Not a Sequential: found through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


CASES = [
    pytest.param(conv1d_net, (3, 2, 9), 1, id="conv1d-no-bias"),
    pytest.param(conv2d_net, (2, 3, 8, 8), 2, id="conv2d-two-pairs"),
    pytest.param(grouped_net, (2, 4, 6, 6), 1, id="grouped-conv"),
    pytest.param(conv3d_net, (2, 1, 4, 4, 4), 1, id="conv3d"),
    pytest.param(linear_net, (7, 5), 1, id="linear"),
    pytest.param(Block, (2, 3, 6, 6), 1, id="fx-traced-block"),
]


def prepared(build: object) -> nn.Module:
    torch.manual_seed(0)
    model = randomise_bn(build())  # type: ignore[operator]
    tf.freeze(model)
    tf.freeze_batchnorm(model)
    return model


@pytest.mark.parametrize(("build", "shape", "n_pairs"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fold_keeps_outputs_and_unfold_restores_exactly(
    build: object, shape: tuple, n_pairs: int, dtype: torch.dtype
) -> None:
    model = prepared(build).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    before = model(x)
    state = copy.deepcopy(model.state_dict())
    weight_ids = {n: id(p) for n, p in model.named_parameters()}
    fold_batchnorm(model)
    assert len(folded_batchnorms(model)) == n_pairs
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    model.train()  # folded layers stay correct in train mode: they were pinned eval
    torch.testing.assert_close(model(x), before, rtol=tol, atol=tol)
    for n, p in model.named_parameters():
        if n in weight_ids:
            assert id(p) == weight_ids[n]
    unfold_batchnorm(model)
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_state_dict_change_is_the_documented_one() -> None:
    model = prepared(conv1d_net)
    fold_batchnorm(model)
    assert sorted(model.state_dict()) == ["0.bias", "0.weight"]
    assert isinstance(model[1], FoldedBatchNorm) and not model[0].bias.requires_grad
    assert folded_batchnorms(model) == {"1": "0"}


def test_frozen_batchnorm_modules_fold_too() -> None:
    torch.manual_seed(0)
    model = randomise_bn(conv2d_net())
    tf.freeze(model)
    tf.freeze_batchnorm(model, convert=True)
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    fold_batchnorm(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert len(folded_batchnorms(model)) == 2


def unpinned(model: nn.Module) -> None:
    tf.unpin_mode(model)


def trainable_conv(model: nn.Module) -> None:
    model[0].weight.requires_grad_(True)


def trainable_bn(model: nn.Module) -> None:
    model[1].weight.requires_grad_(True)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        pytest.param(unpinned, "not pinned to eval", id="bn-not-pinned"),
        pytest.param(trainable_conv, "'0.weight' is trainable", id="conv-trainable"),
        pytest.param(trainable_bn, "'1.weight' is trainable", id="bn-trainable"),
    ],
)
def test_unfoldable_pair_is_refused_and_nothing_changes(spoil: object, reason: str) -> None:
    model = prepared(conv1d_net)
    spoil(model)  # type: ignore[operator]
    state = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    with pytest.raises(tf.errors.ArgumentError, match=reason):
        fold_batchnorm(model)
    with pytest.raises(tf.errors.FreezeStateError, match=reason):
        fold_batchnorm(model, strict=True)
    assert [type(m) for m in model.modules()] == modules
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_conv_weight_tied_to_another_layer_is_not_folded() -> None:
    model = prepared(linear_net)
    tied = nn.Linear(5, 6)
    tied.weight = model[0].weight  # another use of the same frozen weight
    outer = nn.Sequential(model, tied)
    assert [r for _, _, r in foldable_pairs(outer)][0] is not None
    with pytest.raises(tf.errors.ArgumentError, match="also used as '1.weight'"):
        fold_batchnorm(outer)


def test_non_strict_folds_only_what_it_can() -> None:
    model = prepared(conv2d_net)
    model[3].weight.requires_grad_(True)
    fold_batchnorm(model)
    assert folded_batchnorms(model) == {"1": "0"}
    assert [r is None for _, _, r in foldable_pairs(model)] == [False]


def test_selectors_limit_the_folding() -> None:
    model = prepared(conv2d_net)
    fold_batchnorm(model, "4")
    assert folded_batchnorms(model) == {"4": "3"}


def test_output_used_twice_is_not_a_pair() -> None:
    class TwoUses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    model = TwoUses()
    tf.freeze(model)
    tf.freeze_batchnorm(model)
    assert foldable_pairs(model) == []
    with pytest.raises(tf.errors.ArgumentError, match="nothing to fold"):
        fold_batchnorm(model)


def test_explicit_pairs_and_bad_pairs() -> None:
    model = prepared(Block)
    fold_batchnorm(model, pairs=[("conv", "bn")])
    assert folded_batchnorms(model) == {"bn": "conv"}
    with pytest.raises(tf.errors.ArgumentError, match="no submodule"):
        fold_batchnorm(prepared(Block), pairs=[("conv", "bnn")])
    with pytest.raises(tf.errors.ArgumentTypeError, match="conv_name, bn_name"):
        fold_batchnorm(prepared(Block), pairs=["conv"])  # type: ignore[list-item]
    fresh = prepared(Block)
    state = copy.deepcopy(fresh.state_dict())
    with pytest.raises(tf.errors.ArgumentError, match="more than once"):
        fold_batchnorm(fresh, pairs=[("conv", "bn"), ("conv", "bn")])
    assert folded_batchnorms(fresh) == {}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])


def test_fold_a_submodule_then_unfold_the_whole_model_restores_the_right_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), randomise_bn(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))))
    tf.freeze(model)
    tf.freeze_batchnorm(model)
    state = copy.deepcopy(model.state_dict())
    fold_batchnorm(model[1])  # names inside model[1]: the BatchNorm '1' folds into '0'
    unfold_batchnorm(model, force=True)
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_unfold_refuses_changed_weights_unless_forced() -> None:
    model = prepared(conv1d_net)
    fold_batchnorm(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(tf.errors.FreezeStateError, match="changed after"):
        unfold_batchnorm(model)
    assert isinstance(model[1], FoldedBatchNorm)
    unfold_batchnorm(model, force=True)
    assert isinstance(model[1], nn.BatchNorm1d)


def test_unfold_without_folds_and_deepcopy() -> None:
    with pytest.raises(tf.errors.ArgumentError, match="no folded BatchNorm"):
        unfold_batchnorm(conv1d_net())
    model = prepared(conv1d_net)
    state = copy.deepcopy(model.state_dict())
    clone = copy.deepcopy(fold_batchnorm(model))
    unfold_batchnorm(clone)
    for k, v in clone.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda m: fold_batchnorm("model"),
            r"^fold_batchnorm\(model='model'\): expected a torch.nn.Module",
            id="fold-not-a-module",
        ),
        pytest.param(
            lambda m: unfold_batchnorm("model"),
            r"^unfold_batchnorm\(model='model'\): expected a torch.nn.Module",
            id="unfold-not-a-module",
        ),
        pytest.param(
            lambda m: fold_batchnorm(m, strict="yes"), r"strict='yes'\): expected True or False", id="strict-not-bool"
        ),
        pytest.param(lambda m: unfold_batchnorm(m, force=1), r"force=1\): expected True or False", id="force-not-bool"),
        pytest.param(lambda m: fold_batchnorm(m, pairs="0,1"), "pairs must be a list", id="pairs-not-a-list"),
    ],
)
def test_bad_argument_types_change_nothing(call: object, match: str) -> None:
    model = prepared(conv1d_net)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(tf.errors.ArgumentTypeError, match=match):
        call(model)  # type: ignore[operator]
    assert folded_batchnorms(model) == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


# --- composes with freeze_batchnorm(convert=...) on a ResNet-style model (issue 9.4) ----------------


@pytest.mark.parametrize("convert", [False, True], ids=["pinned", "converted"])
def test_every_pair_of_a_resnet_folds_converted_or_not(convert: bool) -> None:
    model = trained_resnet()
    tf.freeze(model, "conv1", "bn1", "layer1", "layer2")
    tf.freeze_batchnorm(model, convert=convert)
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    state = copy.deepcopy(model.state_dict())
    bn_objects = {n: m for n, m in model.named_modules() if "bn" in n or n.endswith("downsample.1")}
    pairs = foldable_pairs(model)
    assert len(pairs) == TinyResNet.PAIRS and all(reason is None for _, _, reason in pairs)
    assert ("layer1.0.conv1", "layer1.0.bn1", None) in pairs and (
        "layer2.0.downsample.0",
        "layer2.0.downsample.1",
        None,
    ) in pairs
    fold_batchnorm(model, strict=True)
    assert sorted(folded_batchnorms(model)) == sorted(bn_objects)
    model.train()  # the head trains; the folded backbone computes what it did
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    unfold_batchnorm(model)
    assert {n: m for n, m in model.named_modules() if n in bn_objects} == bn_objects  # the same objects
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(model.eval()(x), before)


class AddThenNorm(nn.Module):
    """A frozen BatchNorm fed by an addition: no Conv/Linear whose output goes only to it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.stem = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.bn(self.conv(x) + x)


@pytest.mark.parametrize("convert", [False, True], ids=["pinned", "converted"])
def test_strict_raises_for_a_frozen_batchnorm_left_unfolded_without_suggesting_what_was_done(convert: bool) -> None:
    model = tf.freeze_batchnorm(tf.freeze(AddThenNorm()), convert=convert)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(tf.errors.FreezeStateError, match="'bn': no Conv/Linear") as caught:
        fold_batchnorm(model, strict=True)
    assert "freeze_batchnorm" not in str(caught.value) and "stem" not in str(caught.value)
    assert folded_batchnorms(model) == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    fold_batchnorm(model)  # not strict: folds the stem, leaves 'bn'
    assert folded_batchnorms(model) == {"stem.1": "stem.0"}
    with pytest.raises(tf.errors.ArgumentError, match="nothing to fold") as caught:
        fold_batchnorm(model, "bn")
    assert "freeze_batchnorm" not in str(caught.value) and "pairs=" in str(caught.value)


def test_nothing_to_fold_suggests_freezing_only_when_nothing_is_frozen() -> None:
    with pytest.raises(tf.errors.ArgumentError, match="nothing to fold") as caught:
        fold_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert "freeze_batchnorm" in str(caught.value)


def test_a_batchnorm_subclass_with_an_activation_is_never_folded() -> None:
    class NormAct(nn.BatchNorm2d):
        def __init__(self, n: int) -> None:
            super().__init__(n)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(super().forward(x))

    for convert in (False, True):
        model = tf.freeze_batchnorm(tf.freeze(nn.Sequential(nn.Conv2d(2, 3, 1), NormAct(3))), convert=convert)
        [(_, _, reason)] = foldable_pairs(model)
        assert reason is not None and "NormAct" in reason and "does more than BatchNorm" in reason
        with pytest.raises(tf.errors.FreezeStateError, match="does more than BatchNorm"):
            fold_batchnorm(model, strict=True)


def prepared_conv1d() -> nn.Module:
    return prepared(conv1d_net)


def meta_conv1d_net() -> nn.Module:
    with torch.device("meta"):
        model = conv1d_net()
    tf.freeze(model, mode="eval")
    return tf.freeze_batchnorm(model)


#: value errors of fold_batchnorm: (model builder, call, message pattern); each names the verb and argument,
#: says what was expected and ends with the fix, and changes nothing
FOLD_VALUE_ERRORS = [
    pytest.param(
        prepared_conv1d,
        lambda m: fold_batchnorm(m, pairs=[("0", "zz")]),
        r"^fold_batchnorm\(pairs=\[\('0', 'zz'\)\]\): 'zz' is no submodule.*e\.g\. \['0', '1', '2'\]\. Fix: ",
        id="pairs-unknown-name-lists-real-names",
    ),
    pytest.param(
        prepared_conv1d,
        lambda m: fold_batchnorm(m, pairs=[("", "1")]),
        r"^fold_batchnorm\(pairs=.*'' is no submodule.*Fix: ",
        id="pairs-root-name",
    ),
    pytest.param(
        meta_conv1d_net,
        fold_batchnorm,
        r"^fold_batchnorm\(model=\.\.\.\): \d+ tensor\(s\) are on the meta device.*Fix: materialise",
        id="meta-model",
    ),
]


@pytest.mark.parametrize(("build", "call", "match"), FOLD_VALUE_ERRORS)
def test_fold_value_errors_name_the_argument_and_the_fix(build, call, match: str) -> None:
    model = build()
    keys = list(model.state_dict())
    types = [type(m) for m in model.modules()]
    with pytest.raises(tf.errors.ArgumentError) as caught:
        call(model)
    assert isinstance(caught.value, ValueError) and not isinstance(caught.value, TypeError)
    assert re.search(match, str(caught.value)), str(caught.value)
    assert len(str(caught.value)) < 400
    assert folded_batchnorms(model) == {} and list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == types
