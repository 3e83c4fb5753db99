"""The bench's harness (torchfreeze.cli.bench.timing): torch.utils.benchmark Measurements as figures."""

from __future__ import annotations

import pytest

from torchfreeze.cli.bench.timing import figure, from_samples, merged, one_shot, paired_ratio, per_call, ratio, rounds


def test_figure_is_median_iqr_and_range_of_the_times() -> None:
    f = figure(from_samples("v", [4.0, 1.0, 3.0, 2.0]))
    assert (f["median"], f["q1"], f["q3"], f["min"], f["max"], f["n"]) == (2.5, 1.75, 3.25, 1.0, 4.0, 4)
    assert f["unit"] == "s" and "IQR" in f["spread"] and "4 repetitions" in f["spread"]


def test_ratio_spread_comes_from_both_iqrs() -> None:
    a = figure(from_samples("a", [2.0, 4.0, 6.0]))
    b = figure(from_samples("b", [1.0, 2.0, 3.0]))
    r = ratio(a, b)
    assert r["median"] == 2.0 and r["unit"] == "x"
    assert r["q1"] == a["q1"] / b["q3"] and r["q3"] == a["q3"] / b["q1"]
    assert r["q1"] <= r["median"] <= r["q3"]


def test_rounds_rotate_the_order_and_merge_each_variant() -> None:
    calls: list[str] = []

    def variant(name: str):  # type: ignore[no-untyped-def]
        def go() -> object:
            calls.append(name)
            return from_samples(name, [float(len(calls))], label="L")

        return go

    out = rounds({"a": variant("a"), "b": variant("b"), "c": variant("c")}, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: sorted(m.times) for k, m in out.items()} == {
        "a": [1.0, 6.0, 8.0],
        "b": [2.0, 4.0, 9.0],
        "c": [3.0, 5.0, 7.0],
    }


def test_per_call_runs_the_statement_and_keeps_labels() -> None:
    count = [0]

    def fn() -> None:
        count[0] += 1

    m = per_call(fn, label="L", sub_label="v", description="d", min_run_time=0.001)
    assert count[0] >= 2 and m.times and all(t > 0 for t in m.times)
    assert (m.task_spec.label, m.task_spec.sub_label, m.task_spec.description) == ("L", "v", "d")


def test_one_shot_runs_each_call_on_a_fresh_state() -> None:
    states: list[list[int]] = []

    def fresh() -> list[int]:
        states.append([])
        return states[-1]

    def run(state: list[int]) -> None:
        state.append(1)

    m = one_shot(run, fresh, label="L", sub_label="v", description="d")
    assert len(m.times) == 1
    assert all(len(s) <= 1 for s in states)  # no state ran twice (timeit's warm-up included)
    assert sum(len(s) for s in states) == 3  # two warm-up calls and the measured one


def test_merged_refuses_rounds_of_different_variants() -> None:
    with pytest.raises(RuntimeError, match="task specs"):
        merged([from_samples("a", [1.0]), from_samples("b", [1.0])])


def test_paired_ratio_pairs_rounds_and_refuses_unequal_lengths() -> None:
    r = paired_ratio([2.0, 9.0, 3.0, 4.0], [1.0, 3.0, 1.0, 4.0])
    assert (r["median"], r["min"], r["max"], r["n"]) == (2.5, 1.0, 3.0, 4)
    assert r["unit"] == "x" and "per-round ratios" in r["spread"]
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])
