"""Trainable checkpoints under attack: hostile paths, concurrent writers, full disks, read-only directories."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _faults import deadline, leftovers, model, read_only

import torchfreeze as tf
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CheckpointError

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.parametrize("path", [None, 3, b"t.safetensors", ["t"]], ids=["None", "int", "bytes", "list"])
@pytest.mark.parametrize("verb", ["save_trainable", "load_trainable"])
def test_a_path_of_the_wrong_type_is_an_argument_type_error(verb: str, path: Any) -> None:
    with pytest.raises(ArgumentTypeError, match=rf"{verb}\(path="):
        getattr(tf, verb)(model(), path)


def test_the_empty_path_is_an_argument_error() -> None:
    with pytest.raises(ArgumentError, match="non-empty file path"):
        tf.save_trainable(model(), "")


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "t.safetensors"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(CheckpointError, match="FIFO"):
        tf.load_trainable(model(), fifo)


def test_dev_zero_is_refused_not_read() -> None:
    with deadline(10), pytest.raises(CheckpointError, match="character device"):
        tf.load_trainable(model(), "/dev/zero")


def test_a_symlink_to_a_checkpoint_is_followed(tmp_path: Path) -> None:  # a user's own link is fine
    path = tf.save_trainable(model(), tmp_path / "t.safetensors")
    (tmp_path / "link.safetensors").symlink_to(path)
    tf.load_trainable(model(), tmp_path / "link.safetensors")


def test_read_only_directory_is_a_checkpoint_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = tf.save_trainable(model(), tmp_path / "t.safetensors").read_bytes()
    trained = model()
    with torch.no_grad():
        trained[2].weight.add_(1)
    with read_only(tmp_path, monkeypatch), pytest.raises(CheckpointError, match="permission denied"):
        tf.save_trainable(trained, tmp_path / "t.safetensors")
    assert (tmp_path / "t.safetensors").read_bytes() == previous and leftovers(tmp_path) == []


def test_meta_device_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    with torch.device("meta"):
        meta = model()
    for verb in (tf.save_trainable, tf.load_trainable):
        with pytest.raises(ArgumentError, match="meta device"):
            verb(meta, tmp_path / "t.safetensors")
    assert leftovers(tmp_path) == [] and not (tmp_path / "t.safetensors").exists()


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.slow  # a child process imports torch
def test_full_disk_is_a_checkpoint_error_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk (EFBIG, errno 27), in a child process."""
    result = _run(f"""
        import resource, signal, torch, pathlib
        import torchfreeze as tf
        from torchfreeze.errors import CheckpointError
        d = pathlib.Path({str(tmp_path)!r})
        small = tf.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), "0")
        tf.save_trainable(small, d / "t.safetensors")
        big = tf.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 4096)), "0")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        try:
            tf.save_trainable(big, d / "t.safetensors")
        except CheckpointError as e:
            print("REFUSED", e)
        tf.load_trainable(small, d / "t.safetensors")  # the previous file is intact
        print("LOADED")
    """)
    assert "REFUSED" in result.stdout and "file-size limit is full" in result.stdout, result.stderr
    assert "LOADED" in result.stdout
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # a child process imports torch
def test_concurrent_truncating_writer_gives_a_library_error_at_worst(tmp_path: Path) -> None:
    """``cp``/``rsync --inplace`` rewrite the file in place while it loads: no SIGBUS, no raw error."""
    path = tf.save_trainable(model(width=64), tmp_path / "t.safetensors")
    result = _run(f"""
        import os, threading, time, torch
        import torchfreeze as tf
        from torchfreeze.errors import CheckpointError
        path = {str(path)!r}
        data = open(path, "rb").read()
        stop = time.monotonic() + 1.5
        def writer():
            while time.monotonic() < stop:
                with open(path, "r+b") as f:
                    f.truncate(len(data) // 3)
                    f.seek(0); f.write(data); f.flush()
        t = threading.Thread(target=writer); t.start()
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        tf.freeze(m, "0", mode="eval")
        outcomes = {{"ok": 0, "refused": 0}}
        while time.monotonic() < stop:
            try:
                tf.load_trainable(m, path); outcomes["ok"] += 1
            except CheckpointError:
                outcomes["refused"] += 1
        t.join()
        print("OUTCOMES", outcomes)
    """)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # -7 would be SIGBUS
    assert "OUTCOMES" in result.stdout


@pytest.mark.slow  # a child process imports torch
def test_loading_while_saving_never_reports_corruption(tmp_path: Path) -> None:
    path = tf.save_trainable(model(width=64), tmp_path / "t.safetensors")
    result = _run(f"""
        import threading, time, torch
        import torchfreeze as tf
        path = {str(path)!r}
        def build():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
            return tf.freeze(m, "0", mode="eval")
        saver, loader = build(), build()
        stop = time.monotonic() + 1.0
        def save():
            while time.monotonic() < stop:
                tf.save_trainable(saver, path)
        t = threading.Thread(target=save); t.start()
        n = 0
        while time.monotonic() < stop:
            tf.load_trainable(loader, path); n += 1
        t.join()
        print("LOADS", n)
    """)
    assert result.returncode == 0 and "LOADS" in result.stdout, result.stderr[-2000:]
    assert leftovers(tmp_path) == []


def test_guard_refuses_a_meta_device_model_and_watches_a_lazy_one() -> None:
    with torch.device("meta"):
        meta = model()
    with pytest.raises(ArgumentError, match="guard.*meta device"):
        tf.guard(meta)
    lazy = tf.freeze(torch.nn.Sequential(torch.nn.LazyLinear(2), torch.nn.Linear(2, 1)), "0")
    opt = torch.optim.SGD(lazy[1].parameters(), lr=0.1)
    with tf.guard(lazy, opt):  # the lazy weights materialise inside: no raw error
        lazy(torch.randn(3, 4)).sum().backward()
        opt.step()
