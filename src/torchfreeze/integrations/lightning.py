"""PyTorch Lightning: a callback that freezes, unfreezes on schedule, guards and resumes exactly.

Requires the ``lightning`` extra (``pip install 'torchfreeze[lightning]'``); Lightning is
imported when this module is, never by ``import torchfreeze``. See ``docs/lightning.md``.

Unlike Lightning's ``BaseFinetuning``, the freeze state and the schedule travel in the
checkpoint and are restored before the optimizer state is loaded (``BaseFinetuning``
re-freezes on resume what had been unfrozen), parameters are matched by identity, and the
DDP wrapper is rebuilt when the set of trainable parameters changes (``BaseFinetuning`` does
not support unfreezing under DDP).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from torchfreeze._core.mode import Mode
from torchfreeze._core.select import Selector
from torchfreeze.distributed import DDPHandle, wrap
from torchfreeze.integrations.plan import FreezeRun, Interval, OnMissing, Schedule
from torchfreeze.nn.freezing import Shared
from torchfreeze.training import Problem
from torchfreeze.training.schedule import WarmupCurve

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchfreeze.integrations.lightning needs PyTorch Lightning. Fix: pip install 'torchfreeze[lightning]'."
    ) from _err

__all__ = ["FreezeCallback"]


class FreezeCallback(pl.Callback):
    """Apply a freeze plan, run an unfreezing schedule and keep it all in Lightning checkpoints.

    - ``setup`` (before ``configure_optimizers``): freezes the plan's selection (``freeze``,
      ``mode``, ``train_bn``), so the optimizers are built over what trains.
    - ``on_fit_start``: checks the optimizers with :func:`torchfreeze.check` and reports (or
      adds, ``on_missing="add"``) trainable parameters no optimizer holds; starts the
      :class:`~torchfreeze.GradualUnfreezing` schedule on the first optimizer; on resume, restores
      the freeze state and the optimizer groups the run had added, before Lightning loads the
      optimizer state; starts the guard (``guard=True``).
    - under the DDP strategy (``on_fit_start``), Lightning's DDP is replaced by a
      :func:`torchfreeze.distributed.wrap` handle (same options and communication hooks), which
      builds a new DDP whenever what trains changes, so unfrozen parameters are all-reduced.
    - at each epoch (or step, ``interval="step"``) start: advances the schedule to
      ``trainer.current_epoch`` (``trainer.global_step``), adds the new optimizer groups, joined
      to the LR scheduler.
    - checkpoints: the freeze state and the schedule are the callback's state
      (``checkpoint["callbacks"]``).

    Args:
        freeze: selectors of what to freeze at fit start.
        mode: mode pinned on frozen modules (``"eval"``: frozen BatchNorm keeps its statistics).
        train_bn: keep normalisation layers in the selection trainable.
        shared: tied parameters, as in :func:`torchfreeze.freeze`.
        schedule: a :class:`~torchfreeze.GradualUnfreezing` schedule, or ``None``.
        groups: layer groups of the schedule (default :func:`torchfreeze.layer_groups`).
        lr: learning rate of the groups the schedule adds (default: the optimizer's).
        interval: ``"epoch"`` or ``"step"`` (optimizer steps, ``trainer.global_step``).
        guard: verify after every optimizer step that frozen tensors are bit-identical.
        on_missing: ``"warn"``, ``"error"`` or ``"add"`` for trainable parameters in no optimizer.
        warmup, warmup_start, warmup_curve: warm-up of each newly unfrozen group (see
            :class:`~torchfreeze.GradualUnfreezing`); ``warmup_start=0.1, warmup_curve="geometric"``
            is Lightning's ``BackboneFinetuning``.

    Raises:
        ArgumentTypeError, ArgumentError: a bad option (see :class:`FreezeRun`).

    Example:
        >>> from torchfreeze.integrations.lightning import FreezeCallback
        >>> cb = FreezeCallback(freeze=["backbone"], mode="eval", schedule={2: "backbone.2"})
        >>> cb.run.interval
        'epoch'
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
        super().__init__()
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
        #: What :func:`torchfreeze.check` found at fit start.
        self.problems: list[Problem] = []
        #: Under the DDP strategy: the :func:`torchfreeze.distributed.wrap` handle that replaced
        #: Lightning's DDP and re-wraps the module whenever what trains changes.
        self.ddp: DDPHandle | None = None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.run.apply_plan(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ddp = _adopt_ddp(trainer)  # first: restoring the freeze state below then re-wraps
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        self.problems = self.run.attach(pl_module, trainer.optimizers, schedulers)
        self._advance(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run.interval == "epoch":
            self._advance(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.run.interval == "step":
            self._advance(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.close()
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.run.close(failed=True)
        self._release()

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state_dict)

    # ------------------------------------------------------------------ helpers

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = trainer.current_epoch if self.run.interval == "epoch" else trainer.global_step
        changed = self.run.advance_to(count)
        strategy = trainer.strategy
        if changed and self.ddp is None and strategy.model is not None and strategy.model is not pl_module:
            warnings.warn(
                f"torchfreeze: the trainable parameters changed under {type(strategy).__name__}, which wraps the "
                "model; only the DDP strategy is re-wrapped. Fix: use strategy='ddp', or unfreeze before fit.",
                UserWarning,
                stacklevel=2,
            )

    def _release(self) -> None:
        handle, self.ddp = self.ddp, None
        if handle is not None:
            handle.release()


def _adopt_ddp(trainer: pl.Trainer) -> DDPHandle | None:
    """Replace the DDP strategy's wrapper by a :func:`torchfreeze.distributed.wrap` handle.

    DDP fixes at construction the parameters it all-reduces; the handle builds a new DDP (with
    the strategy's options and communication hooks) whenever a torchfreeze verb changes what
    trains, and hands it to the strategy, so an unfrozen layer is reduced on every rank.
    """
    strategy = trainer.strategy
    module = strategy.lightning_module
    if (
        not (isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel))
        or module is None
    ):
        return None

    def on_wrap(ddp: DistributedDataParallel) -> None:
        strategy.model = ddp
        strategy._register_ddp_hooks()

    kwargs = dict(strategy._ddp_kwargs)
    kwargs.setdefault("device_ids", strategy.determine_ddp_device_ids())
    return wrap(module, on_wrap=on_wrap, **kwargs)
