"""Real torchrun + gloo runs on CPU (2 processes): DDP with frozen parts, the wrap handle, FSDP2.

One torchrun launch runs several scenarios of ``_ddp_worker.py`` (each writes one JSON report per
rank); the tests assert on the reports. Bytes are exact (a DDP communication hook counts them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from _launch import torchrun

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

SCENARIOS = ("prepare", "handle", "fsdp", "dcp_ddp", "dcp_fsdp", "compiled", "misuse")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("torchrun")
    run = torchrun(out, *SCENARIOS)
    assert run.returncode == 0, f"torchrun failed:\n{run.output[-6000:]}"
    return {s: [json.loads((out / f"{s}.rank{r}.json").read_text()) for r in range(2)] for s in SCENARIOS}


def test_ddp_prepared_frozen_bit_identical_trainable_in_sync_and_only_trainable_bytes_reduced(
    reports: dict[str, list[dict[str, Any]]],
) -> None:
    for report in reports["prepare"]:
        assert report["world"] == 2
        assert report["frozen_unchanged"] == report["frozen"]
        assert sorted(report["frozen_same_across_ranks"]) == report["frozen"]
        assert len(report["frozen"]) == 11  # backbone: 2 + 5 (BatchNorm) + 2, adapter: 2
        assert "backbone.1.running_mean" in report["frozen"]
        assert report["adapter_requires_grad"] is False  # prepare_for_distributed
        assert report["trainable"] == ["pre.weight", "pre.bias", "head.weight", "head.bias"]
        assert report["trainable_same_across_ranks"] == report["trainable"]
        assert report["trainable_changed"] == report["trainable"]
        assert report["reduced_bytes"] == [report["trainable_bytes"]] * 3
        assert report["trainable_bytes"] < report["all_bytes"]


def test_gradual_unfreezing_through_the_wrap_handle_stays_in_sync(reports: dict[str, list[dict[str, Any]]]) -> None:
    for report in reports["handle"]:
        steps = report["steps"]
        assert [s["reduced"] for s in steps] == [s["trainable"] for s in steps]  # exact bytes, every step
        assert steps[0]["trainable"] < steps[2]["trainable"] < steps[4]["trainable"]  # two unfreezes
        assert report["rewraps"] == 2
        assert report["same_across_ranks"] == report["all"]  # replicas identical
        assert report["never_unfrozen_unchanged"] == report["never_unfrozen"]
        assert report["unfrozen_changed"] == report["unfrozen"]
        assert report["check"] == []


def test_fsdp2_guard_check_unfreeze_and_trainable_checkpoints(reports: dict[str, list[dict[str, Any]]]) -> None:
    for rank, report in enumerate(reports["fsdp"]):
        assert report["sharded"] == "DTensor"
        assert report["guard_checks"] == 4  # one per optimizer step, no error on DTensors
        # only the rank whose shard moved sees it
        assert report["guard_caught"] == (None if rank == 0 else {"stem.weight": pytest.approx(0.5)})
        assert report["check"] == []
        assert report["frozen_state"] == ["stem.weight", "stem.bias", "blocks.0.0.weight", "blocks.0.0.bias"]
        assert "1,251 parameters" in report["summary_total"]  # global counts, not a shard's
        assert report["frozen_unchanged"] == ["blocks.0.0.bias", "blocks.0.0.weight", "stem.bias", "stem.weight"]
        assert "blocks.1.0.weight" in report["changed"]  # unfrozen mid-run, then trained
        assert report["plain_loaded_equal"] == report["all"]  # gathered file -> unsharded model
        assert report["sharded_loaded_equal"] == report["all"]  # gathered file -> sharded model
        assert "ignored_params" in report["ignored_refused"] and report["ignored_still_frozen"]


@pytest.mark.parametrize("scenario", ["dcp_ddp", "dcp_fsdp"], ids=["ddp-wrap-handle", "fsdp2"])
def test_dcp_resume_after_mid_run_unfreezes_is_bit_identical(
    reports: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    for report in reports[scenario]:  # saved with ignore_frozen_params=True
        assert report["identical"] == report["all"]
        assert report["same_across_ranks"] == report["all"]


def test_compiled_model_under_the_wrap_handle_recompiles_once_per_unfreeze_and_stays_in_sync(
    reports: dict[str, list[dict[str, Any]]],
) -> None:
    for report in reports["compiled"]:
        steps = report["steps"]
        assert [s["compiles"] for s in steps] == [1, 1, 1, 2, 2, 2]  # blocks.3 unfrozen after step 3
        assert [s["reduced"] for s in steps] == [s["trainable"] for s in steps]
        assert report["rewraps"] == 1
        assert report["same_across_ranks"] == report["all"]
        assert len(report["frozen_unchanged"]) == 8  # stem, blocks.0-2: weight and bias
        assert "blocks.3.0.weight" in report["changed"] and "head.weight" in report["changed"]


def test_each_change_under_a_live_raw_ddp_is_refused_on_every_rank(reports: dict[str, list[dict[str, Any]]]) -> None:
    for report in reports["misuse"]:
        for name, message in report["refused"].items():
            assert "torchfreeze.distributed.wrap" in message, name
        assert "'blocks.3.0.weight'" in report["refused"]["unfreeze-inner"]  # names, not DDP's indices
        assert report["unchanged"]


def test_a_failing_rank_ends_the_run_instead_of_hanging(tmp_path: Path) -> None:
    run = torchrun(tmp_path, "fail", timeout=90)
    assert run.returncode != 0
    assert "exitcode" in run.output
