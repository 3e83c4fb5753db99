"""A real torchrun + gloo run on CPU: frozen tensors stay bit-identical under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

WORKER = Path(__file__).with_name("_ddp_worker.py")


def test_ddp_two_processes_frozen_bit_identical_and_trainable_in_sync(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        str(WORKER), str(tmp_path),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:  # pragma: no cover - a hang is a failure, with its output
        pytest.fail(f"torchrun did not finish in 180 s:\n{e.stdout!r}\n{e.stderr!r}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["world"] == 2
        assert report["frozen_unchanged"] == report["frozen"]
        assert report["frozen_same_across_ranks"] == report["frozen"]
        assert "adapter.module.weight" in report["frozen"] and "backbone.1.running_mean" in report["frozen"]
        assert report["adapter_requires_grad"] is False  # prepare_for_distributed
        assert report["trainable"] == ["pre.weight", "pre.bias", "head.weight", "head.bias"]
        assert report["trainable_same_across_ranks"] == report["trainable"]
        assert report["trainable_changed"] == report["trainable"]
