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
    assert "frozen backbone" in lines[0] and "full fine-tuning" in lines[0]
    assert any(line.startswith("trainable parameters") and "93,541" in line for line in lines)
    assert any(line.startswith("training overhead (peak - built)") and "17 MiB" in line for line in lines)
