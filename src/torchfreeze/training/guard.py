"""Runtime check that frozen really means frozen: ``guard`` snapshots frozen tensors and verifies them."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.uses import frozen_map
from torchfreeze._core.wrappers import local_tensor, unwrap
from torchfreeze.errors import ArgumentTypeError, FrozenTensorChangedError
from torchfreeze.training._watch import materialised, refuse_meta, watched_norms

__all__ = ["guard", "Guard"]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        return None
    return numpy


_NP = _numpy()


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN equals the same NaN, -0.0 differs from 0.0).

    On CPU the comparison goes through numpy when it is installed: a single-threaded memory
    scan that is about 3x faster than ``torch.equal`` and does not wait on busy OpenMP threads.
    """
    a, b = local_tensor(a), local_tensor(b)  # a DTensor (FSDP2) compares this rank's shard
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach()
    bits = _BITS.get(a.element_size())
    if bits is not None and a.dtype != bits:
        a, b = a.view(bits), b.view(bits)
    if _NP is not None and a.device.type == "cpu" and b.device.type == "cpu" and bits is not None:
        return bool(_NP.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


def _max_change(before: torch.Tensor, after: torch.Tensor) -> float:
    before, after = local_tensor(before), local_tensor(after)  # this rank's shard of a DTensor
    if before.shape != after.shape:
        return float("inf")
    diff = after.detach().to(torch.float64) - before.to(torch.float64)
    if diff.is_complex():
        diff = diff.abs()
    diff = diff.abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def _watch_set(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> live tensor for everything that must stay bit-identical, each tensor once.

    Lazy (uninitialised) tensors are left out until a forward pass gives them values; the next
    verification then snapshots them.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    frozen = frozen_map(model)
    for name, p in frozen.items():
        seen.add(id(p))
        out[name] = p
    for mname, m in watched_norms(model, set(seen)):
        for bname, b in m.named_buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                out[f"{mname}.{bname}" if mname else bname] = b
    return materialised(out)


class Guard:
    """The object :func:`guard` returns: watches frozen tensors and verifies them on demand.

    Build it with :func:`guard`; it snapshots on ``__enter__``, checks after every step of its
    optimizers and at ``__exit__``, and releases the snapshot on exit.

    Args:
        model: the model being trained.
        optimizers: the optimizers whose steps are checked (may be empty).

    Attributes:
        checks: how many verifications ran so far.
        names: names of the tensors being watched (empty outside the ``with`` block).

    Example:
        >>> import torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> with torchfreeze.guard(m) as g:
        ...     g.names
        ['0.weight', '0.bias']
    """

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        self.model = model
        self.optimizers = optimizers
        self.checks = 0
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def names(self) -> list[str]:
        """Names of the tensors being watched."""
        return list(self._snapshot)

    def _take(self, watch: dict[str, torch.Tensor]) -> None:
        self._snapshot = {n: (t, t.detach().clone()) for n, t in watch.items()}

    def verify(self, where: str = "on request") -> None:
        """Compare every watched tensor with its snapshot; raise on any change.

        Tensors unfrozen since the last check leave the watch list; tensors frozen since then
        join it (snapshotted now), so gradual unfreezing does not trip the guard.

        Args:
            where: words for the error message saying when the check ran.

        Raises:
            FrozenTensorChangedError: with ``.changes`` mapping each changed name to its largest
                absolute change.

        Example:
            >>> import torch, torchfreeze
            >>> m = torchfreeze.freeze(torch.nn.Linear(2, 2))
            >>> _ = m.weight.data.fill_(1.0)
            >>> with torchfreeze.guard(m) as g:
            ...     _ = m.weight.data.add_(0.5)
            ...     try:
            ...         g.verify()
            ...     except torchfreeze.errors.FrozenTensorChangedError as err:
            ...         print(err.changes)
            {'weight': 0.5}
        """
        self.checks += 1
        watch = _watch_set(self.model)
        by_id = {id(t): n for n, t in watch.items()}
        changes: dict[str, float] = {}
        # a frozen tensor swapped for another object (m[0] = new_layer, load_state_dict(assign=True))
        # trains silently through the new one: report it as replaced (issue 10.4)
        current: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        current.update(self.model.named_buffers(remove_duplicate=False))
        replaced: set[str] = set()
        for name, (live, snap) in self._snapshot.items():
            now = current.get(name)
            if now is not live:
                replaced.add(name)
                changes[name] = float("inf") if now is None else _max_change(snap, now.detach())
                continue
            if id(live) not in by_id:
                continue  # unfrozen since: it may train now
            if not _bit_equal(live.detach(), snap):
                changes[name] = _max_change(snap, live)
        # refresh the list: keep existing snapshots (identical unless changed), add new members
        old = {id(live): (live, snap) for live, snap in self._snapshot.values()}
        self._snapshot = {
            n: old[id(t)] if id(t) in old and n not in changes else (t, t.detach().clone()) for n, t in watch.items()
        }
        if changes:
            raise _changed_error(self.model, changes, where, replaced)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.verify(f"after optimizer step (check {self.checks + 1})")

    def __enter__(self) -> Guard:
        self._take(_watch_set(self.model))
        for opt in self.optimizers:
            self._handles.append(opt.register_step_post_hook(self._hook))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc_type is None:
            self.verify("at the end of the guarded block")
        self._snapshot = {}


def _changed_error(
    model: nn.Module, changes: dict[str, float], where: str, replaced: set[str] | None = None
) -> FrozenTensorChangedError:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    replaced = replaced or set()
    lines = []
    for name, delta in changes.items():
        kind = "parameter" if name in params else "buffer"
        if name in replaced:
            lines.append(f"  - {kind} {name!r}: replaced by another tensor (largest absolute change {delta:.6g})")
        else:
            lines.append(f"  - {kind} {name!r}: largest absolute change {delta:.6g}")
    hints = []
    if replaced:
        hints.append(
            "a frozen tensor was replaced (module reassigned, load_state_dict(..., assign=True), resized "
            "embeddings): the new tensor is not frozen and may train; re-apply torchfreeze.freeze(model, ...) "
            "after the swap, outside the guarded block, or load with assign=False"
        )
    moved = [n for n in changes if n not in replaced]
    if any(n in params for n in moved):
        hints.append(
            "a frozen parameter moved: build the optimizer with torchfreeze.param_groups(model, lr) and "
            "run torchfreeze.check(model, optimizer) to find the cause (non-None .grad, optimizer state, "
            "or code that writes to the weights)"
        )
    if any(n not in params for n in moved):
        hints.append(
            "normalisation statistics moved: the layer ran in train mode; use "
            "torchfreeze.freeze_batchnorm(model, ...) or freeze(model, ..., mode='eval')"
        )
    err = FrozenTensorChangedError(
        f"{len(changes)} frozen tensor(s) changed {where}:\n" + "\n".join(lines) + "\nFix: " + "; ".join(hints) + ".",
        changes,
    )
    return err


def guard(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> Guard:
    """Context manager: fail as soon as a frozen tensor changes.

    On entry it snapshots (clones) every frozen tensor: frozen parameters (including those used
    only through ``Frozen``) and the buffers of normalisation layers that are frozen, pinned eval
    or ``FrozenBatchNorm``. After every ``optimizer.step()`` (through the optimizer's step
    post-hook) and at exit it checks they are bit-identical. Cost: one copy of the frozen tensors
    in memory and one comparison pass per step (see ``docs/training.md`` for measured overhead).

    Args:
        model: the model being trained.
        optimizer: an optimizer (or a list of them) to check after each step; ``None`` checks
            only at exit (and whenever you call ``.verify()``).

    Returns:
        A :class:`Guard`, usable as ``with guard(model, opt) as g:``.

    Raises:
        FrozenTensorChangedError: from ``optimizer.step()`` or at exit, naming each changed tensor
            and its largest absolute change (also in ``err.changes``).
        ArgumentTypeError: ``model`` or ``optimizer`` of the wrong type.
        ArgumentError: the model has tensors on the meta device (nothing to compare).

    Example:
        >>> import torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> opt = torch.optim.AdamW(torchfreeze.param_groups(m, 1e-2, weight_decay=0.1))
        >>> with guard(m, opt) as g:
        ...     m(torch.ones(4, 2)).sum().backward(); opt.step()
        >>> g.checks
        2
    """
    require_module(model, "guard")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    refuse_meta(model, "guard")  # nothing to compare on the meta device (aten::equal has no meta kernel)
    if optimizer is None:
        opts: list[torch.optim.Optimizer] = []
    elif isinstance(optimizer, torch.optim.Optimizer):
        opts = [optimizer]
    elif isinstance(optimizer, Sequence) and all(isinstance(o, torch.optim.Optimizer) for o in optimizer):
        opts = list(optimizer)
    else:
        raise ArgumentTypeError(
            f"guard(optimizer={short_repr(optimizer)}): expected a torch.optim.Optimizer, a list of them or None, "
            f"got {type(optimizer).__name__}. Fix: pass the optimizer that trains the model."
        )
    return Guard(model, opts)
