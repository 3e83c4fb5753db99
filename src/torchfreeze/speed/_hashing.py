"""Content keys of tensor rows: xxh3-128, SHA-256 or a vectorised torch hash (see :func:`row_keys_fast`).

:mod:`torchfreeze.speed.keys` re-exports :func:`row_keys_fast` and :func:`batch_key`;
the feature cache and the prefix cache key their rows with them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from torchfreeze._core.fingerprint import tensor_bytes
from torchfreeze.errors import ArgumentError

__all__ = ["row_keys_fast", "batch_key", "check_dense", "HAVE_XXHASH"]


def check_dense(t: Tensor) -> Tensor:
    """``t`` itself when it is a dense (strided) tensor; else :class:`ArgumentError`."""
    if t.layout != torch.strided:
        raise ArgumentError(
            f"cache_features: cannot hash a tensor with layout {t.layout}; expected a dense "
            "(strided) tensor. Convert it with .to_dense() before the cached module."
        )
    return t


_xxhash: Any
try:  # the optional fast-hashing extra: ``pip install torchfreeze[fast]``
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None

HAVE_XXHASH = _xxhash is not None
_MASK64 = (1 << 64) - 1
_SEEDS: dict[tuple[Any, ...], tuple[int, int]] = {}


def _seeds(salt: bytes, tensors: Sequence[Tensor]) -> tuple[int, int]:
    """Two 64-bit integers from ``salt`` plus each tensor's dtype and row shape (memoised)."""
    layout = (salt, *[(t.dtype, t.shape[1:]) for t in tensors])
    seeds = _SEEDS.get(layout)
    if seeds is None:
        header = salt + "|".join(f"{t.dtype}:{tuple(t.shape[1:])}" for t in tensors).encode()
        d = hashlib.blake2b(header, digest_size=16, person=b"tfc-rows").digest()
        seeds = (int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little"))
        if len(_SEEDS) > 4096:
            _SEEDS.clear()
        _SEEDS[layout] = seeds
    return seeds


def batch_key(tensors: Sequence[Tensor], *, salt: bytes) -> bytes:
    """One 16-byte content key for whole tensors (all their bytes, dtypes and shapes, and ``salt``).

    One xxh3-128 pass over each buffer on the CPU with ``xxhash``; else :func:`row_keys_fast`
    over each tensor flattened to one row.

    >>> batch_key([torch.ones(2, 3)], salt=b"") == batch_key([torch.ones(3, 2)], salt=b"")
    False
    """
    if _xxhash is not None and all(t.device.type == "cpu" for t in tensors):
        whole = (b"whole", salt, *[(t.dtype, t.shape) for t in tensors])
        seeds = _SEEDS.get(whole)
        if seeds is None:
            seeds = _SEEDS[whole] = _seeds(salt + repr(whole[2:]).encode(), ())
        seed = seeds[0]
        if len(tensors) == 1:
            return bytes(_xxhash.xxh3_128_digest(_bytes(check_dense(tensors[0])), seed))
        h = _xxhash.xxh3_128(seed=seed)
        for t in tensors:
            h.update(_bytes(check_dense(t)))
        return bytes(h.digest())
    shapes = repr([(t.dtype, tuple(t.shape)) for t in tensors]).encode()
    return row_keys_fast([t.reshape(1, -1) for t in tensors], 1, salt=salt + shapes)[0]


Method = Literal["auto", "xxhash", "sha256", "torch"]


def row_keys_fast(tensors: Sequence[Tensor], n: int, *, salt: bytes, method: Method = "auto") -> list[bytes]:
    """One 16-byte content key per row: row ``r`` of every tensor, its dtype and row shape, and ``salt``.

    On the CPU, with the optional ``xxhash`` package, each row of the contiguous buffer
    is hashed with xxh3-128 (tens of GB/s; one call per row, no copy of a contiguous
    input); without it, with SHA-256 per row (hardware-accelerated on current CPUs),
    truncated to 128 bits: measured on a 64 x 2 KiB batch, xxh3 26 us, SHA-256 184 us,
    the torch hash below 519 us. Tensors on an accelerator always use a vectorised
    128-bit hash in torch operations on the tensor's own device (two independent
    64-bit lanes: every 8-byte word mixed with its position by a splitmix64/murmur3
    finaliser, summed per row), so a CUDA input is never copied to the host; only the
    ``n`` keys (16 bytes each) are. xxh3 and the torch hash are not cryptographic: keys
    are unique in practice (a collision needs about 2**64 rows), not against an
    adversary choosing inputs. Each method gives its own keys for the same rows.

    Args:
        tensors: dense tensors sharing the leading dimension ``n`` (rows).
        n: the number of rows.
        salt: bytes mixed into every key (what else the key depends on).
        method: ``"auto"`` (on the CPU xxhash when installed, else SHA-256; the torch hash
            elsewhere), or one of ``"xxhash"``, ``"sha256"`` (CPU tensors) and ``"torch"``.

    Returns:
        ``n`` keys of 16 bytes; equal rows (same bytes, dtypes, row shapes, salt) give equal
        keys wherever they sit in whichever batch.

    Raises:
        ArgumentError: a sparse tensor, a tensor without ``n`` rows, or ``method="xxhash"``
            without the package, or ``"xxhash"``/``"sha256"`` on a non-CPU tensor.

    >>> x = torch.arange(12.0).reshape(3, 4)
    >>> k = row_keys_fast([x], 3, salt=b"s")
    >>> len(k), len(k[0]), k[1] == row_keys_fast([x[1:2]], 1, salt=b"s")[0], k[0] == k[1]
    (3, 16, True, False)
    """
    for t in tensors:
        check_dense(t)
        if t.dim() == 0 or t.shape[0] != n:
            raise ArgumentError(
                f"row_keys_fast: every tensor needs {n} rows in dim 0; got shape {tuple(t.shape)}. "
                "Fix: pass tensors that share the batch dimension."
            )
    if n == 0:
        return []
    seed_a, seed_b = _seeds(salt, tensors)
    cpu = all(t.device.type == "cpu" for t in tensors)
    if method == "auto":
        method = "torch" if not cpu else "xxhash" if _xxhash is not None else "sha256"
    if method == "torch":
        return _torch_rows(tensors, n, seed_a, seed_b)
    if (method == "xxhash" and _xxhash is None) or not cpu:
        raise ArgumentError(
            f"row_keys_fast(method={method!r}): needs CPU tensors"
            + (" and the xxhash package" if method == "xxhash" else "")
            + ". Fix: pip install 'torchfreeze[fast]', or use method='auto'."
        )
    if method == "sha256":
        return _sha256_rows(tensors, n, seed_a.to_bytes(8, "little") + seed_b.to_bytes(8, "little"))
    return _xxhash_rows(tensors, n, seed_a)


def _bytes(t: Tensor) -> memoryview:
    """The bytes of a CPU tensor: through numpy when it can (a microsecond), else :func:`tensor_bytes`."""
    if t.is_contiguous() and not t.requires_grad:
        try:
            return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]
        except (RuntimeError, TypeError, ValueError):  # no numpy, bfloat16, a conjugate or negative view
            pass
    return tensor_bytes(t)


