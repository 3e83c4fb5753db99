"""Runtime and static checks that frozen really means frozen: ``guard`` and ``check``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from torchfreeze._core.mode import pinned_modes
from torchfreeze.errors import ArgumentError, FrozenTensorChanged
from torchfreeze.nn import trainable_parameters
from torchfreeze.training.state import _check_model, _frozen_parameters, _pinned_ids, _tracks_stats, _watched_norms

__all__ = ["guard", "Guard", "check", "Problem", "CODES"]

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
    if before.shape != after.shape:
        return float("inf")
    diff = after.detach().to(torch.float64) - before.to(torch.float64)
    if diff.is_complex():
        diff = diff.abs()
    diff = diff.abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def _watch_set(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> live tensor for everything that must stay bit-identical, each tensor once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    frozen = _frozen_parameters(model)
    for name, p in frozen.items():
        seen.add(id(p))
        out[name] = p
    for mname, m in _watched_norms(model, {id(p) for p in frozen.values()}):
        for bname, b in m.named_buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                out[f"{mname}.{bname}" if mname else bname] = b
    return out


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
        self._handles: list[Any] = []

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
            FrozenTensorChanged: with ``.changes`` mapping each changed name to its largest
                absolute change.

        Example:
            >>> import torch, torchfreeze
            >>> m = torchfreeze.freeze(torch.nn.Linear(2, 2))
            >>> _ = m.weight.data.fill_(1.0)
            >>> with torchfreeze.guard(m) as g:
            ...     _ = m.weight.data.add_(0.5)
            ...     try:
            ...         g.verify()
            ...     except torchfreeze.errors.FrozenTensorChanged as err:
            ...         print(err.changes)
            {'weight': 0.5}
        """
        self.checks += 1
        watch = _watch_set(self.model)
        by_id = {id(t): n for n, t in watch.items()}
        changes: dict[str, float] = {}
        for name, (live, snap) in self._snapshot.items():
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
            raise _changed_error(self.model, changes, where)

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


def _changed_error(model: nn.Module, changes: dict[str, float], where: str) -> FrozenTensorChanged:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    lines = []
    for name, delta in changes.items():
        kind = "parameter" if name in params else "buffer"
        lines.append(f"  - {kind} {name!r}: largest absolute change {delta:.6g}")
    hints = []
    if any(n in params for n in changes):
        hints.append(
            "a frozen parameter moved: build the optimizer with torchfreeze.param_groups(model, lr) and "
            "run torchfreeze.check(model, optimizer) to find the cause (non-None .grad, optimizer state, "
            "or code that writes to the weights)"
        )
    if any(n not in params for n in changes):
        hints.append(
            "normalisation statistics moved: the layer ran in train mode; use "
            "torchfreeze.freeze_batchnorm(model, ...) or freeze(model, ..., mode='eval')"
        )
    err = FrozenTensorChanged(
        f"{len(changes)} frozen tensor(s) changed {where}:\n" + "\n".join(lines) + "\nFix: " + "; ".join(hints) + "."
    )
    err.changes = dict(changes)  # type: ignore[attr-defined]
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
        FrozenTensorChanged: from ``optimizer.step()`` or at exit, naming each changed tensor
            and its largest absolute change (also in ``err.changes``).
        ArgumentError: ``model`` or ``optimizer`` of the wrong type.

    Example:
        >>> import torch, torchfreeze
        >>> m = torchfreeze.freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), "0")
        >>> opt = torch.optim.AdamW(torchfreeze.param_groups(m, 1e-2, weight_decay=0.1))
        >>> with guard(m, opt) as g:
        ...     m(torch.ones(4, 2)).sum().backward(); opt.step()
        >>> g.checks
        2
    """
    _check_model(model, "guard")
    if optimizer is None:
        opts: list[torch.optim.Optimizer] = []
    elif isinstance(optimizer, torch.optim.Optimizer):
        opts = [optimizer]
    elif isinstance(optimizer, Sequence) and all(isinstance(o, torch.optim.Optimizer) for o in optimizer):
        opts = list(optimizer)
    else:
        raise ArgumentError(
            f"guard(optimizer=...) expects a torch.optim.Optimizer, a list of them or None, got "
            f"{type(optimizer).__name__}."
        )
    return Guard(model, opts)


# --------------------------------------------------------------------------------------
# check


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check`.

    Args:
        code: short stable identifier (see ``CODES``).
        names: qualified names of the parameters / modules involved.
        message: what is wrong.
        fix: a one-line fix.

    Example:
        >>> str(Problem("trainable-not-in-optimizer", ("head.weight",), "head.weight never learns.",
        ...             "torchfreeze.add_unfrozen(model, optimizer)."))
        '[trainable-not-in-optimizer] head.weight never learns. Fix: torchfreeze.add_unfrozen(model, optimizer).'
    """

    code: str
    names: tuple[str, ...]
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message} Fix: {self.fix}"


