"""Canonical names: one primitive for outer wrappers (unwrap) and state-dict transparent wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchfreeze import Frozen, cache_features
from torchfreeze._core.canonical import (
    TRANSPARENT_CHILD,
    canonical_modules,
    canonical_parameter_names,
    make_state_dict_transparent,
)
from torchfreeze.errors import ArgumentError


class Hidden(nn.Module):
    state_dict_transparent_child = "inner"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        make_state_dict_transparent(self)


def _frozen_stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))


WRAPPED_CHILDREN = [
    ("Frozen", lambda m: Frozen(m), "module"),
    ("FeatureCache", lambda m: cache_features(m.requires_grad_(False).eval()), "module"),
    ("custom", lambda m: Hidden(m), "inner"),
]


@pytest.mark.parametrize("wrap,child", [c[1:] for c in WRAPPED_CHILDREN], ids=[c[0] for c in WRAPPED_CHILDREN])
def test_transparent_wrappers_share_one_primitive(wrap, child) -> None:
    """Frozen, FeatureCache and any class naming its child: state_dict keys and canonical names drop the level."""
    plain = nn.Sequential(nn.Linear(2, 2), _frozen_stack())
    wrapped = nn.Sequential(nn.Linear(2, 2), wrap(_frozen_stack()))
    assert getattr(type(wrapped[1]), TRANSPARENT_CHILD) == child
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    # round trip both ways, strict: every tensor bit-identical
    wrapped.load_state_dict(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(wrapped.state_dict().values(), plain.state_dict().values()))
    plain.load_state_dict(wrapped.state_dict())
    # keys with the child level (torchfreeze 0.2 checkpoints of Frozen) still load
    legacy = {k.replace("1.", f"1.{child}.", 1) if k.startswith("1.") else k: v for k, v in plain.state_dict().items()}
    wrapped.load_state_dict(legacy)
    canon = [c for _, c, _ in canonical_modules(wrapped)]
    assert sorted(set(canon)) == sorted(n for n, _ in plain.named_modules())
    assert sorted(n for names in canonical_parameter_names(wrapped).values() for n in names) == sorted(
        n for n, _ in plain.named_parameters()
    )


OUTER = [
    ("DataParallel", nn.DataParallel),
    ("torch.compile", torch.compile),
]


@pytest.mark.parametrize("wrap", [c[1] for c in OUTER], ids=[c[0] for c in OUTER])
def test_canonical_names_see_through_outer_wrappers(wrap) -> None:
    inner = nn.Sequential(nn.Linear(2, 2), Frozen(nn.Linear(2, 1)))
    wrapped = wrap(inner)
    assert canonical_modules(wrapped) == canonical_modules(inner)
    assert canonical_parameter_names(wrapped)[id(inner[1].module.weight)] == ["1.weight"]


def test_a_class_without_the_attribute_is_refused() -> None:
    with pytest.raises(ArgumentError, match="state_dict_transparent_child"):
        make_state_dict_transparent(nn.Linear(1, 1))