_SLICES: dict[tuple[int, int], list[slice]] = {}


def _slices(rb: int, n: int) -> list[slice]:
    got = _SLICES.get((rb, n))
    if got is None:
        if len(_SLICES) > 256:
            _SLICES.clear()
        got = _SLICES[(rb, n)] = [slice(i, i + rb) for i in range(0, rb * n, rb)]
    return got


def _sha256_rows(tensors: Sequence[Tensor], n: int, seed: bytes) -> list[bytes]:
    views = [_bytes(t) for t in tensors]
    views = [mv if mv.ndim == 1 and mv.format == "B" else memoryview(bytes(mv)) for mv in views]
    slices = [_slices(mv.nbytes // n, n) for mv in views]
    start = hashlib.sha256(b"tfc-rows-sha256|" + seed)
    keys = []
    for r in range(n):
        h = start.copy()
        for mv, rows in zip(views, slices, strict=True):
            h.update(mv[rows[r]])
        keys.append(h.digest()[:16])
    return keys


def _xxhash_rows(tensors: Sequence[Tensor], n: int, seed: int) -> list[bytes]:
    assert _xxhash is not None  # checked by the caller
    views = [_bytes(t) for t in tensors]
    if len(views) == 1:
        mv = views[0]
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B") if mv.c_contiguous else memoryview(bytes(mv))
        rows = map(mv.__getitem__, _slices(mv.nbytes // n, n))
        return list(map(_xxhash.xxh3_128_digest, rows, itertools.repeat(seed, n)))
    rbs = [mv.nbytes // n for mv in views]
    keys = []
    for r in range(n):
        h = _xxhash.xxh3_128(seed=seed)
        for mv, rb in zip(views, rbs, strict=True):
            h.update(mv[r * rb : (r + 1) * rb])
        keys.append(h.digest())
    return keys


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)  # splitmix64
_M3, _M4 = _signed(0xFF51AFD7ED558CCD), _signed(0xC4CEB9FE1A85EC53)  # murmur3 fmix64
_GOLDEN, _ODD = _signed(0x9E3779B97F4A7C15), _signed(0xD6E8FEB86659FD93)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 words."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix(z: Tensor) -> Tensor:
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _fmix(z: Tensor) -> Tensor:
    z = (z ^ _shr(z, 33)) * _M3
    z = (z ^ _shr(z, 33)) * _M4
    return z ^ _shr(z, 33)


def _words(t: Tensor, n: int) -> Tensor:
    """The rows of ``t`` as int64 words (zero-padded to 8 bytes; the row length is in the seeds)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    raw = t.view(torch.uint8).reshape(n, -1) if t.numel() else torch.zeros(n, 0, dtype=torch.uint8, device=t.device)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = torch.cat([raw, raw.new_zeros(n, pad)], 1)
    return raw.view(torch.int64)


def _torch_rows(tensors: Sequence[Tensor], n: int, seed_a: int, seed_b: int) -> list[bytes]:
    device = tensors[0].device
    acc_a = torch.full((n,), _signed(seed_a), dtype=torch.int64, device=device)
    acc_b = torch.full((n,), _signed(seed_b), dtype=torch.int64, device=device)
    for t in tensors:
        w = _words(t, n)
        pos = torch.arange(1, w.shape[1] + 1, dtype=torch.int64, device=w.device)
        lane_a = _splitmix(w + pos * _GOLDEN + _signed(seed_a)).sum(1, dtype=torch.int64)
        lane_b = _fmix((w ^ _signed(seed_b)) + pos * _ODD).sum(1, dtype=torch.int64)
        acc_a = _splitmix(acc_a * _GOLDEN + lane_a.to(device))
        acc_b = _fmix(acc_b * _ODD + lane_b.to(device))
    keys = torch.stack([acc_a, acc_b], 1).cpu()  # 16 bytes per row cross to the host, never the input
    raw = bytes(tensor_bytes(keys))
    return [raw[i : i + 16] for i in range(0, 16 * n, 16)]
