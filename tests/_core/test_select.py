"""Selection: one resolver for every selector kind."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchfreeze import select
from torchfreeze._core.select import glob_to_regex, resolve
from torchfreeze.errors import SelectorError, SelectorTypeError


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 3)),
            "head": nn.Linear(3, 1),
        }
    )


CASES = [
    ("dotted-module", ["encoder.0"], ["encoder.0"]),
    ("dotted-parameter", ["head.bias"], ["head.bias"]),
    ("glob-one-segment", ["encoder.*"], ["encoder.0", "encoder.1", "encoder.2"]),
    ("glob-any-segments", ["**.bias"], ["encoder.0.bias", "encoder.1.bias", "encoder.2.bias", "head.bias"]),
    ("glob-question", ["encoder.?.weight"], ["encoder.0.weight", "encoder.1.weight", "encoder.2.weight"]),
    ("regex-fullmatch", [re.compile(r"encoder\.[02]")], ["encoder.0", "encoder.2"]),
    ("type", [nn.LayerNorm], ["encoder.1"]),
    ("tuple-of-types", [(nn.LayerNorm, nn.Sequential)], ["encoder", "encoder.1"]),
    ("predicate", [lambda name, m: name.endswith("head")], ["head"]),
    ("list-union", [["head", "encoder.0"]], ["head", "encoder.0"]),
    ("several-union", ["head", nn.LayerNorm], ["head", "encoder.1"]),
    ("nothing-is-whole-model", [], [""]),
]


@pytest.mark.parametrize("selectors,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_selector_kinds(selectors, expected):
    assert select(model(), *selectors) == expected


def test_module_object_selects_all_its_paths():
    shared = nn.Linear(2, 2)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    assert select(m, shared) == ["0", "2"]


def test_module_name_selects_subtree():
    m = model()
    selection = resolve(m, "encoder")
    assert set(selection.parameters) == {n for n, _ in m.named_parameters() if n.startswith("encoder.")}
    assert "head.weight" not in selection.parameters


def test_regex_is_full_match_not_search():
    with pytest.raises(SelectorError):
        select(model(), re.compile("encod"))


NO_MATCH = [
    ("typo", "encodr", "encoder"),
    ("glob", "decoder.*", "encoder"),
    ("regex", re.compile("body"), "head"),
    ("type", nn.Conv2d, "encoder"),
    ("foreign-module", nn.Linear(2, 2), "encoder"),
]


@pytest.mark.parametrize("selector,closest", [c[1:] for c in NO_MATCH], ids=[c[0] for c in NO_MATCH])
def test_no_match_lists_closest_names(selector, closest):
    with pytest.raises(SelectorError, match="use one of these selectors, which match") as info:
        select(model(), selector)
    assert repr(closest) in str(info.value)
    assert isinstance(info.value, ValueError)


def _suggested(message: str) -> list[str]:
    """The quoted selectors after 'which match:' in a no-match message."""
    return re.findall(r"'([^']*)'", message.split("which match:", 1)[1].split(";", 1)[0])


def deep_model() -> nn.Module:
    m = nn.ModuleDict({"bert": nn.ModuleDict({"encoder": nn.Sequential(nn.Linear(2, 2)), "pooler": nn.Linear(2, 2)})})
    m["bert"]["encoder"].add_module("a[1]", nn.Linear(2, 2))  # a name with glob characters
    return m


SUGGESTION_CASES = [
    ("name-deeper-in-the-model", "encoder", "**.encoder"),
    ("glob-deeper-in-the-model", "encoder.*", "**.encoder.*"),
    ("typo", "bert.encodr", "bert.encoder"),
    ("typo-in-a-parameter", "bert.pooler.wieght", "bert.pooler.weight"),
    ("regex", re.compile("pool"), "bert.pooler"),
    ("type", nn.Conv2d, None),
    ("name-with-glob-characters", "encoder.a[1]", "bert.encoder.a[1]"),
]


@pytest.mark.parametrize("selector,expected", [c[1:] for c in SUGGESTION_CASES], ids=[c[0] for c in SUGGESTION_CASES])
def test_every_suggested_selector_matches(selector, expected):
    """Issue 9: 'encoder' suggested the glob 'encoder.*', which failed with the same message."""
    m = deep_model()
    with pytest.raises(SelectorError) as info:
        select(m, selector)
    suggestions = _suggested(str(info.value))
    assert suggestions
    if expected is not None:
        assert expected in suggestions
    for suggestion in suggestions:
        assert select(m, suggestion)  # resolves, does not raise


@pytest.mark.parametrize("selectors", [("",), (["head", ""],)], ids=["empty", "empty-in-a-list"])
def test_empty_string_is_a_selector_error(selectors):
    """Issue 9: freeze(m, "") froze the whole model."""
    from torchfreeze import freeze

    m = model()
    with pytest.raises(SelectorError, match="empty string"):
        select(m, *selectors)
    with pytest.raises(SelectorError, match="empty string"):
        freeze(m, *selectors)
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize(
    "selector",
    [3, 2.5, lambda name, m: None, int, (nn.Linear, int), {"a": 1}, ("encoder",), ()],
    ids=[
        "int",
        "float",
        "non-bool-predicate",
        "non-module-type",
        "tuple-with-non-module",
        "dict",
        "tuple-of-names",
        "empty-tuple",
    ],
)
def test_wrong_selector_type(selector):
    with pytest.raises(SelectorTypeError) as info:
        select(model(), selector)
    assert isinstance(info.value, TypeError)
    assert "expected" in str(info.value) and "Fix" in str(info.value)


def test_invalid_glob_is_a_selector_error():
    with pytest.raises(SelectorError, match="not a valid glob"):
        select(model(), "encoder.[z-a]")


def test_exact_name_wins_over_glob_reading():
    """ModuleDict keys may contain glob characters: an existing name selects exactly itself."""
    m = nn.ModuleDict({"a[1]": nn.Linear(1, 1), "a1": nn.Linear(1, 1), "x*": nn.Linear(1, 1), "xy": nn.Linear(1, 1)})
    assert select(m, "a[1]") == ["a[1]"]
    assert select(m, "x*") == ["x*"]
    assert select(m, "a[0-9]") == ["a1"]  # not a name: read as a glob
    assert select(m, "x?") == ["x*", "xy"]


def test_parameter_registered_on_the_root():
    m = nn.Linear(2, 2)
    assert select(m, "weight") == ["weight"]
    assert list(resolve(m, "weight").parameters) == ["weight"]
    assert list(resolve(m).parameters) == ["weight", "bias"]


def test_shared_module_subtree_is_per_path():
    shared = nn.Linear(2, 2)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    assert list(resolve(m, "0").parameters) == ["0.weight", "0.bias"]
    assert list(resolve(m, shared).parameters) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_empty_list_is_an_error():
    with pytest.raises(SelectorError, match="empty list"):
        select(model(), [])


def test_model_must_be_a_module():
    with pytest.raises(SelectorTypeError, match=r"^select\(model='encoder'\): expected a torch.nn.Module"):
        select("encoder", "x")  # type: ignore[arg-type]


# glob == equivalent regex, on random trees and random patterns --------------------------------

segment = st.sampled_from(["a", "b", "0", "1", "ab"])


@st.composite
def trees(draw, level=0):
    if level >= 3 or (draw(st.booleans()) and level > 0):
        return nn.Linear(1, 1) if draw(st.booleans()) else nn.ReLU()
    names = draw(st.lists(segment, min_size=1, max_size=3, unique=True))
    return nn.ModuleDict({name: draw(trees(level=level + 1)) for name in names})


glob_part = st.sampled_from(["a", "b", "0", "1", "ab", "*", "**", "a*", "?", "weight", "bias"])


@settings(max_examples=150, deadline=None)
@given(tree=trees(), parts=st.lists(glob_part, min_size=1, max_size=4))
def test_glob_equals_equivalent_regex(tree, parts):
    pattern = ".".join(parts)
    regex = re.compile(glob_to_regex(pattern))
    names = [n for n, _ in tree.named_modules() if n] + [n for n, _ in tree.named_parameters()]
    expected = sorted(n for n in names if regex.fullmatch(n))
    # an independent oracle: fnmatch-like segment matching written directly
    oracle = sorted(n for n in names if _segments_match(parts, n.split(".")))
    assert expected == oracle
    try:
        got = sorted(select(tree, pattern))
    except SelectorError:
        got = []
    assert got == expected
    try:
        got_regex = sorted(select(tree, regex))
    except SelectorError:
        got_regex = []
    assert got_regex == expected


def _segments_match(parts: list[str], segments: list[str]) -> bool:
    import fnmatch

    if not parts:
        return not segments
    head, rest = parts[0], parts[1:]
    if head == "**":
        return any(_segments_match(rest, segments[i:]) for i in range(len(segments) + 1))
    if not segments:
        return False
    return fnmatch.fnmatchcase(segments[0], head) and _segments_match(rest, segments[1:])


def _linear_stack() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))


LONG_SELECTORS = [
    ("long-name", lambda m: "a" * 100_000, SelectorError),
    ("long-glob", lambda m: "*" + "b" * 50_000, SelectorError),
    ("long-regex", lambda m: re.compile("c" * 50_000), SelectorError),
    ("parameter", lambda m: m[0].weight, SelectorTypeError),
    ("big-tensor", lambda m: torch.zeros(1000, 1000), SelectorTypeError),
    ("optimizer", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), SelectorTypeError),
    ("long-list-of-ints", lambda m: [7] * 10_000, SelectorTypeError),
    ("long-tuple-of-types", lambda m: (nn.Linear,) * 5_000 + (int,), SelectorTypeError),
]


@pytest.mark.parametrize("make,error", [c[1:] for c in LONG_SELECTORS], ids=[c[0] for c in LONG_SELECTORS])
@pytest.mark.parametrize("verb", ["select", "freeze", "unfreeze", "is_frozen", "freeze_batchnorm", "pin_mode"])
def test_selector_message_is_bounded_and_names_the_verb(make, error, verb):
    """A huge selector (or a tensor / optimizer with a long repr) gives a short message naming the verb."""
    import torchfreeze

    m = _linear_stack()
    before = [p.requires_grad for p in m.parameters()]
    call = getattr(torchfreeze, verb)
    with pytest.raises(error) as info:
        call(m, make(m))
    message = str(info.value)
    assert len(message) < 600, len(message)
    assert message.startswith(f"{verb}(selectors=")
    assert "tensor([[" not in message and "Parameter Group" not in message  # no tensor / optimizer repr
    assert [p.requires_grad for p in m.parameters()] == before


def test_parameter_selector_suggests_its_name():
    """freeze(m, m[0].weight): the message names the parameter's qualified name as the selector to pass."""
    import torchfreeze

    m = _linear_stack()
    with pytest.raises(SelectorTypeError, match=r"pass '0\.weight'") as info:
        torchfreeze.freeze(m, m[0].weight)
    assert isinstance(info.value, TypeError)
    torchfreeze.freeze(m, "0.weight")  # the suggestion works
    assert not m[0].weight.requires_grad


