"""layer_groups from the model's structure: blocks, what lies around them, norms, ties."""

from __future__ import annotations

import pytest
from torch import nn

from torchfreeze import freeze_to, layer_groups


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Transformer(nn.Module):
    """Embeddings, a ModuleList of blocks under two wrappers, a final norm and a head."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(nn.init.zeros_(nn.Linear(4, 1).weight))
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Module()
        self.body.layers = nn.ModuleList([Block() for _ in range(blocks)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


class TiedLM(nn.Module):
    """A head tied to the embedding, and a head with one tied and one own parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(4, 10)
        self.out.weight = self.embed.weight  # the bias stays the head's own


class SingleBlockStages(nn.Module):
    """Stages of one block each: the block class is recognised because it repeats across stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 1)
        self.stem_bn = nn.BatchNorm1d(4)
        self.stage1 = nn.Sequential(Block())
        self.stage2 = nn.Sequential(Block())
        self.fc = nn.Linear(4, 2)


class Hinted(nn.Module):
    """One block only, named by Hugging Face's ``_no_split_modules``."""

    _no_split_modules = ("Block",)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block()])
        self.head = nn.Linear(4, 2)


CASES = [
    (
        "blocks-between-stem-and-tail",
        Transformer(),
        [["cls_token", "embed"], ["body.layers.0"], ["body.layers.1"], ["body.layers.2"], ["norm", "head"]],
    ),
    (
        "tied-module-moves-whole-or-by-parameter",
        TiedLM(),
        [["embed", "out.weight"], ["layers.0"], ["layers.1"], ["out.bias"]],
    ),
    ("single-block-stages", SingleBlockStages(), [["stem", "stem_bn"], ["stage1.0"], ["stage2.0"], ["fc"]]),
    ("no-split-modules-hint", Hinted(), [["embed"], ["layers.0"], ["head"]]),
    (
        "without-the-hint-one-block-is-not-a-sequence",
        nn.ModuleDict({"layers": nn.ModuleList([Block()])}),
        [["layers.0"]],
    ),
    (
        "plain-sequential-keeps-conv-and-norm-together",
        nn.Sequential(
            nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Linear(2, 2), nn.LayerNorm(2)
        ),
        [["0", "1"], ["3"], ["4", "5"]],
    ),
    ("norm-first-is-its-own-group", nn.Sequential(nn.LayerNorm(2), nn.Linear(2, 2)), [["0"], ["1"]]),
]


@pytest.mark.parametrize("model,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layer_groups(model: nn.Module, expected: list[list[str]]) -> None:
    assert layer_groups(model) == expected


def test_freeze_to_never_splits_a_tie() -> None:
    model = TiedLM()
    freeze_to(model, 1)  # no SharedParameterError: the tied weight is in the first group with its head
    assert not model.get_parameter("out.weight").requires_grad and model.get_parameter("out.bias").requires_grad
    assert model.get_parameter("layers.0.lin.weight").requires_grad


def test_layer_groups_rejects_a_non_module() -> None:
    from torchfreeze.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="layer_groups"):
        layer_groups("model")  # type: ignore[arg-type]


def test_a_frozen_wrapper_does_not_borrow_the_wrapped_models_own_groups() -> None:
    from torchfreeze import Frozen

    class Custom(nn.Sequential):
        def layer_groups(self) -> list[str]:
            return ["0", "1"]

    assert layer_groups(Custom(nn.Linear(2, 2), nn.Linear(2, 2))) == [["0"], ["1"]]
    assert layer_groups(Frozen(Custom(nn.Linear(2, 2), nn.Linear(2, 2)))) == [["module.0"], ["module.1"]]


def _stack() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))


def _compiled(model: nn.Module) -> nn.Module:
    import torch

    compiled: nn.Module = torch.compile(model)  # type: ignore[assignment]  # lazy: nothing compiles until a forward
    return compiled


WRAPPERS = [
    ("DataParallel", lambda m: nn.DataParallel(m)),
    ("torch.compile", _compiled),
    ("DataParallel-of-compiled", lambda m: nn.DataParallel(_compiled(m))),
]


@pytest.mark.parametrize("wrap", [c[1] for c in WRAPPERS], ids=[c[0] for c in WRAPPERS])
def test_layer_groups_and_freeze_to_see_through_wrappers(wrap) -> None:
    """Issue: layer_groups(DataParallel(m)) gave 'module.0', which the resolver (it unwraps) did not match."""
    plain, inner = _stack(), _stack()
    wrapped = wrap(inner)
    assert layer_groups(wrapped) == layer_groups(plain) == [["0"], ["1"], ["2"]]
    freeze_to(wrapped, 1)
    freeze_to(plain, 1)
    assert [p.requires_grad for p in inner.parameters()] == [p.requires_grad for p in plain.parameters()]
    assert [p.requires_grad for p in inner.parameters()] == [False, False, True, True, True, True]


@pytest.mark.parametrize("wrap", [c[1] for c in WRAPPERS], ids=[c[0] for c in WRAPPERS])
def test_gradual_unfreezing_default_groups_through_wrappers(wrap) -> None:
    import torch

    from torchfreeze import GradualUnfreezing

    inner = _stack()
    wrapped = wrap(inner)
    optimizer = torch.optim.SGD(list(inner.parameters()), lr=0.1)
    scheduler = GradualUnfreezing(wrapped, optimizer, "one_group_per_epoch")
    assert scheduler.groups == [["0"], ["1"], ["2"]]
    assert [p.requires_grad for p in inner.parameters()] == [False, False, False, False, True, True]
    scheduler.step()
    assert [p.requires_grad for p in inner.parameters()] == [False, False, True, True, True, True]


def test_a_wrapper_prefixed_group_is_refused_with_the_canonical_name() -> None:
    from torchfreeze.errors import SelectorError

    inner = _stack()
    with pytest.raises(SelectorError, match=r"freeze_to\(groups=.*Fix: pass '0'"):
        freeze_to(nn.DataParallel(inner), 1, groups=["module.0", "module.1"])
    assert all(p.requires_grad for p in inner.parameters())