#: Every code :func:`check` can return, with its meaning.
CODES: dict[str, str] = {
    "frozen-grad-not-none": "a frozen parameter holds a .grad tensor that optimizers (weight decay, momentum) would use",
    "frozen-param-has-optimizer-state": "a frozen parameter has momentum / moment buffers in the optimizer",
    "bn-stats-update-while-frozen": "a normalisation layer with frozen affine weights still updates its running statistics",
    "train-mode-in-frozen-subtree": "unpinned dropout or BatchNorm in train mode inside a frozen subtree",
    "shared-frozen-and-trainable": "a parameter used through Frozen is also trained through another use",
    "trainable-not-in-optimizer": "a trainable parameter that the optimizer does not hold",
}


#: Optimizer state that moves a parameter on a step even when its gradient is zero (momentum and
#: first moments). Accumulators of squared gradients (Adagrad, RMSprop, Adadelta, Adafactor), Rprop
#: step sizes and ASGD averages do not move a parameter whose gradient is zero.
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def _short(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def check(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[Problem]:
    """Static lint of the known traps around frozen parameters; changes nothing.

    Codes (stable strings, see ``CODES``): ``frozen-grad-not-none``,
    ``frozen-param-has-optimizer-state``, ``bn-stats-update-while-frozen``,
    ``train-mode-in-frozen-subtree``, ``shared-frozen-and-trainable``,
    ``trainable-not-in-optimizer`` (the last two optimizer codes need ``optimizer``).

    Args:
        model: the model.
        optimizer: the optimizer that will train it, if any.

    Returns:
        The problems found, in the order of ``CODES``; an empty list when all is well.

    Raises:
        ArgumentError: ``model`` / ``optimizer`` of the wrong type.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
        >>> _ = torchfreeze.freeze(m, "0", "1")
        >>> [p.code for p in check(m)]
        ['bn-stats-update-while-frozen']
        >>> _ = torchfreeze.freeze_batchnorm(m, "1")
        >>> check(m)
        []
    """
    _check_model(model, "check")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentError(
            f"check(optimizer=...) expects a torch.optim.Optimizer or None, got {type(optimizer).__name__}."
        )
    from torchfreeze._core.uses import parameter_uses
    from torchfreeze.nn.batchnorm import _FrozenBatchNorm, is_norm

    problems: list[Problem] = []
    frozen = _frozen_parameters(model)
    frozen_ids = {id(p) for p in frozen.values()}

    # 1. frozen parameter with a gradient tensor
    with_grad = [n for n, p in frozen.items() if p.grad is not None]
    if with_grad:
        problems.append(
            Problem(
                "frozen-grad-not-none",
                tuple(with_grad),
                f"{len(with_grad)} frozen parameter(s) hold a .grad tensor ({_short(with_grad)}); an optimizer "
                "that holds them applies weight decay / momentum to them even if the gradient is zero.",
                "set p.grad = None for them (torchfreeze.freeze does) and use optimizer.zero_grad(set_to_none=True).",
            )
        )

    # 2. optimizer state on frozen parameters
    if optimizer is not None:
        stateful = []
        for n, p in frozen.items():
            st = optimizer.state.get(p, {})
            if any(isinstance(st.get(k), torch.Tensor) and bool(st[k].detach().any()) for k in _MOMENTUM_KEYS):
                stateful.append(n)
        if stateful:
            problems.append(
                Problem(
                    "frozen-param-has-optimizer-state",
                    tuple(stateful),
                    f"{len(stateful)} frozen parameter(s) carry non-zero momentum / first-moment state in the "
                    f"optimizer ({_short(stateful)}): it moves them on any step where .grad is not None "
                    "(a zero gradient is enough).",
                    "rebuild the optimizer from torchfreeze.param_groups(model, lr) (or drop the state: "
                    "optimizer.state.pop(p)).",
                )
            )

    # 3. normalisation layers with frozen affine weights whose statistics still update
    eval_ids = _pinned_ids(model, "eval")
    bn_names = [
        n
        for n, m in model.named_modules()
        if is_norm(m)
        and not isinstance(m, _FrozenBatchNorm)
        and _tracks_stats(m)
        and id(m) not in eval_ids
        and (params := list(m.parameters(recurse=False)))
        and all(id(p) in frozen_ids for p in params)
    ]
    if bn_names:
        problems.append(
            Problem(
                "bn-stats-update-while-frozen",
                tuple(bn_names),
                f"{len(bn_names)} normalisation layer(s) have frozen affine weights but will update their running "
                f"statistics in train mode ({_short(bn_names)}).",
                "torchfreeze.freeze_batchnorm(model, "
                + repr(bn_names[0] if len(bn_names) == 1 else bn_names)
                + ") (or pass train_bn=True to freeze if they should train).",
            )
        )

    # 4. maximal frozen subtrees with unpinned dropout / batch statistics in train mode
    pinned = set(pinned_modes(model))
    reported = set(bn_names)
    for root, sub in _frozen_subtrees(model, frozen_ids):
        live = []
        for n, m in sub.named_modules():
            full = f"{root}.{n}" if root and n else (n or root)
            if not m.training or full in pinned:
                continue
            dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
            stats = is_norm(m) and _tracks_stats(m) and full not in reported
            if dropout or stats:
                live.append(full)
        if live:
            sel = f", {root!r}" if root else ""
            problems.append(
                Problem(
                    "train-mode-in-frozen-subtree",
                    (root, *live),
                    f"frozen subtree {root or '<model>'!r} runs {_short(live)} in train mode (not pinned): dropout "
                    "or batch statistics make the frozen features noisy and slower than they need to be.",
                    f"torchfreeze.freeze(model{sel}, mode='eval') (or pin_mode(model{sel}, mode='eval')).",
                )
            )

    # 5. parameters both used through Frozen and trained through another use
    shared = [e for e in parameter_uses(model).values() if e.frozen_use_paths and e.trainable]
    if shared:
        names = tuple(n for e in shared for n in e.paths)
        uses = [p for e in shared for p in e.frozen_use_paths]
        problems.append(
            Problem(
                "shared-frozen-and-trainable",
                names,
                f"{len(shared)} parameter(s) used through Frozen ({_short(uses)}) also train through another "
                f"use ({_short([e.trainable_paths[0] for e in shared])}), so the Frozen use sees values that "
                "change every step.",
                "if the Frozen use must stay fixed give it its own copy: Frozen(copy.deepcopy(module)); "
                "otherwise this is the intended tie.",
            )
        )

    # 6. trainable parameters the optimizer does not hold
    if optimizer is not None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in trainable_parameters(model) if id(p) not in held]
        if missing:
            problems.append(
                Problem(
                    "trainable-not-in-optimizer",
                    tuple(missing),
                    f"{len(missing)} trainable parameter(s) are not in the optimizer and will never learn "
                    f"({_short(missing)}).",
                    "torchfreeze.add_unfrozen(model, optimizer).",
                )
            )
    return problems


def _frozen_subtrees(model: nn.Module, frozen_ids: set[int]) -> list[tuple[str, nn.Module]]:
    """Maximal subtrees with at least one parameter, all of them frozen (the model itself excluded
    unless it is entirely frozen)."""

    def all_frozen(m: nn.Module) -> bool:
        params = list(m.parameters())
        return bool(params) and all(id(p) in frozen_ids for p in params)

    out: list[tuple[str, nn.Module]] = []

    def visit(name: str, m: nn.Module) -> None:
        if all_frozen(m):
            out.append((name, m))
            return
        for cname, child in m.named_children():
            visit(f"{name}.{cname}" if name else cname, child)

    visit("", model)
    return out