def test_shared_parameter_selector_suggests_every_name():
    lin = nn.Linear(2, 2)
    m = nn.Sequential(lin, lin)
    with pytest.raises(SelectorTypeError, match=r"pass '0\.weight' or '1\.weight'"):
        select(m, lin.weight)


def test_foreign_tensor_selector_says_it_is_not_in_the_model():
    with pytest.raises(SelectorTypeError, match="not a parameter of the model"):
        select(_linear_stack(), nn.Parameter(torch.zeros(2)))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixed_selector_is_refused_with_the_canonical_name(prefix):
    m = _linear_stack()
    with pytest.raises(SelectorError, match=r"names are canonical.*Fix: pass '0\.weight'"):
        select(m, prefix + "0.weight")
    with pytest.raises(SelectorError, match=r"Fix: pass '1'"):
        select(nn.DataParallel(m), prefix + "1")


def test_resolve_without_a_verb_names_the_selector_alone():
    with pytest.raises(SelectorError, match=r"^selector 'nope' matched no module"):
        resolve(_linear_stack(), "nope")


# --------------------------------------------------------------------------- predicate arity
def _state(m: nn.Module) -> tuple[dict[str, bool], dict[str, bool], dict[str, str]]:
    import torchfreeze

    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    flags = {n: sub.training for n, sub in m.named_modules()}
    return grads, flags, torchfreeze.pinned_modes(m)


