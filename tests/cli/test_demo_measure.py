"""Phase 4 of the demo (torchfreeze.cli.demo_measure): the frozen-vs-full table."""

from __future__ import annotations

from torchfreeze.cli.demo_measure import comparison_table

RUN = {
    "trainable_parameters": 645,
    "step_ms_best": 2.8,
    "step_ms_median": 7.0,
    "peak_rss_mb": 393.0,
    "rss_after_build_mb": 376.0,
}


def test_comparison_table_plain_text() -> None:
    full = {**RUN, "trainable_parameters": 93541, "step_ms_best": 8.4}
    text = str(comparison_table(RUN, full))
    lines = text.splitlines()
    assert "torchfreeze" in lines[0] and "full fine-tuning" in lines[0]
    assert any(line.startswith("trainable parameters") and "93,541" in line for line in lines)
    assert any(line.startswith("training overhead (peak - built)") and "17 MiB" in line for line in lines)


def test_comparison_table_with_plain_freezing_has_three_columns() -> None:
    full = {**RUN, "trainable_parameters": 93541, "step_ms_best": 8.4}
    plain = {**RUN, "step_ms_best": 3.1}
    lines = str(comparison_table(RUN, full, plain)).splitlines()
    header = lines[0]
    assert header.index("torchfreeze") < header.index("plain freezing") < header.index("full fine-tuning")
    assert any(line.startswith("time per step, best") and "3.1 ms" in line and "8.4 ms" in line for line in lines)
