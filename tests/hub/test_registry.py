"""register_model / get_model / list_models: freeze plans, weights, warnings."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchfreeze
from torchfreeze import Composite, Weights, get_model, list_models, register_model
from torchfreeze.errors import ArgumentError, ArgumentTypeError, WeightsError
from torchfreeze.hub import FreezePlan, NothingPretrainedWarning
from torchfreeze.hub import registry as _registry
from torchfreeze.hub.weights import sha256_file


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees the built-ins plus what it registers; nothing leaks out (built-ins load on demand)."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    yield


class Backbone2(nn.Module):
    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.last = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.stem(x))


def build(num_classes: int = 2) -> Composite:
    torch.manual_seed(0)
    return Composite(Backbone2(), nn.Linear(4, num_classes))


@pytest.fixture
def pretrained(tmp_path: Path) -> Weights:
    torch.manual_seed(42)
    path = tmp_path / "bb.safetensors"
    from safetensors.torch import save_file

    save_file(Backbone2().state_dict(), str(path))
    return Weights("toy", str(path), sha256_file(path), {"license": "MIT"}, target="backbone")


@pytest.fixture
def toy(pretrained: Weights) -> str:
    register_model(
        "toy",
        build,
        weights=pretrained,
        plans={"all_but_last_block": FreezePlan(freeze=("backbone.stem",), description="stem only")},
        description="a toy",
    )
    return "toy"


def requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_list_models_has_the_builtins() -> None:
    names = list_models()
    assert {"digits-cnn", "minilm-classifier"} <= set(names)
    assert names == sorted(names)


def test_freeze_false_trains_everything(toy: str, pretrained: Weights) -> None:
    model = get_model(toy)
    assert all(requires_grad(model).values())
    assert torchfreeze.pinned_modes(model) == {}
    assert torch.equal(model.backbone.stem[0].weight, pretrained.state_dict()["stem.0.weight"])


def test_freeze_true_is_the_composite_default(toy: str) -> None:
    model = get_model(toy, freeze=True, num_classes=5)
    assert [n for n, _ in torchfreeze.trainable_parameters(model)] == ["head.weight", "head.bias"]
    assert model.head.out_features == 5
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    assert model.head.training


def test_named_plan(toy: str) -> None:
    model = get_model(toy, freeze="all_but_last_block")
    assert torchfreeze.is_frozen(model, "backbone.stem")
    assert not torchfreeze.is_frozen(model, "backbone.last")
    assert not torchfreeze.is_frozen(model, "head")


def test_callable_plan_and_declared_default(pretrained: Weights) -> None:
    seen: list[nn.Module] = []

    def plan(model: nn.Module) -> None:
        seen.append(model)
        torchfreeze.freeze(model, "head")

    register_model("custom", build, weights=pretrained, plans={"default": plan})
    model = get_model("custom", freeze=True)
    assert seen == [model]
    assert torchfreeze.is_frozen(model, "head") and not torchfreeze.is_frozen(model, "backbone")


def test_unknown_plan_lists_known_plans(toy: str) -> None:
    with pytest.raises(ArgumentError) as info:
        get_model(toy, freeze="bottom_half")
    message = str(info.value)
    assert "bottom_half" in message and "all_but_last_block" in message and "default" in message


@pytest.mark.parametrize("freeze", [3, None, 1.0], ids=["int", "none", "float"])
def test_bad_freeze_type(toy: str, freeze: object) -> None:
    with pytest.raises(ArgumentTypeError, match=r"freeze="):
        get_model(toy, freeze=freeze)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [None, 1, ["digits-cnn"]], ids=["none", "int", "list"])
def test_model_name_of_the_wrong_type(name: object) -> None:
    with pytest.raises(ArgumentTypeError, match=r"name=.*expected a model name"):
        get_model(name)  # type: ignore[arg-type]


#: get_model's refusals: (name, keywords, class, message pattern); each names the verb and the argument,
#: says what was expected and ends with the fix; nothing is built
GET_MODEL_ERRORS = [
    pytest.param("digit-cnn", {}, ArgumentError, r"^get_model\(name='digit-cnn'\): .*Fix: pass 'digits-cnn'", id="close-name"),
    pytest.param(" digits-cnn", {}, ArgumentError, r"Fix: pass 'digits-cnn' \(the closest name\)", id="padded-name"),
    pytest.param("DIGITS-CNN", {}, ArgumentError, r"Fix: pass 'digits-cnn'", id="upper-case-name"),
    pytest.param("", {}, ArgumentError, r"^get_model\(name=''\): .*Fix: pass one of them", id="empty-name"),
    pytest.param("zzz", {}, ArgumentError, r"known models: \[.*'digits-cnn'.*\]\. Fix: ", id="unknown-name"),
    pytest.param("digits-cnn", {"weights": "nope"}, ArgumentError, r"^get_model\(weights='nope'\): .*known: \['default'\]\. Fix: ", id="unknown-weights"),
    pytest.param("digits-cnn", {"freeze": ""}, ArgumentError, r"^get_model\(freeze=''\): .*Fix: ", id="empty-plan"),
    pytest.param("digits-cnn", {"bogus": 1}, ArgumentTypeError, r"^get_model\('digits-cnn', bogus=1\): .*unexpected keyword argument 'bogus'.*Fix: pass only what it takes: \(\*, num_classes", id="unknown-keyword"),
    pytest.param("digits-cnn", {"num_classes": -1}, ArgumentError, r"^digits_cnn\(num_classes=-1\): expected an int >= 1\. Fix: ", id="num-classes-negative"),
    pytest.param("digits-cnn", {"num_classes": "5"}, ArgumentTypeError, r"^digits_cnn\(num_classes='5'\): expected an int >= 1, got str\. Fix: ", id="num-classes-str"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), GET_MODEL_ERRORS)
def test_get_model_errors_follow_the_error_rule(name: str, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        get_model(name, **kwargs)
    assert isinstance(caught.value, TypeError if error is ArgumentTypeError else ValueError)
    assert len(str(caught.value)) < 400


def test_unknown_weights_name(toy: str) -> None:
    with pytest.raises(ArgumentError, match="known: \\['default'"):
        get_model(toy, weights="imagenet")


@pytest.mark.parametrize(
    ("weights", "freeze", "warns"),
    [
        pytest.param(None, True, True, id="none-frozen"),
        pytest.param(None, "all_but_last_block", True, id="none-plan"),
        pytest.param(None, False, False, id="none-unfrozen"),
        pytest.param("default", True, False, id="pretrained-frozen"),
    ],
)
def test_nothing_pretrained_warning(toy: str, weights, freeze, warns: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_model(toy, weights=weights, freeze=freeze)
    hits = [w for w in caught if issubclass(w.category, NothingPretrainedWarning)]
    assert bool(hits) == warns
    if warns:
        assert "nothing pretrained" in str(hits[0].message)
        assert issubclass(NothingPretrainedWarning, UserWarning)


def test_model_without_registered_weights_builds_randomly_and_warns() -> None:
    register_model("bare", build)
    with pytest.warns(NothingPretrainedWarning, match="weights='default'.*no registered pretrained weights"):
        model = get_model("bare", freeze=True)
    assert torchfreeze.is_frozen(model, "backbone")


def test_weights_object_overrides(toy: str, tmp_path: Path) -> None:
    torch.manual_seed(7)
    other = Backbone2()
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file(other.state_dict(), str(path))
    model = get_model(toy, weights=Weights("other", str(path), sha256_file(path), target="backbone"))
    assert torch.equal(model.backbone.last[0].weight, other.last[0].weight)


def test_bad_weights_fail_the_build(toy: str, pretrained: Weights) -> None:
    broken = Weights("broken", pretrained.source, "f" * 64, target="backbone")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        get_model(toy, weights=broken, freeze=True)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(lambda: register_model("", build), ArgumentError, "name=", id="empty-name"),
        pytest.param(lambda: register_model(5, build), ArgumentTypeError, "name=5", id="name-not-str"),
        pytest.param(lambda: register_model("digits-cnn", build), ArgumentError, "already registered", id="duplicate"),
        pytest.param(lambda: register_model("x", 3), ArgumentTypeError, "builder=", id="not-callable"),
        pytest.param(lambda: register_model("x", build, overwrite="yes"), ArgumentTypeError, "overwrite=", id="flag"),
        pytest.param(
            lambda: register_model("x", build, plans={"p": 3}), ArgumentTypeError, "plans\\['p'\\]", id="bad-plan"
        ),
        pytest.param(
            lambda: register_model("x", build, weights={"w": 3}),
            ArgumentTypeError,
            "weights\\['w'\\]",
            id="bad-weights",
        ),
        pytest.param(
            lambda: register_model("x", build, weights=[3]),
            ArgumentTypeError,
            "weights\\['#0'\\]",
            id="bad-weights-list",
        ),
        pytest.param(
            lambda: register_model("x", build, weights="w.safetensors"),
            ArgumentTypeError,
            "expected a Weights",
            id="weights-path-str",
        ),
    ],
)
def test_register_model_errors(call, error: type[Exception], match: str) -> None:
    before = dict(_registry._REGISTRY)
    with pytest.raises(error, match=match):
        call()
    assert _registry._REGISTRY == before


def test_register_as_decorator_and_overwrite() -> None:
    @register_model("deco", description="first")
    def first() -> nn.Module:
        return build()

    assert "deco" in list_models()
    register_model("deco", lambda: build(3), overwrite=True)
    assert get_model("deco").head.out_features == 3


def test_builder_must_return_a_module() -> None:
    register_model("broken-builder", lambda: "not a model")
    with pytest.raises(ArgumentError, match="expected an nn.Module"):
        get_model("broken-builder")


def test_default_plan_needs_a_backbone() -> None:
    register_model("flat", lambda: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
    with pytest.raises(ArgumentError, match="declares no 'default' freeze plan"):
        get_model("flat", freeze=True)
    register_model(
        "flat-with-plan",
        lambda: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)),
        plans={"default": FreezePlan(freeze=("0",))},
    )
    with pytest.warns(NothingPretrainedWarning):
        model = get_model("flat-with-plan", freeze=True)
    assert torchfreeze.is_frozen(model, "0") and not torchfreeze.is_frozen(model, "1")


def test_get_model_frozen_dtype():
    model = get_model("digits-cnn", freeze=True, frozen_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.backbone.parameters())
    assert all(p.dtype == torch.float32 for p in model.head.parameters())
    assert model(torch.randn(2, 1, 8, 8)).dtype == torch.float32


def test_get_model_frozen_dtype_needs_a_plan():
    with pytest.raises(ArgumentError, match="frozen_dtype"):
        get_model("digits-cnn", frozen_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- lazy built-ins
def _fresh_interpreter(code: str) -> list[str]:
    """Run ``code`` in a new interpreter; it prints module names, one a line."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.split()


