"""The main job: ``torchfreeze demo``.

Transfer learning on a real pretrained model and real data, end to end, on a
CPU in a few minutes, without network:

1. ``get_model(name, freeze=True)``: pretrained backbone frozen and pinned in
   eval mode, new head trainable; print the summary.
2. Train the head (progress bar), report held-out accuracy.
   Unfreeze the last backbone blocks gradually (:class:`GradualUnfreezing`,
   lower learning rate for the unfrozen blocks); held-out accuracy and loss
   after every epoch.
3. Run the same recipe as a plain PyTorch script does (``requires_grad=False``,
   ``model.train()`` every epoch, AdamW over all parameters), side by side:
   both curves, what drifted in its "frozen" backbone, a PNG of both curves
   (:mod:`torchfreeze.cli.demo_compare`, :mod:`torchfreeze.cli.demo_plot`).
4. Save a trainable-only checkpoint (:func:`save_trainable`) and reload it into
   a freshly built pretrained model to show it restores the result.
5. Measure a few training steps of torchfreeze, plain freezing and full
   fine-tuning, each in a fresh process: time per step and peak memory (RSS).

Data. ``digits-cnn`` (default): scikit-learn's bundled digits, a copy of the
test set of the UCI "Optical Recognition of Handwritten Digits" data (UCI, CC BY
4.0; shipped with scikit-learn, BSD-3-Clause). The backbone was pretrained on
digits 0-4 only (``scripts/pretrain_digits.py``); the demo learns digits 5-9,
which the backbone has never seen, and reports accuracy on a stratified 30%
held-out split of them. ``minilm``: the all-MiniLM-L6-v2 encoder with a small
hand-written labelled set of 160 short English sentences in four topics
(:data:`TOPIC_TEXTS`, written for this project, MIT, in ``demo_text.json``),
40% held out. No text dataset shipped inside an installed package was found
that fits (see ``docs/demo.md``).

The data and training loop are in :mod:`torchfreeze.cli.demo_tasks`, the
frozen-vs-full measurement in :mod:`torchfreeze.cli.demo_measure`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

import torchfreeze as tf
from torchfreeze._core.files import atomic_write
from torchfreeze._core.render import percent
from torchfreeze.cli.console import Output
from torchfreeze.cli.demo_compare import Curve, side_by_side
from torchfreeze.cli.demo_measure import compare
from torchfreeze.cli.demo_tasks import (
    MODELS,
    TOPIC_TEXTS,
    TOPICS,
    ModelKey,
    ModelSetup,
    Task,
    classes,
    evaluate,
    make_task,
    train_epoch,
)
from torchfreeze.errors import ArgumentError

__all__ = ["DemoConfig", "DemoResult", "run_demo", "MODELS", "TOPICS", "TOPIC_TEXTS"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Options of ``torchfreeze demo`` (``None`` = the model's default).

    Args:
        model: ``"digits-cnn"`` (default) or ``"minilm"``.
        epochs: total epochs; the first half trains the head only, the rest
            unfreezes the last backbone blocks one by one.
        batch_size: training batch size.
        output_dir: where the checkpoints, ``results-<model>.json`` and
            ``curves-<model>.png`` are written.
        compare_steps: timed training steps of each configuration (frozen, full
            fine-tuning); ``0`` skips the comparison.
        seed: seed of the head initialisation and batch order.
        progress: show progress bars.

    >>> setup, epochs, batch = DemoConfig(epochs=2).resolved()
    >>> setup.registry, epochs, batch
    ('digits-cnn', 2, 32)
    """

    model: ModelKey = "digits-cnn"
    epochs: int | None = None
    batch_size: int | None = None
    output_dir: Path = Path("torchfreeze-demo")
    compare_steps: int = 20
    seed: int = 0
    progress: bool = True

    def resolved(self) -> tuple[ModelSetup, int, int]:
        """The model setup, epochs and batch size after defaults and validation."""
        if self.model not in MODELS:
            raise ArgumentError(
                f"model={self.model!r}: expected one of {sorted(MODELS)} (the default is 'digits-cnn')."
            )
        setup = MODELS[self.model]
        epochs = setup.epochs if self.epochs is None else self.epochs
        batch = setup.batch_size if self.batch_size is None else self.batch_size
        for name, value in (("epochs", epochs), ("batch_size", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{name}={value!r}: expected a positive integer.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ArgumentError(f"seed={self.seed!r}: expected an integer in [0, 2**63).")
        if isinstance(self.compare_steps, bool) or not isinstance(self.compare_steps, int) or self.compare_steps < 0:
            raise ArgumentError(f"compare_steps={self.compare_steps!r}: expected an integer >= 0.")
        return setup, epochs, batch


@dataclass
class DemoResult:
    """Figures of one demo run (also written to ``results-<model>.json``)."""

    model: str
    data: str
    epochs: int
    batch_size: int
    train_examples: int
    test_examples: int
    accuracy_head_only: float
    accuracy_final: float
    accuracy_reloaded: float
    trainable_parameters_head_only: int
    trainable_parameters_final: int
    total_parameters: int
    checkpoint: str
    checkpoint_bytes: int
    head_only_checkpoint_bytes: int | None
    full_model_bytes: int
    unfrozen: list[str] = field(default_factory=list)
    seconds: float = 0.0
    guard_checks: int = 0
    comparison: dict[str, Any] = field(default_factory=dict)
    side_by_side: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Trained:
    """What phases 1 and 2 (head only, then gradual unfreezing) leave behind."""

    head_epochs: int
    head_steps: int
    trainable_head: int
    accuracy_head: float
    accuracy_final: float
    head_checkpoint: Path | None
    unfrozen: list[str]
    guard_checks: int
    curve: Curve
    plan: dict[int, list[str]]


def run_demo(config: DemoConfig, *, stream: TextIO | None = None) -> DemoResult:
    """Run the demo and print its report; return the figures.

    Args:
        config: the options (see :class:`DemoConfig`).
        stream: where to print (default ``sys.stdout``).

    Returns:
        A :class:`DemoResult`.

    Raises:
        ArgumentError: bad options (nothing has been written then).

    Example (trains for a few seconds, so not run as a doctest)::

        >>> r = run_demo(DemoConfig(epochs=2, compare_steps=0, progress=False,  # doctest: +SKIP
        ...                         output_dir=Path("/tmp/tf-demo")))
        >>> r.accuracy_reloaded == r.accuracy_final  # doctest: +SKIP
        True
    """
    setup, epochs, batch = config.resolved()
    out_dir = Path(config.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArgumentError(f"output_dir={str(out_dir)!r} exists and is not a directory; pass a directory path.")
    out_dir.mkdir(parents=True, exist_ok=True)  # fail now, not after training, if it cannot be made
    out = Output(progress=config.progress, stream=stream)
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    out.heading(f"torchfreeze demo: {config.model}")
    out.line(setup.description)
    out.line(f"get_model({setup.registry!r}, freeze=True)  # pretrained backbone frozen + pinned eval, new head")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tf.hub.NothingPretrainedWarning)
        model = tf.get_model(setup.registry, freeze=True, num_classes=len(classes(config.model)))
    task = make_task(config.model, model)
    out.line(f"data: {task.data_note}")
    out.line(f"      {len(task.train)} training examples, {len(task.test)} held out for the accuracy")
    out.render(tf.summary(model, depth=setup.summary_depth))
    total_params = sum(p.numel() for p in model.parameters())

    trained = _train(out, model, task, config, setup, epochs, batch, out_dir)
    trainable_final = sum(p.numel() for _, p in tf.trainable_parameters(model))
    sides = side_by_side(
        out,
        config.model,
        setup,
        ours=trained.curve,
        epochs=epochs,
        head_epochs=trained.head_epochs,
        batch=batch,
        seed=config.seed,
        unfreeze=trained.plan,
        out_dir=out_dir,
    )
    ckpt, full_bytes, acc_reloaded = _checkpoint(out, model, task, config, setup, out_dir, trained.head_checkpoint)
    if ckpt.stat().st_size > full_bytes / 2:
        out.line(
            f"why so large: after gradual unfreezing {trainable_final:,} of {total_params:,} parameters train "
            f"({percent(trainable_final, total_params)}), so a trainable-only checkpoint holds almost the whole "
            "model; the head-only checkpoint above is what a run that keeps the backbone frozen has to store."
        )

    comparison: dict[str, Any] = {}
    if config.compare_steps > 0:
        comparison = compare(
            out,
            model=config.model,
            batch=batch,
            steps=config.compare_steps,
            seed=config.seed,
            head_steps=trained.head_steps,
            full_bytes=full_bytes,
        )

    head_ckpt = trained.head_checkpoint
    result = DemoResult(
        model=config.model,
        data=task.data_note,
        epochs=epochs,
        batch_size=batch,
        train_examples=len(task.train),
        test_examples=len(task.test),
        accuracy_head_only=trained.accuracy_head,
        accuracy_final=trained.accuracy_final,
        accuracy_reloaded=acc_reloaded,
        trainable_parameters_head_only=trained.trainable_head,
        trainable_parameters_final=trainable_final,
        total_parameters=total_params,
        checkpoint=str(ckpt),
        checkpoint_bytes=ckpt.stat().st_size,
        head_only_checkpoint_bytes=head_ckpt.stat().st_size if head_ckpt is not None else None,
        full_model_bytes=full_bytes,
        unfrozen=trained.unfrozen,
        comparison=comparison,
        guard_checks=trained.guard_checks,
        side_by_side=sides,
        seconds=time.perf_counter() - started,
    )
    results_path = out_dir / f"results-{config.model}.json"
    text = json.dumps(asdict(result), indent=2) + "\n"
    atomic_write(results_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    out.heading("summary")
    out.line(
        f"held-out accuracy: head only {trained.accuracy_head:.1%}, after gradual unfreezing "
        f"{trained.accuracy_final:.1%} ({len(task.test)} examples never trained on)"
    )
    out.line(f"checkpoint: {ckpt} (trainable-only); figures: {results_path}")
    if sides.get("figure"):
        out.line(f"accuracy and loss per epoch, torchfreeze vs plain PyTorch: {sides['figure']}")
    out.line(f"demo finished in {result.seconds:.0f} s")
    return result


def _train(
    out: Output,
    model: nn.Module,
    task: Task,
    config: DemoConfig,
    setup: ModelSetup,
    epochs: int,
    batch: int,
    out_dir: Path,
) -> _Trained:
    """Phases 1 and 2: head only, then gradual unfreezing (one GradualUnfreezing step per epoch)."""
    head_epochs = max(1, math.ceil(epochs / 2))
    optimizer = torch.optim.AdamW(tf.param_groups(model, setup.head_lr, weight_decay=0.01))
    groups = tf.layer_groups(model)
    unfreeze_epochs = epochs - head_epochs
    # {epoch: how many of the last layer groups train}: the head (1), then one more block per epoch
    schedule = {head_epochs + i: min(len(groups), 2 + i) for i in range(min(unfreeze_epochs, setup.unfreeze_groups))}
    sched = tf.GradualUnfreezing(model, optimizer, schedule, lr=setup.backbone_lr) if schedule else None
    # the same unfreezing for the plain run: {epoch index: the group that joins before it}
    plan = {k: [str(n) for n in groups[len(groups) - c]] for k, c in schedule.items()}
    curve = Curve("torchfreeze")
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(task.train) / batch)
    trainable_head = sum(p.numel() for _, p in tf.trainable_parameters(model))
    out.heading(f"1. train the head ({_n(head_epochs, 'epoch')}, backbone frozen, lr {setup.head_lr:g})")
    unfrozen: list[str] = []
    acc_head = 0.0
    head_ckpt: Path | None = None
    # guard: after every optimizer step, every frozen tensor (and frozen BatchNorm statistics)
    # must be bit-identical; tensors unfrozen on the way leave the watch list.
    with tf.guard(model, optimizer) as watch:
        watched_at_start = len(watch.names)
        for epoch in range(epochs):
            phase = "head" if epoch < head_epochs else "unfrozen"
            with out.bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs} {phase}") as advance:
                curve.add(model, task, train_epoch(model, optimizer, task, batch, gen, advance))
            if epoch + 1 == head_epochs:
                acc_head = curve.accuracy[-1]
                out.line(f"held-out accuracy, head only: {acc_head:.1%}")
                # what a frozen-backbone run has to keep: the head alone
                head_ckpt = out_dir / f"{config.model}-head-only.safetensors"
                tf.save_trainable(model, head_ckpt)
                if unfreeze_epochs:
                    out.heading(
                        f"2. unfreeze gradually (GradualUnfreezing, {_n(unfreeze_epochs, 'epoch')}, "
                        f"lr {setup.backbone_lr:g} for unfrozen blocks)"
                    )
            if sched is not None and epoch + 1 < epochs:
                before = {n for n, _ in tf.trainable_parameters(model)}
                sched.step()  # once per epoch: applies the schedule's entry for the next epoch
                now = dict(tf.trainable_parameters(model))
                gained = sorted(set(now) - before)
                if gained:
                    names = sorted({_group_of(n, groups) for n in gained})
                    unfrozen.extend(names)
                    out.line(
                        f"GradualUnfreezing: unfroze {', '.join(names)} "
                        f"({sum(now[n].numel() for n in gained):,} parameters) for epoch {epoch + 2}"
                    )
    out.line(
        f"guard: frozen tensors were bit-identical after each of {watch.checks} checks "
        f"({watched_at_start} tensors watched at the start)"
    )
    if head_epochs == epochs:
        acc_final = acc_head
        out.line("(no epochs left for gradual unfreezing: pass --epochs 2 or more)")
    else:
        acc_final = curve.accuracy[-1]
        out.line(f"held-out accuracy after gradual unfreezing: {acc_final:.1%}")
    return _Trained(
        head_epochs=head_epochs,
        head_steps=head_epochs * steps_per_epoch,
        trainable_head=trainable_head,
        accuracy_head=acc_head,
        accuracy_final=acc_final,
        head_checkpoint=head_ckpt,
        unfrozen=unfrozen,
        guard_checks=watch.checks,
        curve=curve,
        plan=plan,
    )


def _checkpoint(
    out: Output,
    model: nn.Module,
    task: Task,
    config: DemoConfig,
    setup: ModelSetup,
    out_dir: Path,
    head_ckpt: Path | None,
) -> tuple[Path, int, float]:
    """Phase 3: save a trainable-only checkpoint, reload it into a fresh model; (path, full bytes, accuracy)."""
    out.heading("4. save a trainable-only checkpoint")
    ckpt = out_dir / f"{config.model}-trainable.safetensors"
    tf.save_trainable(model, ckpt)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = tf.get_model(setup.registry, freeze=True, num_classes=len(classes(config.model)))
    tf.load_trainable(fresh, ckpt)
    acc_reloaded, _ = evaluate(fresh, task, task.test)
    if head_ckpt is not None:
        out.line(
            f"{head_ckpt}: {head_ckpt.stat().st_size / 1024:,.1f} KiB after the head-only phase "
            f"({percent(head_ckpt.stat().st_size, full_bytes)} of the full model state, {full_bytes / 1024:,.0f} KiB)"
        )
    out.line(
        f"{ckpt}: {ckpt.stat().st_size / 1024:,.0f} KiB after gradual unfreezing "
        f"(full model state: {full_bytes / 1024:,.0f} KiB)"
    )
    out.line(f"reloaded into a freshly built pretrained model: held-out accuracy {acc_reloaded:.1%}")
    return ckpt, full_bytes, acc_reloaded


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _group_of(name: str, groups: list[list[str]]) -> str:
    for group in groups:
        for prefix in group:
            if name == prefix or name.startswith(prefix + "."):
                return prefix
    return name.rsplit(".", 1)[0]
