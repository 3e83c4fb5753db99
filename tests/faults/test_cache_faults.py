"""The feature-cache directory as untrusted input: planted entries, FIFOs, symlinks, disk faults."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _faults import deadline, leftovers, read_only
from torch import nn

from torchfreeze.errors import ArgumentError
from torchfreeze.speed import cache_features

SRC = str(Path(__file__).resolve().parents[2] / "src")


def frozen() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.LeakyReLU(0.1)).requires_grad_(False).eval()


def one_entry(tmp_path: Path) -> tuple[nn.Module, torch.Tensor, Path]:
    inner, x = frozen(), torch.randn(1, 6)
    cache_features(inner, directory=tmp_path)(x)
    (path,) = tmp_path.glob("*/*.tfc")
    return inner, x, path


def test_secret_is_private_and_entries_are_authenticated(tmp_path: Path) -> None:
    inner, x, path = one_entry(tmp_path)
    assert stat.S_IMODE((tmp_path / ".tfc-secret").stat().st_mode) == 0o600
    raw = bytearray(path.read_bytes())
    # an attacker without the secret rewrites the entry under its real key, with a valid unkeyed checksum
    raw[-40] ^= 0xFF
    raw[-32:] = hashlib.sha256(bytes(raw[:-32])).digest()
    path.write_bytes(bytes(raw))
    again = cache_features(inner, directory=tmp_path)
    torch.testing.assert_close(again(x), inner(x))
    assert again.stats().corrupt == 1 and again.stats().disk_hits == 0


def test_a_secret_that_others_can_read_disables_the_directory(tmp_path: Path) -> None:
    inner, x, _ = one_entry(tmp_path)
    os.chmod(tmp_path / ".tfc-secret", 0o644)
    again = cache_features(inner, directory=tmp_path)
    torch.testing.assert_close(again(x), inner(x))
    assert again.stats().disk_hits == 0 and again.stats().corrupt == 1


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-link", "directory"])
def test_an_entry_that_is_not_a_regular_file_is_a_miss(tmp_path: Path, kind: str) -> None:
    inner, x, path = one_entry(tmp_path)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero-link":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    again = cache_features(inner, directory=tmp_path)
    with deadline(10):
        out = again(x)
    torch.testing.assert_close(out, inner(x))
    assert again.stats().corrupt == 1 and again.stats().misses == 1


def test_clear_never_leaves_the_directory(tmp_path: Path) -> None:
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.tfc").write_bytes(b"keep me")
    inner, x = frozen(), torch.randn(2, 6)
    cached = cache_features(inner, directory=cache_dir)
    cached(x)
    (cache_dir / "ab").symlink_to(outside, target_is_directory=True)
    cached.clear(disk=True)
    assert (outside / "precious.tfc").read_bytes() == b"keep me"
    assert [p for p in cache_dir.glob("*/*.tfc") if not p.parent.is_symlink()] == []  # its own entries went


def test_read_only_directory_skips_the_write_and_returns_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner, x = frozen(), torch.randn(3, 6)
    cached = cache_features(inner, directory=tmp_path)
    with read_only(tmp_path, monkeypatch):
        out = cached(x)
    torch.testing.assert_close(out, inner(x))
    assert cached.stats().write_errors == 3 and cached.stats().disk_writes == 0
    assert leftovers(tmp_path) == []


def test_full_disk_skips_the_write_and_returns_the_output(tmp_path: Path) -> None:
    code = f"""
        import resource, signal, torch
        from torchfreeze.speed import cache_features
        inner = torch.nn.Linear(512, 512).requires_grad_(False).eval()
        cached = cache_features(inner, directory={str(tmp_path)!r}, granularity="batch")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        x = torch.randn(8, 512)
        out = cached(x)
        print("SAME", torch.equal(out, inner(x)), "ERRORS", cached.stats().write_errors)
    """
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )
    assert "SAME True ERRORS 1" in result.stdout, result.stderr[-2000:]
    assert not list(tmp_path.glob("*/*.tfc")) and leftovers(tmp_path) == []


def test_a_hyperparameter_change_is_noticed_in_memory_and_on_disk(tmp_path: Path) -> None:
    inner, x = frozen(), -torch.ones(2, 6) * 10
    cached = cache_features(inner, directory=tmp_path)
    before = cached(x)
    inner[1].negative_slope = 0.3
    after = cached(x)
    torch.testing.assert_close(after, inner(x))
    assert not torch.equal(before, after)
    fresh = cache_features(inner, directory=tmp_path)  # another process: the fingerprint differs too
    torch.testing.assert_close(fresh(x), inner(x))


def test_the_empty_directory_is_refused() -> None:
    with pytest.raises(ArgumentError, match="directory=''"):
        cache_features(frozen(), directory="")
