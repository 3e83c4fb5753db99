"""Run a worker under ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU), bounded in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
WORKER = HERE / "_ddp_worker.py"


@dataclass
class Run:
    returncode: int
    output: str


def torchrun(out_dir: Path, *scenarios: str, timeout: float = 150.0) -> Run:
    """Launch the worker on 2 processes; on timeout kill the whole process group (no stray ranks)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        str(WORKER), str(out_dir), *scenarios,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TimeoutError(f"torchrun did not finish in {timeout:.0f} s:\n{output[-4000:]}") from None
    return Run(proc.returncode, output)
