"""Tests of SlabStore: rows in preallocated slabs, looked up by key, within a byte budget (oldest out first)."""

from __future__ import annotations

import pytest
import torch

from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.speed.slabs import SlabStore


def keys(*ids: int) -> list[bytes]:
    return [i.to_bytes(16, "little") for i in ids]


def rows(*ids: int, width: int = 3) -> list[torch.Tensor]:
    """Two leaves per row: a float row [i, i, i] and an int64 row [i, -i]."""
    x = torch.tensor(ids, dtype=torch.float32)
    return [x[:, None].expand(-1, width).contiguous(), torch.stack([x, -x], 1).long()]


def test_insert_lookup_gather_round_trip() -> None:
    store = SlabStore(max_bytes=1 << 20)
    assert store.insert(keys(1, 2, 3), rows(1, 2, 3)) == 3
    slots = store.lookup(keys(3, 9, 1))
    assert slots.dtype == torch.int64 and slots[1].item() == -1
    got = store.gather(slots[slots >= 0])
    expected = rows(3, 1)
    assert all(torch.equal(g, e) and g.dtype == e.dtype for g, e in zip(got, expected))
    assert len(store) == 3 and keys(2)[0] in store and keys(9)[0] not in store


def test_gathered_rows_do_not_share_memory_with_the_slabs() -> None:
    store = SlabStore(max_bytes=1 << 20)
    store.insert(keys(1), rows(1))
    out = store.gather(store.lookup(keys(1)))
    out[0].fill_(99.0)
    assert torch.equal(store.gather(store.lookup(keys(1)))[0], rows(1)[0])


def test_inserted_rows_are_copied_not_aliased() -> None:
    store = SlabStore(max_bytes=1 << 20)
    leaves = rows(5)
    store.insert(keys(5), leaves)
    leaves[0].fill_(0.0)
    assert store.gather(store.lookup(keys(5)))[0].tolist() == [[5.0, 5.0, 5.0]]


def test_growth_keeps_earlier_rows() -> None:
    store = SlabStore(max_bytes=1 << 20)
    row_bytes = 3 * 4 + 2 * 8
    store.insert(keys(0, 1), rows(0, 1))
    assert store.nbytes == 2 * row_bytes  # the first batch allocates exactly its rows
    for i in range(2, 40, 3):
        store.insert(keys(i, i + 1, i + 2), rows(i, i + 1, i + 2))
    assert len(store) == 41
    every = list(range(41))
    got = store.gather(store.lookup(keys(*every)))
    assert all(torch.equal(g, e) for g, e in zip(got, rows(*every)))
    assert store.nbytes >= 41 * row_bytes


def test_budget_is_kept_and_the_oldest_rows_go_first() -> None:
    row_bytes = 3 * 4 + 2 * 8
    store = SlabStore(max_bytes=10 * row_bytes + 5)
    for start in range(0, 30, 5):
        ids = list(range(start, start + 5))
        store.insert(keys(*ids), rows(*ids))
        assert store.nbytes <= store.max_bytes
    assert len(store) == 10 and store.evictions == 20
    assert store.lookup(keys(*range(20))).eq(-1).all()
    got = store.gather(store.lookup(keys(*range(20, 30))))
    assert torch.equal(got[0], rows(*range(20, 30))[0])


def test_a_batch_larger_than_the_budget_keeps_its_last_rows() -> None:
    row_bytes = 3 * 4 + 2 * 8
    store = SlabStore(max_bytes=4 * row_bytes)
    assert store.insert(keys(*range(10)), rows(*range(10))) == 4
    assert store.lookup(keys(*range(10))).tolist() == [-1] * 6 + [0, 1, 2, 3]
    assert store.evictions == 6 and store.gather(store.lookup(keys(9)))[1].tolist() == [[9, -9]]


def test_a_budget_below_one_row_stores_nothing() -> None:
    store = SlabStore(max_bytes=10)
    assert store.insert(keys(1, 2), rows(1, 2)) == 0
    assert len(store) == 0 and store.nbytes == 0 and store.skipped == 2


def test_present_and_repeated_keys_are_overwritten_in_place() -> None:
    store = SlabStore(max_bytes=1 << 20)
    store.insert(keys(1, 2), rows(1, 2))
    slot = store.lookup(keys(2)).item()
    store.insert(keys(2, 7, 7), rows(20, 70, 71))  # key 2 rewritten; key 7 twice: the last row wins
    assert store.lookup(keys(2)).item() == slot and len(store) == 3
    got = store.gather(store.lookup(keys(2, 7)))
    assert got[0][:, 0].tolist() == [20.0, 71.0]


def test_clear_drops_rows_and_memory() -> None:
    store = SlabStore(max_bytes=1 << 20)
    store.insert(keys(1, 2), rows(1, 2))
    store.clear()
    assert len(store) == 0 and store.nbytes == 0 and store.lookup(keys(1)).item() == -1
    store.insert(keys(3), rows(3))
    assert store.gather(store.lookup(keys(3)))[0].tolist() == [[3.0, 3.0, 3.0]]


def test_gather_to_a_device_and_dtype_kept() -> None:
    store = SlabStore(max_bytes=1 << 20)
    store.insert(keys(1), [torch.ones(1, 2, dtype=torch.bfloat16)])
    (out,) = store.gather(store.lookup(keys(1)), "cpu")
    assert out.dtype == torch.bfloat16 and out.device.type == "cpu" and store.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("leaves", "match"),
    [
        pytest.param([torch.ones(2, 4), torch.ones(2, 2, dtype=torch.long)], "another layout", id="row-shape"),
        pytest.param([torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 2).long()], "another layout", id="dtype"),
        pytest.param([torch.ones(2, 3)], "another layout", id="leaf-count"),
        pytest.param([torch.ones(3, 3), torch.ones(3, 2).long()], "2 rows", id="row-count"),
        pytest.param([], "2 rows", id="no-leaves"),
    ],
)
def test_rows_of_another_layout_are_refused_and_nothing_changes(leaves: list[torch.Tensor], match: str) -> None:
    store = SlabStore(max_bytes=1 << 20)
    store.insert(keys(1), rows(1))
    if match == "another layout":
        assert not store.accepts(leaves)
    with pytest.raises(ArgumentError, match=match):
        store.insert(keys(5, 6), leaves)
    assert len(store) == 1 and store.lookup(keys(5, 6)).eq(-1).all()


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        pytest.param(-1, ArgumentError, id="negative"),
        pytest.param(1.5, ArgumentTypeError, id="float"),
        pytest.param("1", ArgumentTypeError, id="string"),
    ],
)
def test_bad_budget(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^SlabStore\(max_bytes=.*Fix: "):
        SlabStore(max_bytes=bad)  # type: ignore[arg-type]


def test_gather_on_an_empty_store_is_an_error() -> None:
    with pytest.raises(ArgumentError, match="empty"):
        SlabStore(max_bytes=100).gather(torch.tensor([0]))
