"""Hugging Face ``Trainer``: a callback that freezes, unfreezes on schedule, guards and resumes exactly.

Requires the ``trainer`` extra (transformers and accelerate); transformers is imported when this
module is, never by ``import torchfreeze``. See ``docs/transformers.md``.

A ``TrainerCallback`` is called before the Trainer builds its optimizer (``on_init_end``) and
after it has loaded the optimizer state of a resumed run (``on_train_begin``), never in between;
restoring the groups an unfreezing schedule added must happen exactly there. So the callback
works with :class:`FreezeTrainer`, a ``Trainer`` subclass that overrides the two documented
extension points ``create_optimizer`` and ``create_scheduler`` (and ``train``, to learn the
checkpoint being resumed). With a plain ``Trainer`` the callback still freezes, checks,
unfreezes and guards a fresh run, but refuses to resume one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchfreeze._core.files import read_regular_file, write_bytes_atomic
from torchfreeze._core.mode import Mode
from torchfreeze._core.select import Selector
from torchfreeze.errors import ArgumentError, CheckpointError
from torchfreeze.integrations.plan import FreezeRun, Interval, OnMissing, Schedule
from torchfreeze.nn.freezing import Shared
from torchfreeze.training import Problem
from torchfreeze.training.schedule import WarmupCurve

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchfreeze.integrations.transformers needs transformers and accelerate. "
        "Fix: pip install 'torchfreeze[trainer]'."
    ) from _err

__all__ = ["FreezeCallback", "FreezeTrainer", "STATE_FILE"]

#: The file written into every checkpoint folder (``checkpoint-<step>/``).
STATE_FILE = "torchfreeze_state.json"
_MAX_STATE_BYTES = 16 * 1024 * 1024


class FreezeCallback(TrainerCallback):
    """Apply a freeze plan, run an unfreezing schedule and keep its state in every checkpoint.

    - ``on_init_end`` (and :meth:`FreezeTrainer.create_optimizer`): freezes the plan's selection,
      so the Trainer's optimizer holds only what trains.
    - :meth:`FreezeTrainer.create_scheduler`: checks the optimizer (:func:`torchfreeze.check`),
      starts the schedule with the Trainer's LR scheduler (each new group joins it), and on resume
      restores the freeze state and the optimizer groups from ``torchfreeze_state.json`` before the
      Trainer loads ``optimizer.pt`` and ``scheduler.pt``; starts the guard (``guard=True``).
    - at each step (``interval="step"``: ``state.global_step``) or epoch start: advances the schedule.
    - ``on_save``: writes ``torchfreeze_state.json`` (freeze state and schedule, a few KiB of JSON)
      into the checkpoint folder.

    Args:
        freeze: selectors of what to freeze when training starts.
        mode: mode pinned on frozen modules (``"eval"``: no dropout, frozen statistics).
        train_bn: keep normalisation layers in the selection trainable.
        shared: tied parameters, as in :func:`torchfreeze.freeze`.
        schedule: a :class:`~torchfreeze.GradualUnfreezing` schedule, or ``None``.
        groups: layer groups of the schedule (default :func:`torchfreeze.layer_groups`).
        lr: learning rate of the groups the schedule adds (default: the optimizer's).
        interval: ``"step"`` (optimizer steps) or ``"epoch"``.
        guard: verify after every optimizer step that frozen tensors are bit-identical.
        on_missing: ``"warn"``, ``"error"`` or ``"add"`` for trainable parameters in no optimizer.
        warmup, warmup_start, warmup_curve: warm-up of each newly unfrozen group (see
            :class:`~torchfreeze.GradualUnfreezing`); ``warmup_start=0.1, warmup_curve="geometric"``
            is Lightning's ``BackboneFinetuning``.

    Raises:
        ArgumentTypeError, ArgumentError: a bad option (see :class:`~torchfreeze.integrations.FreezeRun`).

    Example:
        >>> cb = FreezeCallback(freeze=["bert.embeddings", "bert.encoder"], mode="eval",
        ...                     schedule={100: "bert.encoder.layer.11"}, interval="step")
        >>> cb.run.interval
        'step'
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
        interval: Interval = "step",
        guard: bool = False,
        on_missing: OnMissing = "warn",
        warmup: int = 0,
        warmup_start: float = 0.1,
        warmup_curve: WarmupCurve = "linear",
    ) -> None:
        self.run = FreezeRun(
            freeze=freeze,
            mode=mode,
            train_bn=train_bn,
            shared=shared,
            schedule=schedule,
            groups=groups,
            lr=lr,
            interval=interval,
            guard=guard,
            on_missing=on_missing,
            warmup=warmup,
            warmup_start=warmup_start,
            warmup_curve=warmup_curve,
        )
        #: What :func:`torchfreeze.check` found when training started.
        self.problems: list[Problem] = []
        self.resume_from: Path | None = None
        self._attached = False

    # ------------------------------------------------------------------ called by FreezeTrainer

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Check the optimizer, start schedule and guard, restore the resumed checkpoint's state.

        Raises:
            CheckpointError: the resumed checkpoint has no (or a malformed) ``torchfreeze_state.json``.
        """
        self.run.apply_plan(model)
        if self.resume_from is not None:
            self.run.load_state_dict(read_state(self.resume_from))
        self.problems = self.run.attach(model, [optimizer], [] if scheduler is None else [scheduler])
        self._attached = True

    # ------------------------------------------------------------------ TrainerCallback hooks

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if isinstance(model, nn.Module):
            self.run.apply_plan(model)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._attached:
            return
        if state.global_step > 0:
            raise ArgumentError(
                "FreezeCallback cannot resume under a plain transformers.Trainer: the optimizer state was loaded "
                "before any callback could restore the unfrozen groups. Fix: use "
                "torchfreeze.integrations.transformers.FreezeTrainer (a Trainer subclass) instead of Trainer."
            )
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if isinstance(model, nn.Module) and isinstance(optimizer, torch.optim.Optimizer):
            self.attach(model, optimizer, kwargs.get("lr_scheduler"))

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.run.interval == "epoch":
            self.run.advance_to(math.floor((state.epoch or 0.0) + 1e-6))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.run.interval == "step":
            self.run.advance_to(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                write_state(folder, self.run.state_dict())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.run.close()
        self._attached = False
        self.resume_from = None


def write_state(folder: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` as ``folder/torchfreeze_state.json`` (atomically)."""
    data = json.dumps(state, indent=1, sort_keys=True).encode()
    return write_bytes_atomic(Path(folder) / STATE_FILE, data, verb="FreezeCallback.on_save", argument="folder")


