"""Weight sources under attack: package sources that climb out, imports on lookup, FIFOs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _faults import deadline

from torchfreeze.errors import WeightsError
from torchfreeze.hub.weights import Weights

SRC = str(Path(__file__).resolve().parents[2] / "src")
ZERO = "0" * 64


@pytest.mark.parametrize(
    "source",
    ["torchfreeze:../../../etc/passwd", "torchfreeze:hub/../../../../etc/passwd", "torchfreeze:./hub/x"],
    ids=["dotdot", "inner-dotdot", "dot"],
)
def test_a_package_source_cannot_leave_the_package(source: str) -> None:
    with pytest.raises(WeightsError, match="not allowed in a package source") as info:
        Weights("w", source, ZERO).read_bytes()
    assert "sha256" not in str(info.value)  # nothing of the outside file is revealed


def test_a_symlink_out_of_the_package_is_refused(tmp_path: Path) -> None:
    package = tmp_path / "leaky_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "w.safetensors").symlink_to("/etc/hostname")
    code = f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from torchfreeze.hub.weights import Weights
        from torchfreeze.errors import WeightsError
        try:
            Weights("w", "leaky_pkg:w.safetensors", "0" * 64).read_bytes()
        except WeightsError as e:
            print("REFUSED", "outside the package" in str(e), "leaky_pkg" in sys.modules)
    """
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )
    assert "REFUSED True False" in result.stdout, result.stderr[-2000:]


def test_locating_a_dotted_package_imports_nothing() -> None:
    code = """
        import sys
        from torchfreeze.hub.weights import Weights
        from torchfreeze.errors import WeightsError
        try:
            Weights("w", "this.sub:w.safetensors", "0" * 64).read_bytes()
        except WeightsError:
            pass
        print("IMPORTED", "this" in sys.modules)
    """
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )
    assert "IMPORTED False" in result.stdout, result.stderr[-2000:]


def test_from_json_on_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "w.json"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(WeightsError, match="FIFO"):
        Weights.from_json(fifo)


def test_weights_on_dev_zero_are_refused_not_read() -> None:
    with deadline(10), pytest.raises(WeightsError, match="character device"):
        Weights("w", "/dev/zero", ZERO).read_bytes()
