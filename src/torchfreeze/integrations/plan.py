"""What a trainer callback does about freezing, written once for every trainer.

A :class:`FreezeRun` applies a freeze plan, checks the optimizers the trainer built, runs a
:class:`~torchfreeze.GradualUnfreezing` schedule (which joins each new optimizer group to the
LR scheduler, ``scheduler=``),
guards every optimizer step, and saves / restores all of it. The Lightning and Hugging Face
callbacks only call it from their hooks.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchfreeze._core.checks import require_bool, require_choice, require_module, short_repr
from torchfreeze._core.mode import Mode
from torchfreeze._core.select import Selector
from torchfreeze._core.uses import trainable_map
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CheckpointError
from torchfreeze.nn import freeze
from torchfreeze.nn.freezing import Shared
from torchfreeze.training import GradualUnfreezing, Guard, Problem, add_unfrozen, check, guard
from torchfreeze.training.schedule import Preset, WarmupCurve, check_schedule
from torchfreeze.training.schedulers import check_warmup
from torchfreeze.training.state import freeze_state, load_freeze_state

__all__ = ["FreezeRun", "Interval", "OnMissing", "Schedule"]

Interval = Literal["epoch", "step"]
OnMissing = Literal["warn", "error", "add"]
Schedule = Mapping[int, Selector | int] | Preset | int

_FORMAT = "torchfreeze.integrations.run"


class FreezeRun:
    """Freeze plan, unfreezing schedule, optimizer check and guard of one training run.

    Trainer callbacks call, in this order: :meth:`apply_plan` before the trainer builds its
    optimizers; :meth:`attach` once they exist (this also restores a state given to
    :meth:`load_state_dict` earlier, so the optimizer groups exist before the trainer loads the
    optimizer state); :meth:`advance_to` at every epoch or step boundary; :meth:`state_dict`
    when a checkpoint is written; :meth:`close` at the end.

    Args:
        freeze: selectors of what to freeze when training starts (empty: freeze nothing).
        mode: mode pinned on the frozen modules (``"eval"`` keeps frozen BatchNorm statistics and
            dropout off; ``None`` leaves behaviour alone), as in :func:`torchfreeze.freeze`.
        train_bn: keep normalisation layers in the selection trainable (the BatchNorm policy).
        shared: tied parameters, as in :func:`torchfreeze.freeze`.
        schedule: a :class:`~torchfreeze.GradualUnfreezing` schedule, counted in ``interval``
            units; ``None`` for no schedule.
        groups: layer groups for the schedule (default :func:`torchfreeze.layer_groups`).
        lr: learning rate of the groups the schedule adds (default: the optimizer's).
        interval: ``"epoch"`` or ``"step"`` (optimizer steps).
        guard: verify after every optimizer step that frozen tensors are bit-identical.
        warmup: warm each newly unfrozen group up over this many ``interval`` units (``0``: no
            warm-up), as :class:`~torchfreeze.GradualUnfreezing` does; Lightning's
            ``BackboneFinetuning`` is ``warmup_start=0.1, warmup_curve="geometric"``.
        warmup_start: the new group's first lr as a fraction of its target.
        warmup_curve: ``"linear"`` or ``"geometric"`` ramp from ``warmup_start`` to 1.
        on_missing: what to do when a trainable parameter is in no optimizer: ``"warn"``,
            ``"error"`` (raise :class:`~torchfreeze.errors.ArgumentError`) or ``"add"`` it to the
            first optimizer (:func:`torchfreeze.add_unfrozen`).

    Raises:
        ArgumentTypeError: a flag of the wrong type.
        ArgumentError: a bad ``mode``, ``interval``, ``on_missing``, ``shared`` or ``lr``.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> run = FreezeRun(freeze=["0"], schedule={1: "0"})
        >>> run.apply_plan(m)
        >>> opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        >>> run.attach(m, [opt])
        []
        >>> run.advance_to(1), len(opt.param_groups)
        (True, 2)
    """

    def __init__(
        self,
        *,
        freeze: Sequence[Selector] = (),
        mode: Mode | None = None,
        train_bn: bool = False,
        shared: Shared = "error",
        schedule: Schedule | None = None,
        groups: Sequence[Selector] | None = None,
        lr: float | None = None,
        interval: Interval = "epoch",
        guard: bool = False,
        on_missing: OnMissing = "warn",
        warmup: int = 0,
        warmup_start: float = 0.1,
        warmup_curve: WarmupCurve = "linear",
    ) -> None:
        verb = type(self).__name__
        check_warmup(warmup, warmup_start, warmup_curve, verb)
        if isinstance(freeze, (str, bytes)) or not isinstance(freeze, Sequence):
            raise ArgumentTypeError(
                f"{verb}(freeze={short_repr(freeze)}): expected a list of selectors, got {type(freeze).__name__}. "
                f"Fix: freeze=[{freeze!r}]."[:300]
            )
        require_choice(mode, (None, "eval", "train"), verb, "mode")
        require_bool(train_bn, verb, "train_bn")
        require_bool(guard, verb, "guard")
        require_choice(shared, ("error", "freeze"), verb, "shared")
        require_choice(interval, ("epoch", "step"), verb, "interval")
        require_choice(on_missing, ("warn", "error", "add"), verb, "on_missing")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ArgumentError(f"{verb}(lr={short_repr(lr)}): expected a number > 0 or None. Fix: lr=1e-4.")
        if schedule is not None:
            check_schedule(schedule, verb)
        if schedule is None and (groups is not None or lr is not None):
            raise ArgumentError(
                f"{verb}(groups=..., lr=...) configure the unfreezing schedule but schedule=None. "
                "Fix: pass schedule= (e.g. 'one_group_per_epoch') or drop groups/lr."
            )
        self.freeze = list(freeze)
        self.mode: Mode | None = mode
        self.train_bn = train_bn
        self.shared: Shared = shared
        self.schedule = schedule
        self.groups = None if groups is None else list(groups)
        self.lr = lr
        self.interval: Interval = interval
        self.guard = guard
        self.on_missing: OnMissing = on_missing
        self.warmup = warmup
        self.warmup_start = float(warmup_start)
        self.warmup_curve: WarmupCurve = warmup_curve
        self.model: nn.Module | None = None
        self.unfreezing: GradualUnfreezing | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[Any] = []
        self._pending: dict[str, Any] | None = None
        self._guard: Guard | None = None
        self._planned: int | None = None
        self._before: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks

    def apply_plan(self, model: nn.Module) -> None:
        """Freeze the plan's selection on ``model`` (once per model; later calls do nothing).

        Raises:
            SelectorError: a selector of the plan matches nothing.
        """
        require_module(model, "FreezeRun.apply_plan")
        if self._planned == id(model):
            return
        self._before = freeze_state(model)  # what attach() puts back if the run cannot start
        if self.freeze:
            freeze(model, *self.freeze, mode=self.mode, train_bn=self.train_bn, shared=self.shared)
        self._planned = id(model)

    def attach(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any] = ()
    ) -> list[Problem]:
        """Check the trainer's optimizers, start the schedule and the guard, restore a pending state.

        Args:
            model: the model being trained (unwrapped).
            optimizers: the optimizers the trainer built (plain ``torch.optim`` optimizers).
            schedulers: the LR schedulers of the trainer; the one driving the first optimizer is
                passed to :class:`~torchfreeze.GradualUnfreezing` (``scheduler=``), which joins each
                new group to it.

        Returns:
            The problems :func:`torchfreeze.check` found (each was also warned about).

        Raises:
            ArgumentError: ``on_missing="error"`` and a trainable parameter is in no optimizer,
                or a schedule entry that does not fit the model.
            CheckpointError: a restored state that does not fit the model.
        """
        require_module(model, "FreezeRun.attach")
        try:
            return self._attach(model, optimizers, schedulers)
        except BaseException:
            # the run cannot start (a schedule entry that names nothing, a state that does not fit):
            # the model goes back to how it was before the plan froze it, pins included
            if self._before is not None and self._planned == id(model):
                load_freeze_state(model, self._before)
                self._planned = None
            raise

    def _attach(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
    ) -> list[Problem]:
        self.model = model
        self.optimizers = list(optimizers)
        self.schedulers = list(schedulers)
        problems = self._check(model)
        if self.schedule is not None:
            if not self.optimizers:
                raise ArgumentError(
                    "an unfreezing schedule needs an optimizer, but the trainer built none. "
                    "Fix: return one from configure_optimizers (or pass schedule=None)."
                )
            first = self.optimizers[0]
            attached = [s for s in self.schedulers if getattr(s, "optimizer", None) is first]
            if len(attached) > 1:
                raise ArgumentError(
                    f"{len(attached)} LR schedulers drive the first optimizer; the unfreezing schedule can keep "
                    "one consistent. Fix: combine them (torch.optim.lr_scheduler.SequentialLR / ChainedScheduler)."
                )
            self.unfreezing = GradualUnfreezing(
                model,
                first,
                self.schedule,
                groups=self.groups,
                lr=self.lr,
                shared=self.shared,
                scheduler=attached[0] if attached else None,
                warmup=self.warmup,
                warmup_start=self.warmup_start,
                warmup_curve=self.warmup_curve,
            )
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(model, pending)
        if self.guard and self._guard is None:
            self._guard = guard(model, [_inner(o) for o in self.optimizers])
            self._guard.__enter__()
        return problems

    def advance_to(self, count: int) -> bool:
        """Step the schedule until it has seen ``count`` units (epochs or steps).

        Idempotent: a count already reached changes nothing, so calling it at every boundary,
        also after a resume, gives the same run.

        Returns:
            Whether the set of trainable parameters changed (a DDP wrapper must then be rebuilt).
        """
        if self.unfreezing is None or self.model is None or self.unfreezing.last >= count:
            return False
        before = set(trainable_map(self.model))
        while self.unfreezing.last < count:
            self.unfreezing.step()
        return set(trainable_map(self.model)) != before

    def close(self, *, failed: bool = False) -> None:
        """Stop the guard (verifying once more unless the run failed)."""
        g, self._guard = self._guard, None
        if g is not None:
            if failed:
                g.__exit__(RuntimeError, RuntimeError("training failed"), None)
            else:
                g.__exit__(None, None, None)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The freeze state and the schedule, as plain JSON-able values."""
        if self.model is None:
            return {"format": _FORMAT, "version": 1, "freeze_state": None, "schedule": None}
        return {
            "format": _FORMAT,
            "version": 1,
            "freeze_state": freeze_state(self.model),
            "schedule": None if self.unfreezing is None else self.unfreezing.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`: now if attached, else at :meth:`attach`.

        Raises:
            CheckpointError: not a state written by :meth:`state_dict`.
        """
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointError(
                f"FreezeRun.load_state_dict(state=<{short_repr(got)}>): expected the dict FreezeRun.state_dict() "
                "wrote (format 'torchfreeze.integrations.run'). Fix: resume from a checkpoint of a run that used "
                "the same callback."
            )
        if state.get("freeze_state") is None:
            return  # saved before training started: nothing to restore
        if self.model is None:
            self._pending = dict(state)
        else:
            self._restore(self.model, state)

    def _restore(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        saved_schedule = state.get("schedule")
        if (saved_schedule is None) != (self.unfreezing is None):
            raise CheckpointError(
                "the checkpoint was written with"
                + (" an unfreezing schedule" if saved_schedule is not None else "out an unfreezing schedule")
                + " but this callback has"
                + ("" if self.unfreezing is not None else " none")
                + ". Fix: resume with the callback configured as in the interrupted run."
            )
        if self.unfreezing is not None and isinstance(saved_schedule, Mapping):
            self.unfreezing.load_state_dict(saved_schedule)
        else:
            load_freeze_state(model, state["freeze_state"])

    # ------------------------------------------------------------------ check

    def _check(self, model: nn.Module) -> list[Problem]:
        if not self.optimizers:
            problems = check(model)
        else:
            found: dict[tuple[str, tuple[str, ...]], Problem] = {}
            missing: set[str] | None = None
            for opt in self.optimizers:
                for p in check(model, _inner(opt)):
                    if p.code == "trainable-not-in-optimizer":
                        missing = set(p.names) if missing is None else missing & set(p.names)
                    else:
                        found.setdefault((p.code, p.names), p)
            problems = list(found.values())
            held = {id(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
            names = [n for n, p in trainable_map(model).items() if id(p) not in held]
            if names:
                problems.append(_missing_problem(names))
        for p in problems:
            if p.code == "trainable-not-in-optimizer":
                if self.on_missing == "error":
                    raise ArgumentError(f"the trainer's optimizers miss trainable parameters: {p}")
                if self.on_missing == "add" and self.optimizers:
                    add_unfrozen(model, self.optimizers[0], lr=self.lr)
                    continue
            warnings.warn(f"torchfreeze: {p}", UserWarning, stacklevel=3)
        return problems


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer a trainer's wrapper (accelerate's ``AcceleratedOptimizer``) steps."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _missing_problem(names: list[str]) -> Problem:
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return Problem(
        "trainable-not-in-optimizer",
        tuple(names),
        f"{len(names)} trainable parameter(s) are in no optimizer and will never learn: {shown}.",
        "build the optimizer from torchfreeze.param_groups(model, lr) after freezing, or pass on_missing='add'.",
    )
