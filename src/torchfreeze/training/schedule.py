"""Gradual unfreezing (ULMFiT style) that survives a restart exactly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeGuard, cast

import torch
from torch import nn

from torchfreeze._core.checks import require_choice, require_module, short_repr
from torchfreeze._core.select import Selector, resolve
from torchfreeze._core.wrappers import require_no_raw_ddp, unwrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.nn import freeze_to, is_frozen, layer_groups, unfreeze
from torchfreeze.nn.freezing import Shared
from torchfreeze.training._args import layer_group_list, positive, saved_groups, schedule_kind
from torchfreeze.training._progressive import check_overlap
from torchfreeze.training.optim import _add_groups, _held_ids, _new_groups, _warn_unjoined
from torchfreeze.training.schedulers import (
    _copy_entry,
    _plain,
    check_scheduler,
    check_warmup,
    join,
    set_warm,
    warm_snapshot,
    warmup_factor,
)
from torchfreeze.training.state import _validate_freeze_state, freeze_state, load_freeze_state

__all__ = ["GradualUnfreezing", "Preset", "WarmupCurve", "check_schedule"]

_FORMAT = "torchfreeze.gradual_unfreezing"
Preset = Literal["one_group_per_epoch", "one_group_per_step"]
WarmupCurve = Literal["linear", "geometric"]
_PRESETS: dict[str, int] = {"one_group_per_epoch": 1, "one_group_per_step": 1}


def _is_count(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


class GradualUnfreezing:
    """Unfreeze a model step by step on a schedule, keeping the optimizer in sync.

    The schedule maps a unit count (epochs or steps: whatever you call :meth:`step` once per) to
    what is trainable from then on:

    - a selector (anything :func:`torchfreeze.select` accepts): unfreeze it;
    - an int ``k``: exactly the last ``k`` layer groups are trainable, the others frozen
      (``freeze_to(model, len(groups) - k)``);
    - a preset instead of a dict: ``"one_group_per_epoch"`` (or an int ``e``: one more group
      every ``e`` units): ULMFiT. Only the last group trains at first, one more group joins at
      each unit, input side last.

    Entries at ``0`` apply when the scheduler is created; ``step()`` advances the count by one
    and applies the entry for the new count. After any change, parameters that became
    trainable are added to the optimizer (:func:`torchfreeze.add_unfrozen`, one new group per
    unfreeze and layer group, with the lr the :func:`torchfreeze.param_groups` ladder gives its
    layer group where the schedule is now, or ``lr``).

    Resuming: save ``scheduler.state_dict()`` with the model and optimizer state; in the new
    process build model, optimizer and scheduler the same way, then call
    ``scheduler.load_state_dict(...)`` *before* ``optimizer.load_state_dict(...)``: it restores
    the freeze state and recreates the optimizer groups the run had added, so the optimizer
    state then fits.

    Args:
        model: the model.
        optimizer: its optimizer (typically over :func:`torchfreeze.param_groups`).
        schedule: a dict ``{count: selector | group count}``, a preset name, or an int period.
        groups: layer groups (selectors, input side first) for int entries and presets;
            default :func:`torchfreeze.layer_groups`.
        lr: base learning rate of the groups added to the optimizer; default the ladder of
            :func:`torchfreeze.param_groups` at the current lr (:func:`torchfreeze.add_unfrozen`).
        shared: tied parameters across groups, as for :func:`torchfreeze.freeze`: ``"error"``
            refuses a tie between the frozen and trainable sides; ``"freeze"`` keeps a tied
            parameter frozen until every group that uses it is unfrozen.
        scheduler: the ``torch.optim.lr_scheduler`` scheduler driving ``optimizer``: each new
            group joins it, following the same curve scaled to its own base lr.
        warmup: warm up each newly unfrozen group over this many units of :meth:`step`
            (0: none). Its lr starts at ``warmup_start`` times the lr its layer group should have
            and reaches it after ``warmup`` units; with a scheduler, its base/peak lrs are scaled
            the same way, so chainable and closed-form schedulers both carry the factor. Lightning's
            ``BackboneFinetuning`` (backbone at 0.1x the head's current lr, raised each epoch) is
            ``warmup_start=0.1, warmup_curve="geometric"``.
        warmup_start: the starting ratio, in (0, 1].
        warmup_curve: ``"linear"`` (``start + (1 - start) * t / warmup``) or ``"geometric"``
            (``start ** (1 - t / warmup)``: the same factor every unit).

    Raises:
        ArgumentError: a malformed schedule (negative key, group count out of range, unknown
            preset), a bad ``lr`` or warm-up, a scheduler torchfreeze cannot extend.
        SelectorError: a selector in the schedule matches nothing.

    Nothing changes when the constructor raises: everything is validated first.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(torchfreeze.param_groups(torchfreeze.freeze_to(m, -1), 0.1), lr=0.1)
        >>> sched = GradualUnfreezing(m, opt, "one_group_per_epoch")
        >>> [p.requires_grad for p in m.parameters()]
        [False, False, False, False, True, True]
        >>> sched.step()
        >>> [p.requires_grad for p in m.parameters()], len(opt.param_groups)
        ([False, False, True, True, True, True], 2)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Mapping[int, Selector | int] | Preset | int,
        *,
        groups: Sequence[Selector] | None = None,
        lr: float | None = None,
        shared: Shared = "error",
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        warmup: int = 0,
        warmup_start: float = 0.1,
        warmup_curve: WarmupCurve = "linear",
    ) -> None:
        require_module(model, "GradualUnfreezing")
        model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
        require_no_raw_ddp(model, "GradualUnfreezing")  # it will change requires_grad: refuse a raw live DDP now
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(
                f"GradualUnfreezing(optimizer={short_repr(optimizer)}): expected a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}. Fix: pass the optimizer that trains the model."
            )
        if lr is not None:
            positive(lr, "lr", "GradualUnfreezing")  # validated before anything changes
        require_choice(shared, ("error", "freeze"), "GradualUnfreezing", "shared")
        check_warmup(warmup, warmup_start, warmup_curve, "GradualUnfreezing")
        check_scheduler(scheduler, optimizer, "GradualUnfreezing")
        self.scheduler = scheduler
        self.warmup = warmup
        self.warmup_start = float(warmup_start)
        self.warmup_curve: WarmupCurve = warmup_curve
        self.model = model
        self.optimizer = optimizer
        self.lr = lr
        self.shared: Shared = shared
        self.groups: list[Selector] = layer_group_list(groups, "GradualUnfreezing") or list(layer_groups(model))
        n = len(self.groups)
        schedule_kind(schedule, sorted(_PRESETS), "GradualUnfreezing")
        entries: object = schedule
        if isinstance(entries, str):
            if entries not in _PRESETS:
                raise ArgumentError(
                    f"GradualUnfreezing(schedule={short_repr(entries)}): not a preset; expected one of "
                    f"{sorted(_PRESETS)}. Fix: pass one of them, an int period or a dict {{count: selector}}."
                )
            entries = _PRESETS[entries]
        if _is_count(entries):
            period = entries
            if period < 1:
                raise ArgumentError(
                    f"GradualUnfreezing(schedule={period}): a period must be an int >= 1 (units per new group). "
                    "Fix: pass e.g. schedule=1 (one more group every epoch)."
                )
            entries = {i * period: i + 1 for i in range(n)}
        entries = cast(Mapping[int, Any], entries)
        members = [resolve(model, group, verb="GradualUnfreezing", argument="groups") for group in self.groups]
        check_overlap(self.groups, members, "GradualUnfreezing")  # as ProgressiveFreezing: each parameter in one group
        plan: dict[int, Selector | int] = {}
        for key in sorted(entries, key=lambda k: (not _is_count(k), k if _is_count(k) else 0)):
            value = entries[key]
            if key < 0:
                raise ArgumentError(
                    f"GradualUnfreezing(schedule={short_repr(schedule)}): the key {key} is negative; expected "
                    "int keys >= 0 (an epoch or step count). Fix: count from 0."
                )
            if _is_count(value):
                if not 0 <= value <= n:
                    raise ArgumentError(
                        f"schedule[{key}]={value} asks for {value} trainable layer group(s) but the model has "
                        f"{n}: {self.groups!r}. Fix: use a count between 0 and {n}, or pass groups=[...]."
                    )
            else:
                resolve(model, value, verb="GradualUnfreezing", argument="schedule")  # nothing changed yet
            plan[key] = value
        self.schedule = plan
        self.last = 0
        self._added: list[dict[str, Any]] = []
        self._apply(0)

    # ----------------------------------------------------------------------------------

    def _apply(self, count: int) -> None:
        if count not in self.schedule:
            return
        value = self.schedule[count]
        before = freeze_state(self.model)
        try:
            if _is_count(value):
                freeze_to(self.model, len(self.groups) - value, groups=self.groups, shared=self.shared)
            else:
                unfreeze(self.model, cast(Selector, value), shared=self.shared)
            check_scheduler(self.scheduler, self.optimizer, "GradualUnfreezing.step")
            planned = _new_groups(self.optimizer, self.model, self.lr, groups=self.groups, exclude=self._warming(count))
        except BaseException:
            # e.g. an LBFGS optimizer that cannot take the new group: the model goes back as it was
            load_freeze_state(self.model, before)
            raise
        if planned:
            _warn_unjoined(self.optimizer, self.scheduler, "GradualUnfreezing")
        first = len(self.optimizer.param_groups)
        added = _add_groups(self.optimizer, self.model, planned, self.scheduler)
        for k, (item, options) in enumerate(zip(planned, added)):
            entry: dict[str, Any] = {
                "params": list(item.names),
                "options": _plain(options),
                "ref": item.ref,
                "scale": item.scale,
                "index": first + k,
                "born": count,
            }
            if self.warmup:
                entry.update(warm_snapshot(self.optimizer, self.scheduler, first + k))
                self._set_warm(entry, self._factor(0), 1.0)
            self._added.append(entry)

    # ----------------------------------------------------------------------------- warm-up

    def _factor(self, t: int) -> float:
        return warmup_factor(t, self.warmup, self.warmup_start, self.warmup_curve)

    def _warming(self, count: int) -> set[int]:
        """Optimizer groups still warming up at ``count`` (never the reference of a new group)."""
        return {int(e["index"]) for e in self._added if "orig" in e and count - int(e["born"]) <= self.warmup}

    def _set_warm(self, entry: Mapping[str, Any], new: float, old: float) -> None:
        set_warm(self.optimizer, self.scheduler, entry, new, old)

    def step(self) -> None:
        """Advance one unit (call once per epoch, or once per step) and apply the schedule.

        Raises:
            ArgumentError: the optimizer cannot take the newly trainable parameters (LBFGS);
                the model, the optimizer and the count are then left as they were.

        Example:
            >>> import torch, torchfreeze
            >>> m = torchfreeze.freeze_to(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), -1)
            >>> sched = GradualUnfreezing(m, torch.optim.SGD(m[1].parameters(), lr=0.1), {1: "0"})
            >>> sched.step(); sched.last, m[0].weight.requires_grad
            (1, True)
        """
        count = self.last + 1
        self._apply(count)
        for entry in self._added:
            t = count - int(entry["born"])
            if "orig" in entry and 0 < t <= self.warmup:
                self._set_warm(entry, self._factor(t), self._factor(t - 1))
        self.last = count

    @property
    def trainable_groups(self) -> int:
        """How many of the last layer groups currently have a trainable parameter."""
        count = 0
        for g in reversed(self.groups):
            if is_frozen(self.model, g):
                break
            count += 1
        return count

    # ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: count, freeze state and the optimizer groups added.

        Returns:
            A dict of plain Python values (``torch.load(weights_only=True)`` accepts it).

        Example:
            >>> import torch, torchfreeze
            >>> m = torchfreeze.freeze_to(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), -1)
            >>> sched = GradualUnfreezing(m, torch.optim.SGD(m[1].parameters(), lr=0.1), {1: "0"})
            >>> sched.step()
            >>> [(g["params"], g["options"]["lr"]) for g in sched.state_dict()["added_groups"]]
            [(['0.weight', '0.bias'], 0.1)]
        """
        return {
            "format": _FORMAT,
            "version": 2,
            "last": self.last,
            "schedule_keys": sorted(self.schedule),
            "freeze_state": freeze_state(self.model),
            "added_groups": [_copy_entry(g) for g in self._added],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore the count, the model's freeze state and the optimizer groups added.

        Call it before ``optimizer.load_state_dict``. Everything is validated first; on error
        nothing changes.

        Args:
            state: the dict returned by :meth:`state_dict` (possibly through ``torch.save``/``load``).

        Raises:
            ArgumentError: the state is not from a GradualUnfreezing with the same schedule, or
                the optimizer already holds a different set of groups.
            FreezeStateError: the freeze state does not fit the model.

        Example:
            >>> import torch, torchfreeze
            >>> def build():
            ...     m = torchfreeze.freeze_to(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), -1)
            ...     opt = torch.optim.SGD(m[1].parameters(), lr=0.1)
            ...     return m, opt, GradualUnfreezing(m, opt, {1: "0"})
            >>> m, opt, sched = build()
            >>> sched.step()
            >>> m2, opt2, sched2 = build()  # a fresh process
            >>> sched2.load_state_dict(sched.state_dict())
            >>> sched2.last, m2[0].weight.requires_grad, len(opt2.param_groups)
            (1, True, 2)
        """
        where = "GradualUnfreezing.load_state_dict"
        fix = "Fix: pass the dict GradualUnfreezing.state_dict() returned, unmodified."
        if not isinstance(state, Mapping):
            raise ArgumentTypeError(
                f"{where}(state={short_repr(state)}): expected the dict GradualUnfreezing.state_dict() "
                f"returned, got {type(state).__name__}. {fix}"
            )
        if state.get("format") != _FORMAT:
            raise ArgumentError(
                f"{where}(state=...): state['format']={short_repr(state.get('format'))}; expected "
                f"{_FORMAT!r} (a freeze state or optimizer state is not a scheduler state). {fix}"
            )
        version = state.get("version", 1)
        if not _is_count(version) or version not in (1, 2):
            raise ArgumentError(
                f"{where}(state=...): state['version']={short_repr(version)}: this torchfreeze reads "
                "GradualUnfreezing states of version 1 and 2. Fix: resume with the torchfreeze that saved it, "
                "or upgrade torchfreeze."
            )
        if list(state.get("schedule_keys", [])) != sorted(self.schedule):
            raise ArgumentError(
                f"{where}(state=...): saved with schedule keys {short_repr(state.get('schedule_keys'))} but this "
                f"scheduler has {short_repr(sorted(self.schedule))}. Fix: build the scheduler with the same "
                "schedule before resuming."
            )
        last = state.get("last")
        if not _is_count(last) or last < 0:
            raise ArgumentError(f"{where}(state=...): state['last']={short_repr(last)}; expected an int >= 0. {fix}")
        _validate_freeze_state(
            self.model, state.get("freeze_state"), strict=True, arg="state['freeze_state']", verb=f"{where}(state=...)"
        )
        added = saved_groups(state.get("added_groups", []), self.optimizer, where)
        by_name = dict(self.model.named_parameters(remove_duplicate=False))
        held = _held_ids(self.optimizer)
        todo: list[tuple[list[str], dict[str, Any], int, float]] = []
        for g in added:
            names = list(g["params"])
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ArgumentError(
                    f"{where}(state=...): state['added_groups'] names parameters the model lacks: "
                    f"{short_repr(unknown[:5])}. Fix: resume into the model the state was saved from."
                )
            inside = [n for n in names if id(by_name[n]) in held]
            if inside and len(inside) != len(names):
                raise ArgumentError(
                    f"{where}(state=...): the optimizer already holds some but not all parameters of a saved "
                    f"group ({short_repr(inside[:3])}). Fix: build the optimizer exactly as in the interrupted run."
                )
            ref, scale = g.get("ref", 0), g.get("scale", 1.0)
            if not _is_count(ref) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
                raise ArgumentError(
                    f"{where}(state=...): state['added_groups'] has ref={short_repr(ref)}, "
                    f"scale={short_repr(scale)}; expected an int and a float. {fix}"
                )
            if not inside:
                if ref >= len(self.optimizer.param_groups) + len(todo):
                    raise ArgumentError(
                        f"{where}(state=...): state['added_groups'] refers to optimizer group {ref}, which does "
                        "not exist. Fix: build the optimizer exactly as in the interrupted run."
                    )
                todo.append((names, dict(g["options"]), ref, float(scale)))
        if todo:
            check_scheduler(self.scheduler, self.optimizer, "GradualUnfreezing.load_state_dict")
        load_freeze_state(self.model, state["freeze_state"])
        for names, options, ref, scale in todo:  # the saved options; optimizer/scheduler state overwrite them next
            self.optimizer.add_param_group({"params": [by_name[n] for n in names], **options})
            join(self.optimizer, self.scheduler, ref, scale)
        self.last = last
        self._added = [_copy_entry(g) for g in added]

    def __repr__(self) -> str:
        return f"GradualUnfreezing(last={self.last}, schedule={self.schedule!r})"


