"""Tests of the cache's storage: the in-memory LRU budget, the disk directory, pickling, workers, stats."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from _cache_models import frozen_mlp
from torch.utils.data import DataLoader, Dataset

from torchfreeze.speed import FeatureCache, cache_features


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


def test_clear_disk(tmp_path: Path) -> None:
    cached = cache_features(frozen_mlp(), directory=tmp_path)
    cached(torch.randn(3, 6))
    cached.clear(disk=True)
    assert cached.stats().entries == 0 and not list(tmp_path.glob("*/*.tfc"))


def test_clear_after_an_untracked_data_write_never_returns_old_disk_entries(tmp_path: Path) -> None:
    inner = frozen_mlp()
    cached = cache_features(inner, directory=tmp_path)
    x = torch.randn(3, 6)
    before = cached(x)
    inner[3].bias.data.add_(1.0)  # through .data: the version counter does not move
    cached.clear()  # the documented remedy
    torch.testing.assert_close(cached(x), before + 1.0)
    assert cached.stats().hits == 0


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


def test_stats_str_and_dict() -> None:
    cached = cache_features(frozen_mlp())
    x = torch.randn(2, 6)
    cached(x)
    cached(x)
    s = cached.stats()
    assert s.hit_rate == 0.5 and "hits=2 misses=2" in str(s)
    assert s.to_dict()["bytes"] == 2 * 4 * 4


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


def test_a_batch_seen_again_after_its_rows_were_evicted_is_recomputed_correctly() -> None:
    inner = frozen_mlp()
    cached = cache_features(inner, max_bytes=8 * 4 * 4)  # 8 rows
    a, b, c = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    cached(a)
    cached(a)  # the whole batch is remembered
    cached(b)
    cached(c)  # a's rows are overwritten by c's
    torch.testing.assert_close(cached(a), inner(a))
    torch.testing.assert_close(cached(a), inner(a))
    torch.testing.assert_close(cached(c), inner(c))
    s = cached.stats()
    assert (s.hits, s.misses) == (4 + 4 + 4, 4 * 4)


def test_a_batch_of_the_same_rows_in_another_order_is_not_mistaken_for_it() -> None:
    inner = frozen_mlp()
    cached = cache_features(inner)
    x = torch.randn(5, 6)
    cached(x)
    cached(x)
    flipped = x.flip(0)
    torch.testing.assert_close(cached(flipped), inner(flipped))
    assert cached.stats().misses == 5


def test_the_whole_batch_hash_is_skipped_in_the_first_epoch_and_dropped_for_shuffled_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchfreeze.speed import _rows as cache_module

    calls = []
    real = cache_module.batch_key
    monkeypatch.setattr(cache_module, "batch_key", lambda *a, **k: calls.append(1) or real(*a, **k))
    inner = frozen_mlp()
    cached = cache_features(inner)
    data = torch.randn(64, 6)
    fixed = list(data.split(4))
    for b in fixed:  # first epoch: all misses, no whole-batch hash
        cached(b)
    assert calls == []
    for _ in range(2):  # the same batches again: remembered, then served whole
        for b in fixed:
            torch.testing.assert_close(cached(b), inner(b))
    assert 0 < len(calls) <= 2 * len(fixed)
    calls.clear()
    for _ in range(25):  # reshuffled every epoch: 400 new batches whose rows all hit
        for idx in torch.randperm(64).split(4):
            torch.testing.assert_close(cached(data[idx]), inner(data[idx]))
    assert 256 <= len(calls) < 400  # tried for 256 missed batches (plus 8 per hit before), then dropped
    calls.clear()
    for idx in torch.randperm(64).split(4):
        cached(data[idx])
    assert calls == [] and cached.stats().misses == 64


def test_a_batch_mixing_memory_disk_and_new_rows_is_assembled_in_order(tmp_path: Path) -> None:
    inner = frozen_mlp()
    a, b, c = torch.randn(3, 6), torch.randn(2, 6), torch.randn(2, 6)
    cache_features(inner, directory=tmp_path)(b)  # b's rows only on disk
    cached = cache_features(inner, directory=tmp_path)
    cached(a)  # a's rows in memory (and on disk)
    mixed = torch.cat([c[:1], b[1:], a[2:], b[:1], a[:1], c[1:]])
    torch.testing.assert_close(cached(mixed), inner(mixed))
    s = cached.stats()
    assert (s.memory_hits, s.disk_hits, s.misses) == (2, 2, 3 + 2)
    torch.testing.assert_close(cached(mixed), inner(mixed))  # now all of it from memory
    assert cached.stats().memory_hits == 2 + 6