def test_user_model_never_imports_the_built_in_modules() -> None:
    code = (
        "import sys, torch, torchfreeze as tf\n"
        "tf.register_model('mine', lambda: tf.Composite(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)))\n"
        "tf.get_model('mine', freeze=False)\n"
        "assert {'digits-cnn', 'minilm-classifier', 'mine'} <= set(tf.list_models())\n"
        "print(*[m for m in sys.modules if m.startswith(('torchfreeze.hub.builtin.', 'sklearn', 'transformers'))])"
    )
    assert _fresh_interpreter(code) == []


def test_a_built_in_model_imports_only_its_own_module() -> None:
    code = (
        "import sys, torchfreeze as tf\n"
        "from torchfreeze.hub import model_spec\n"
        "spec = model_spec('digits-cnn')\n"
        "assert spec.weights['default'].target == 'backbone'\n"
        "print(*[m for m in sys.modules if m.startswith(('torchfreeze.hub.builtin.', 'sklearn', 'transformers'))])"
    )
    assert _fresh_interpreter(code) == ["torchfreeze.hub.builtin.digits"]


def test_a_built_in_name_is_taken_unless_overwritten() -> None:
    with pytest.raises(ArgumentError, match=r"^register_model\(name=.*already registered\. Fix: "):
        register_model("minilm-classifier", build)
    register_model("minilm-classifier", build, overwrite=True)  # the built-in module is then never needed
    assert _registry.model_spec("minilm-classifier").builder is build