def check_schedule(schedule: object, verb: str) -> None:
    """Check what can be checked of a schedule before the model exists: type, preset name, keys, period.

    Trainer callbacks call it in their constructor, so a typo fails at once, not inside ``fit``.

    Raises:
        ArgumentTypeError: not a dict, preset name or int; a key that is not an int.
        ArgumentError: an unknown preset, an empty dict, a negative key, a period below 1.

    >>> check_schedule("one_group_per_epch", "FreezeCallback")
    Traceback (most recent call last):
    ...
    torchfreeze.errors.ArgumentError: FreezeCallback(schedule='one_group_per_epch'): not a preset; ...
    """
    presets = sorted(_PRESETS)
    schedule_kind(schedule, presets, verb)
    head = f"{verb}(schedule={short_repr(schedule)})"
    if isinstance(schedule, str) and schedule not in presets:
        raise ArgumentError(f"{head}: not a preset; expected one of {list(presets)}. Fix: pass one of them.")
    if isinstance(schedule, int) and schedule < 1:
        raise ArgumentError(f"{head}: a period must be an int >= 1. Fix: schedule=1 (one more group per unit).")
    if isinstance(schedule, Mapping):
        negative = [k for k in schedule if k < 0]
        if negative:
            raise ArgumentError(f"{head}: the key {negative[0]} is negative. Fix: count epochs or steps from 0.")
