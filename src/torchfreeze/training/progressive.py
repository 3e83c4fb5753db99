"""Progressive freezing (FreezeOut, AutoFreeze): freeze layer groups front to back as training goes."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeGuard

import torch
from torch import Tensor, nn

from torchfreeze._core.checks import require_bool, require_choice, require_module, short_repr
from torchfreeze._core.select import Selector, resolve
from torchfreeze._core.uses import parameter_uses
from torchfreeze._core.wrappers import require_no_raw_ddp, unwrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError, SharedParameterError
from torchfreeze.nn import freeze, is_frozen, layer_groups
from torchfreeze.nn.freezing import Shared
from torchfreeze.training._args import layer_group_list
from torchfreeze.training._progressive import (
    Plan,
    ScheduleName,
    check_optimizer_holds,
    check_overlap,
    freeze_more,
    plan_schedule,
)
from torchfreeze.training.optim import drop_frozen
from torchfreeze.training.state import _validate_freeze_state, freeze_state, load_freeze_state

__all__ = ["ProgressiveFreezing"]

_FORMAT = "torchfreeze.progressive_freezing"
_VERB = "ProgressiveFreezing"
Interval = Literal["epoch", "step"]


def _is_count(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


class ProgressiveFreezing:
    """Freeze layer groups front to back as training goes, removing them from the optimizer's work.

    The inverse of :class:`~torchfreeze.GradualUnfreezing`. Call :meth:`step` once per unit
    (``interval``: an epoch or an optimizer step). At each change the first ``k`` layer groups
    are frozen (:func:`torchfreeze.freeze`: ``requires_grad=False``, ``.grad=None``, pinned to
    ``mode``), their parameters leave the optimizer's groups and their optimizer state is
    deleted (:func:`torchfreeze.training.optim.drop_frozen`; the groups themselves stay, so an
    attached LR scheduler keeps stepping). A group never unfreezes, and the last group (the
    head) freezes only with ``freeze_last=True``. Under a ``torchfreeze.distributed.wrap``
    handle the DDP is re-wrapped after each change, so it stops reducing the frozen
    parameters; a raw live DDP is refused.

    Schedules:

    - a dict ``{count: k}``: from unit ``count`` on, at least the first ``k`` groups are frozen
      (an entry below an earlier one, ``{1: 2, 3: 1}``, changes nothing and is warned about);
    - ``"freezeout"`` (FreezeOut, Brock et al. 2017, arXiv:1706.04983): with ``L`` groups, group
      ``i`` is frozen from unit ``t_i * total`` on, ``t_i = t0 + (1 - t0) * i / (L - 1)``
      (``t0`` default 0.5); ``"freezeout-cubic"`` uses ``t_i ** 3`` (``t0`` given before cubing,
      as in the paper's code: the default 0.8 freezes the first group at 0.512). Only the
      freezing times are FreezeOut's: its per-layer cosine annealing of the learning rate is left
      to your LR scheduler;
    - ``"grad_norm"`` (after AutoFreeze, Liu et al. 2021, arXiv:2102.01386): an optimizer step
      pre-hook adds each trainable group's gradient L2 norm; at :meth:`step` the frontmost
      trainable group freezes when its mean gradient norm over the interval changed by less than
      ``threshold`` relative to the previous interval (``|g_now - g_prev| / g_prev``), and the test
      moves on to the next group (groups freeze only after every group before them).
      AutoFreeze compares each layer's change with a percentile of all layers' changes; a fixed
      ``threshold`` does not depend on the other groups.

    Resuming: save ``state_dict()`` with the model and optimizer state; in the new process build
    everything the same way, then call ``load_state_dict`` *before* ``optimizer.load_state_dict``
    (it restores the freeze state and removes the frozen parameters, so the optimizer's state fits).

    Args:
        model: the model (or its ``torchfreeze.distributed.wrap`` handle).
        optimizer: its optimizer (not LBFGS; it must hold parameters of ``model``). Frozen parameters it holds are removed at once.
        schedule: a dict ``{count: groups frozen}``, ``"freezeout"``, ``"freezeout-cubic"`` or
            ``"grad_norm"``.
        groups: layer groups (selectors, input side first, not overlapping); default :func:`torchfreeze.layer_groups`.
        interval: the unit :meth:`step` is called at and ``total`` counts: ``"epoch"`` or ``"step"``.
        mode: the mode frozen groups are pinned to: ``"eval"`` (default: dropout off, statistics
            fixed, so the frozen prefix is deterministic and ``cache_frozen_prefix`` can cache it),
            ``"train"``, or ``None`` to leave modes alone.
        total: FreezeOut only: the length of training in units (an int >= 1).
        t0: FreezeOut only: when the first group freezes, as a fraction of ``total`` in (0, 1].
        threshold: ``"grad_norm"`` only: the relative change below which a group freezes (> 0, default 0.1).
        freeze_last: allow the schedule to freeze the last group too.
        shared: tied parameters across groups, as for :func:`torchfreeze.freeze`.

    Raises:
        ArgumentTypeError: an argument of the wrong type.
        ArgumentError: a bad schedule or option (the message names it and the fix), LBFGS, an
            optimizer that holds none of the model's parameters, groups that overlap (a parameter
            in two groups), a raw live DDP, a tie across the boundary of a reachable frozen
            prefix (``SharedParameterError``).

    Warns:
        UserWarning: a dict entry that asks for fewer frozen groups than an earlier one (``{1: 2, 3: 1}``):
            groups never unfreeze, so it changes nothing (use :class:`~torchfreeze.GradualUnfreezing`
            to unfreeze).

    Nothing changes when the constructor raises: everything is validated first.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> sched = ProgressiveFreezing(m, opt, "freezeout", total=4)
        >>> for epoch in range(4):
        ...     sched.step()
        ...     print(sched.last, sched.frozen_groups, [len(g["params"]) for g in opt.param_groups])
        1 0 [6]
        2 1 [4]
        3 2 [2]
        4 2 [2]
        >>> m.train()[0].training  # the frozen prefix stays in eval mode
        False
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Mapping[int, int] | ScheduleName,
        *,
        groups: Sequence[Selector] | None = None,
        interval: Interval = "epoch",
        mode: Literal["eval", "train"] | None = "eval",
        total: int | None = None,
        t0: float | None = None,
        threshold: float | None = None,
        freeze_last: bool = False,
        shared: Shared = "error",
    ) -> None:
        require_module(model, _VERB)
        model = unwrap(model)  # canonical names under DDP / torch.compile / wrap handles
        require_no_raw_ddp(model, _VERB)  # it will change requires_grad: refuse a raw live DDP now
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(
                f"{_VERB}(optimizer={short_repr(optimizer)}): expected a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}. Fix: pass the optimizer that trains the model."
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ArgumentError(
                f"{_VERB}(optimizer=LBFGS): LBFGS keeps a flat history over the parameters it started with, so "
                "frozen ones cannot leave it. Fix: use another optimizer (SGD, AdamW) with progressive freezing."
            )
        self.interval: Interval = require_choice(interval, ("epoch", "step"), _VERB, "interval")
        self.mode: Literal["eval", "train"] | None = require_choice(mode, ("eval", "train", None), _VERB, "mode")
        self.shared: Shared = require_choice(shared, ("error", "freeze"), _VERB, "shared")
        self.freeze_last = require_bool(freeze_last, _VERB, "freeze_last")
        self.groups: list[Selector] = layer_group_list(groups, _VERB) or list(layer_groups(model))
        n = len(self.groups)
        self._limit = n if freeze_last else n - 1  # how many leading groups may ever freeze
        self._plan: Plan = plan_schedule(
            schedule, n, self._limit, total=total, t0=t0, threshold=threshold, freeze_last=freeze_last
        )
        # a group that names nothing is a SelectorError, raised before anything changes
        members = [resolve(model, g, verb=_VERB, argument="groups") for g in self.groups]
        check_overlap(self.groups, members)
        check_optimizer_holds(model, optimizer)
        self._check_ties(model, members)
        self.model = model
        self.optimizer = optimizer
        self.schedule: dict[int, int] | str = dict(self._plan.entries) if self._plan.kind == "dict" else self._plan.kind
        self.last = 0
        self._frozen = 0  # leading groups this scheduler has frozen (it never goes down)
        self._params = [list(sel.unique_parameters().values()) for sel in members]
        self._previous: list[float | None] = [None] * n  # grad_norm: mean norm per group, last interval
        self._sums: list[Tensor | float] = [0.0] * n  # grad_norm: this interval's running sums
        self._steps = 0  # grad_norm: optimizer steps in this interval
        self._apply(self._plan.target(0) if self._plan.kind != "grad_norm" else 0, force=True)
        self._first = self.frozen_groups
        if self._plan.kind == "grad_norm":
            ref = weakref.ref(self)

            def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                sched = ref()
                if sched is not None:
                    sched._accumulate()

            handle = optimizer.register_step_pre_hook(hook)
            weakref.finalize(self, handle.remove)

    # ----------------------------------------------------------------------------------

    @property
    def milestones(self) -> list[float]:
        """FreezeOut: the unit count from which each group is frozen (empty for other schedules)."""
        return list(self._plan.milestones)

    @property
    def threshold(self) -> float | None:
        """``"grad_norm"``: the relative change below which a group freezes (``None`` otherwise)."""
        return self._plan.threshold

    @property
    def frozen_groups(self) -> int:
        """How many leading layer groups are frozen now (by this scheduler or before it)."""
        count = 0
        for g in self.groups:
            if not is_frozen(self.model, g):
                break
            count += 1
        return count

    def _check_ties(self, model: nn.Module, members: list[Any]) -> None:
        """With ``shared="error"``, refuse now a tie that a reachable frozen prefix would cut, not mid-run."""
        if self.shared != "error":
            return
        dict_plan = self._plan.kind == "dict"
        reachable = set(self._plan.entries.values()) if dict_plan else set(range(1, self._limit + 1))
        uses = parameter_uses(model)
        for k in sorted(reachable - {0}):
            prefix = {path: p for sel in members[:k] for path, p in sel.parameters.items()}
            for path, p in prefix.items():
                entry = uses.get(id(p))
                outside = [q for q in entry.trainable_paths if q not in prefix] if entry and p.requires_grad else []
                if outside:
                    raise SharedParameterError(
                        f"{_VERB}(schedule=...): freezing the first {k} layer group(s) would cut a tie: {path!r} "
                        f"is also used as {outside[0]!r}, in a group that keeps training. Nothing was changed. "
                        "Fix: pass shared='freeze' (the tie freezes with the first group), or groups=[...] that "
                        "keep both uses in one group."
                    )

    def _apply(self, k: int, *, force: bool = False) -> None:
        """Freeze the first ``k`` groups if more than before; drop frozen parameters from the optimizer."""
        if k > self._frozen:
            freeze(self.model, *self.groups[:k], mode=self.mode, shared=self.shared)
            self._frozen = k
        elif not force:
            return
        drop_frozen(self.model, self.optimizer)

    def _accumulate(self) -> None:
        """The optimizer step pre-hook of ``"grad_norm"``: add each candidate group's gradient norm."""
        with torch.no_grad():
            for i in range(self._first, self._limit):
                grads = [p.grad for p in self._params[i] if p.grad is not None]
                if not grads:
                    continue
                norm = torch.nn.utils.get_total_norm(grads)
                dtype = torch.float32 if norm.device.type == "mps" else torch.float64
                acc = self._sums[i]
                if not isinstance(acc, Tensor):  # a fresh interval, or a value restored by load_state_dict
                    acc = torch.tensor(acc, dtype=dtype, device=norm.device)
                self._sums[i] = acc + norm.to(dtype)
        self._steps += 1

    def step(self) -> None:
        """Advance one unit (call once per epoch, or once per step) and freeze what the schedule says.

        Raises:
            SharedParameterError: ``shared="error"`` and a tie crosses the new boundary (only
                possible when the model changed since construction); nothing changes then.

        Example:
            >>> import torch
            >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> sched = ProgressiveFreezing(m, torch.optim.SGD(m.parameters(), lr=0.1), {1: 1})
            >>> sched.step(); sched.last, m[0].weight.requires_grad
            (1, False)
        """
        count = self.last + 1
        if self._plan.kind != "grad_norm":
            self._apply(self._plan.target(count))
            self.last = count
            return
        previous, target = self._previous, self._frozen
        if self._steps:
            current = [float(s) / self._steps for s in self._sums]  # one device sync per interval
            threshold = float(self._plan.threshold or 0.0)
            target = max(target, freeze_more(self._first, self._limit, self._previous, current, threshold))
            previous = [current[i] if self._first <= i < self._limit else None for i in range(len(self.groups))]
        self._apply(target)  # may raise before any change: the statistics are committed after it
        if self._steps:
            self._previous, self._sums, self._steps = previous, [0.0] * len(self.groups), 0
        self._first = self.frozen_groups
        self.last = count

    # ----------------------------------------------------------------------------------

    def _describe(self) -> dict[str, Any]:
        return {
            **self._plan.describe(),
            "groups": len(self.groups),
            "freeze_last": self.freeze_last,
            "mode": self.mode,
            "interval": self.interval,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the count, the schedule, the freeze state, the criterion's statistics.

        Returns:
            A dict of plain Python values (``torch.load(weights_only=True)`` accepts it).

        Example:
            >>> import torch
            >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> sched = ProgressiveFreezing(m, torch.optim.SGD(m.parameters(), lr=0.1), {1: 1})
            >>> sched.step()
            >>> state = sched.state_dict()
            >>> state["last"], state["frozen"], state["freeze_state"]["frozen"]
            (1, 1, ['0.weight', '0.bias'])
        """
        return {
            "format": _FORMAT,
            "version": 1,
            "last": self.last,
            "frozen": self._frozen,
            "schedule": self._describe(),
            "freeze_state": freeze_state(self.model),
            "criterion": {
                "previous": list(self._previous),
                "sums": [float(s) for s in self._sums],
                "steps": self._steps,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore the count, the freeze state (frozen parameters leave the optimizer) and the statistics.

        Call it before ``optimizer.load_state_dict``. Everything is validated first; on error
        nothing changes.

        Args:
            state: the dict returned by :meth:`state_dict` (possibly through ``torch.save``/``load``).

        Raises:
            ArgumentTypeError: ``state`` is not a dict.
            ArgumentError: the state is not from a ProgressiveFreezing built with the same arguments.
            FreezeStateError: the freeze state does not fit the model.

        Example:
            >>> import torch
            >>> def build():
            ...     m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            ...     opt = torch.optim.SGD(m.parameters(), lr=0.1)
            ...     return m, opt, ProgressiveFreezing(m, opt, {1: 1})
            >>> m, opt, sched = build()
            >>> sched.step()
            >>> m2, opt2, sched2 = build()  # a fresh process
            >>> sched2.load_state_dict(sched.state_dict())
            >>> sched2.last, m2[0].weight.requires_grad, len(opt2.param_groups[0]["params"])
            (1, False, 2)
        """
        where = f"{_VERB}.load_state_dict"
        fix = "Fix: pass the dict ProgressiveFreezing.state_dict() returned, unmodified."
        if not isinstance(state, Mapping):
            raise ArgumentTypeError(
                f"{where}(state={short_repr(state)}): expected the dict ProgressiveFreezing.state_dict() returned, "
                f"got {type(state).__name__}. {fix}"
            )
        if state.get("format") != _FORMAT or state.get("version") != 1:
            raise ArgumentError(
                f"{where}(state=...): state['format']={short_repr(state.get('format'))}, version "
                f"{short_repr(state.get('version'))}; expected {_FORMAT!r} version 1 (a freeze state or another "
                f"scheduler's state is not this one). {fix}"
            )
        if state.get("schedule") != self._describe():
            raise ArgumentError(
                f"{where}(state=...): saved with {short_repr(state.get('schedule'), 160)} but this scheduler has "
                f"{short_repr(self._describe(), 160)}. Fix: build the scheduler with the same arguments before resuming."
            )
        last, frozen = state.get("last"), state.get("frozen")
        if not _is_count(last) or last < 0 or not _is_count(frozen) or not 0 <= frozen <= self._limit:
            raise ArgumentError(
                f"{where}(state=...): state['last']={short_repr(last)}, state['frozen']={short_repr(frozen)}; "
                f"expected ints, last >= 0 and 0 <= frozen <= {self._limit}. {fix}"
            )
        previous, sums, steps = self._criterion(state.get("criterion"), where, fix)
        _validate_freeze_state(
            self.model, state.get("freeze_state"), strict=True, arg="state['freeze_state']", verb=f"{where}(state=...)"
        )
        load_freeze_state(self.model, state["freeze_state"])
        drop_frozen(self.model, self.optimizer)
        self.last, self._frozen = last, frozen
        self._previous, self._sums, self._steps = previous, sums, steps
        self._first = self.frozen_groups

    def _criterion(self, saved: Any, where: str, fix: str) -> tuple[list[float | None], list[Tensor | float], int]:
        n = len(self.groups)

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

        ok = (
            isinstance(saved, Mapping)
            and isinstance(saved.get("previous"), list)
            and isinstance(saved.get("sums"), list)
            and len(saved["previous"]) == len(saved["sums"]) == n
            and all(v is None or number(v) for v in saved["previous"])
            and all(number(v) for v in saved["sums"])
            and _is_count(saved.get("steps"))
            and saved["steps"] >= 0
        )
        if not ok:
            raise ArgumentError(
                f"{where}(state=...): state['criterion'] must hold 'previous' ({n} numbers or None), 'sums' "
                f"({n} numbers) and 'steps' (an int >= 0). {fix}"
            )
        previous = [None if v is None else float(v) for v in saved["previous"]]
        return previous, [float(v) for v in saved["sums"]], int(saved["steps"])

    def __repr__(self) -> str:
        return f"ProgressiveFreezing(last={self.last}, frozen_groups={self.frozen_groups}, schedule={self.schedule!r})"