def read_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``folder/torchfreeze_state.json`` (a regular file of at most 16 MiB).

    Raises:
        CheckpointError: the file is missing, too large, not a regular file or not a JSON object.
    """
    path = Path(folder) / STATE_FILE
    try:
        loaded = json.loads(read_regular_file(path, max_bytes=_MAX_STATE_BYTES))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"resume_from_checkpoint={str(folder)!r}: cannot read {STATE_FILE} ({type(err).__name__}: "
            f"{str(err)[:120]}). Fix: resume from a checkpoint written by a run with FreezeCallback."
        ) from err
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(loaded).__name__}.")
    return loaded


class FreezeTrainer(Trainer):
    """A ``transformers.Trainer`` that gives its :class:`FreezeCallback` the moments it needs.

    It overrides ``create_optimizer`` (the plan is applied first), ``create_scheduler`` (the
    callback attaches to the optimizer and scheduler, restoring a resumed run's groups before
    the Trainer loads their state) and ``train`` (to learn which checkpoint is resumed). Use it
    exactly like ``Trainer``, with a :class:`FreezeCallback` in ``callbacks``.

    Example:
        >>> issubclass(FreezeTrainer, Trainer)
        True
    """

    def _freeze_callbacks(self) -> list[FreezeCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, FreezeCallback)]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        folder: str | None = None
        if resume_from_checkpoint is True:
            folder = get_last_checkpoint(self.args.output_dir)  # type: ignore[no-untyped-call]
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            folder = os.fspath(resume_from_checkpoint)
        for cb in self._freeze_callbacks():
            cb.resume_from = None if folder is None else Path(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        target = self.model if model is None else model
        if isinstance(target, nn.Module):
            for cb in self._freeze_callbacks():
                cb.run.apply_plan(target)
        optimizer: torch.optim.Optimizer = super().create_optimizer(model)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        opt = self.optimizer if optimizer is None else optimizer
        if isinstance(self.model, nn.Module) and isinstance(opt, torch.optim.Optimizer):
            for cb in self._freeze_callbacks():
                if not cb._attached:
                    cb.attach(self.model, opt, scheduler)
        return scheduler