def _verbs() -> dict[str, object]:
    import torchfreeze

    return {
        "select": torchfreeze.select,
        "freeze": torchfreeze.freeze,
        "unfreeze": torchfreeze.unfreeze,
        "is_frozen": torchfreeze.is_frozen,
        "pin_mode": torchfreeze.pin_mode,
        "unpin_mode": torchfreeze.unpin_mode,
        "freeze_batchnorm": torchfreeze.freeze_batchnorm,
        "fold_batchnorm": torchfreeze.fold_batchnorm,
    }


#: predicates every verb must refuse before calling them: they cannot take (name, module)
WRONG_ARITY_PREDICATES = [
    pytest.param(lambda name: True, id="one-argument"),
    pytest.param(lambda: True, id="no-argument"),
    pytest.param(lambda name, module, extra: True, id="three-arguments"),
    pytest.param(lambda *, name, module: True, id="keyword-only"),
]


@pytest.mark.parametrize("verb", list(_verbs()))
@pytest.mark.parametrize("predicate", WRONG_ARITY_PREDICATES)
def test_predicate_of_the_wrong_arity_is_an_argument_type_error(verb: str, predicate) -> None:
    m = model()
    before = _state(m)
    with pytest.raises(SelectorTypeError) as info:
        _verbs()[verb](m, predicate)  # type: ignore[operator]
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    assert message.startswith(f"{verb}(selectors=<function")
    assert "predicate(name, module)" in message and "Fix:" in message and len(message) < 400
    assert _state(m) == before


def test_predicate_that_raises_propagates_its_own_error_and_changes_nothing() -> None:
    import torchfreeze

    m = model()
    before = _state(m)

    def broken(name: str, module: nn.Module) -> bool:
        raise ZeroDivisionError("the user's own bug")

    with pytest.raises(ZeroDivisionError, match="the user's own bug"):
        torchfreeze.freeze(m, "head", broken, mode="eval")
    assert _state(m) == before
