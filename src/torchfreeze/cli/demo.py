"""The main job: ``torchfreeze demo``.

Transfer learning on a real pretrained model and real data, end to end, on a
CPU in a few minutes, without network:

1. ``get_model(name, freeze=True)``: pretrained backbone frozen and pinned in
   eval mode, new head trainable; print the summary.
2. Train the head (progress bar), report held-out accuracy.
3. Unfreeze the last backbone blocks gradually (:class:`GradualUnfreezing`,
   lower learning rate for the unfrozen blocks), report held-out accuracy.
4. Measure a few training steps of the frozen model and of full fine-tuning,
   each in a fresh process: time per step and peak memory (RSS).
5. Save a trainable-only checkpoint (:func:`save_trainable`) and reload it into
   a freshly built pretrained model to show it restores the result.

Data. ``digits-cnn`` (default): scikit-learn's bundled digits, a copy of the
test set of the UCI "Optical Recognition of Handwritten Digits" data (UCI, CC BY
4.0; shipped with scikit-learn, BSD-3-Clause). The backbone was pretrained on
digits 0-4 only (``scripts/pretrain_digits.py``); the demo learns digits 5-9,
which the backbone has never seen, and reports accuracy on a stratified 30%
held-out split of them. ``minilm``: the all-MiniLM-L6-v2 encoder with a small
hand-written labelled set of 160 short English sentences in four topics
(:data:`TOPIC_TEXTS`, written for this project, MIT), 40% held out. No text
dataset shipped inside an installed package was found that fits (see
``docs/demo.md``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchfreeze.cli.memory import peak_rss_kib, reset_peak_rss, rss_kib
from torchfreeze.errors import ArgumentError

__all__ = ["DemoConfig", "run_demo", "MODELS", "TOPICS", "TOPIC_TEXTS"]

# ----------------------------------------------------------------------------- data
TOPICS = ("sport", "cooking", "weather", "computing")

#: A small labelled text set written by hand for this project (MIT, like the code):
#: 40 short sentences per topic, label = index into :data:`TOPICS`.
TOPIC_TEXTS: tuple[tuple[str, int], ...] = tuple(
    (text, label)
    for label, block in enumerate(
        (
            # sport
            """The striker scored twice in the second half.
The home team won the match after extra time.
She ran the marathon in under three hours.
The coach substituted the goalkeeper at half time.
Our rugby club lost the final by a single try.
He served an ace to win the tennis championship.
The cyclists climbed the mountain stage in heavy traffic of riders.
The referee showed a red card after the foul.
They trained at the stadium every morning before the season.
The swimmer broke the national record in the relay.
Fans cheered as the ball crossed the goal line.
The boxer was knocked down in the third round.
The league table changed after the weekend fixtures.
He hit a home run in the bottom of the ninth inning.
The basketball team made twelve three-pointers tonight.
The golfer sank a long putt on the final hole.
The sprinter false-started and was disqualified.
Our captain lifted the trophy in front of the crowd.
The skier crashed on the downhill course but was unhurt.
The transfer fee for the midfielder was a club record.
The relay team dropped the baton on the last exchange.
The match was decided by a penalty shootout.
She won gold in the long jump at the championships.
The wrestler pinned his opponent in under a minute.
The team practised set pieces before the derby.
The cricket side was bowled out for ninety runs.
He finished the triathlon despite a flat tyre.
The volleyball players celebrated their promotion.
The umpire called the runner out at second base.
The rowing crew pulled ahead in the final hundred metres.
The goalkeeper saved a penalty in the last minute.
The hockey team scored on a power play.
She returned from injury to win the singles title.
The marathon route passes the old harbour.
The players shook hands after a hard-fought draw.
Ticket sales for the cup final sold out in an hour.
He signed a new contract with the football club.
The race car spun out on the wet track.
The gymnast landed a perfect vault.
The boxing match was postponed after the weigh-in.""",
            # cooking
            """Chop the onions finely and fry them in butter.
Bake the bread for forty minutes until golden.
Add a pinch of salt to the boiling pasta water.
Whisk the eggs with sugar until pale and fluffy.
Simmer the tomato sauce gently for an hour.
Season the roast chicken with garlic and rosemary.
Knead the dough and let it rise overnight.
Slice the carrots and steam them for five minutes.
The soup needs more pepper and a squeeze of lemon.
Marinate the beef in soy sauce before grilling.
Fold the flour into the batter with a spatula.
Preheat the oven and grease the cake tin.
The curry tastes better the next day.
Grate the cheese over the warm lasagne.
Roast the vegetables with olive oil and thyme.
Stir the risotto slowly while adding the stock.
Peel the potatoes and mash them with milk.
She caramelised the sugar in a heavy pan.
The recipe calls for two cups of flour.
Let the steak rest before you carve it.
Toast the spices in a dry pan to release their aroma.
The pie crust should be crisp and flaky.
Blend the soup until smooth and creamy.
Sprinkle fresh herbs on the salad just before serving.
He fried the fish in a light beer batter.
Chill the dessert in the fridge for two hours.
Dice the peppers and add them to the stew.
The pancakes were fluffy with maple syrup.
Reduce the wine until the sauce thickens.
Crack the eggs into a bowl and beat them well.
Boil the rice and then let it steam covered.
The chef plated the dish with a drizzle of oil.
Cream the butter and sugar for the cookies.
Grill the corn until slightly charred.
Scatter toasted almonds over the porridge.
Poach the pears in red wine and cinnamon.
The dumplings are filled with pork and cabbage.
Brush the pastry with beaten egg before baking.
Cook the lentils until soft, then add cumin.
Squeeze lime over the tacos and serve at once.""",
            # weather
            """Heavy rain is expected across the north tomorrow.
The forecast says sunny spells with light winds.
A storm warning was issued for the coast tonight.
Temperatures will drop below freezing overnight.
Thick fog delayed flights at the airport this morning.
It has been the hottest summer on record.
Snow is falling steadily in the mountains.
Strong gusts brought down trees across the region.
The humidity makes the afternoon feel muggy.
Thunder and lightning rolled in after lunch.
A cold front will bring showers and cooler air.
The drought has left the reservoirs half empty.
Expect a frosty start followed by clear skies.
The hurricane strengthened as it moved over warm water.
Drizzle will persist until the evening.
Hailstones the size of marbles fell in the town.
The heatwave is set to continue through the weekend.
Winds will ease later as high pressure builds.
Flood alerts are in place along the river.
There is a chance of sleet on higher ground.
The sky cleared and the night turned chilly.
Monsoon rains arrived earlier than usual this year.
A blizzard closed the mountain pass.
Tomorrow will be mild and mostly cloudy.
The barometer is falling, so rain is likely.
Icy roads made driving dangerous this morning.
Scattered showers will clear by midday.
Record rainfall caused landslides in the valley.
The wind chill makes it feel ten degrees colder.
Clouds will thicken ahead of the approaching storm.
A rainbow appeared after the afternoon shower.
Sunshine and blue skies are forecast for the holiday.
Overnight frost damaged the early blossoms.
The typhoon is expected to make landfall on Friday.
Humid air will trigger thunderstorms this evening.
Visibility is poor because of the dense mist.
A warm breeze is blowing in from the south.
The weather service predicts a wet and windy week.
Temperatures will climb to thirty degrees tomorrow.
Light snow may settle on the hills overnight.""",
            # computing
            """The laptop crashed after the latest software update.
Restart the server to apply the security patch.
The program runs faster after we cached the results.
She wrote a Python script to rename the files.
The database query returned no rows.
Install the driver before connecting the printer.
The compiler reported a syntax error on line twelve.
Back up your hard drive before upgrading the system.
The website went down because of a traffic spike.
He debugged the memory leak in the application.
Our network router needs a firmware upgrade.
The new processor has eight cores and a large cache.
Clear your browser cookies and try logging in again.
The app stores user data in an encrypted file.
The keyboard shortcut copies the selected text.
The operating system froze during the installation.
They migrated the code to a new version control system.
The spreadsheet formula divides by zero.
Use a strong password and enable two-factor login.
The graphics card overheats when rendering video.
The unit tests failed after the refactoring.
Our cloud storage quota is almost full.
The script parses the log files every hour.
The mouse stopped working after the USB port failed.
The function returns a list of sorted integers.
We deployed the web service in a container.
The virus scanner flagged a suspicious download.
The laptop battery drains quickly when the screen is bright.
Open a terminal and type the command to list files.
The algorithm sorts a million records in a second.
The disk is fragmented and needs defragmenting.
The email client cannot connect to the mail server.
The code review found a bug in the loop.
The monitor resolution is set too low.
The file was corrupted during the download.
The tablet synchronises contacts with the phone.
Our backup job runs every night at midnight.
The API returns JSON with the user's settings.
He upgraded the computer's memory to thirty-two gigabytes.
The login page shows an error after the update.""",
        )
    )
    for text in block.splitlines()
)


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class _ModelSetup:
    registry: str
    epochs: int
    batch_size: int
    head_lr: float
    backbone_lr: float
    unfreeze_groups: int
    summary_depth: int | None
    description: str


MODELS: dict[str, _ModelSetup] = {
    "digits-cnn": _ModelSetup(
        registry="digits-cnn",
        epochs=10,
        batch_size=32,
        head_lr=3e-2,
        backbone_lr=1e-3,
        unfreeze_groups=2,
        summary_depth=None,
        description="CNN pretrained on digits 0-4, transferred to digits 5-9 (scikit-learn digits)",
    ),
    "minilm": _ModelSetup(
        registry="minilm-classifier",
        epochs=8,
        batch_size=16,
        head_lr=1e-2,
        backbone_lr=5e-5,
        unfreeze_groups=2,
        summary_depth=3,
        description="all-MiniLM-L6-v2 + linear head on 160 hand-written sentences in 4 topics",
    ),
}


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Options of ``torchfreeze demo`` (``None`` = the model's default).

    Args:
        model: ``"digits-cnn"`` (default) or ``"minilm"``.
        epochs: total epochs; the first half trains the head only, the rest
            unfreezes the last backbone blocks one by one.
        batch_size: training batch size.
        output_dir: where the checkpoint and ``results.json`` are written.
        compare_steps: timed training steps of each configuration (frozen, full
            fine-tuning); ``0`` skips the comparison.
        seed: seed of the head initialisation and batch order.
        progress: show progress bars.

    >>> setup, epochs, batch = DemoConfig(epochs=2).resolved()
    >>> setup.registry, epochs, batch
    ('digits-cnn', 2, 32)
    """

    model: str = "digits-cnn"
    epochs: int | None = None
    batch_size: int | None = None
    output_dir: Path = Path("torchfreeze-demo")
    compare_steps: int = 20
    seed: int = 0
    progress: bool = True

    def resolved(self) -> tuple[_ModelSetup, int, int]:
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


# ----------------------------------------------------------------------------- tasks
@dataclass
class _Task:
    """Inputs and labels of one demo, with train/test indices."""

    inputs: Any  # a tensor, or a mapping of equally long tensors (tokenizer output)
    labels: torch.Tensor
    train: torch.Tensor
    test: torch.Tensor
    classes: Sequence[str]
    data_note: str

    def batch(self, index: torch.Tensor) -> Any:
        if isinstance(self.inputs, Mapping):
            return {k: v[index] for k, v in self.inputs.items()}
        return self.inputs[index]


def _make_task(model_key: str, model: nn.Module | None = None) -> _Task:
    from torchfreeze.hub.models import load_digits_tensors, stratified_split

    if model_key == "digits-cnn":
        images, labels = load_digits_tensors((5, 6, 7, 8, 9))
        train, test = stratified_split(labels, test_fraction=0.3, seed=0)
        return _Task(
            images,
            labels,
            train,
            test,
            ("5", "6", "7", "8", "9"),
            "scikit-learn digits 5-9 (UCI optdigits, CC BY 4.0; scikit-learn BSD-3); "
            "the backbone was pretrained on digits 0-4 only",
        )
    texts = [t for t, _ in TOPIC_TEXTS]
    labels = torch.tensor([y for _, y in TOPIC_TEXTS], dtype=torch.int64)
    if model is None:
        raise ArgumentError("internal: the minilm task needs the model's tokenizer")
    encoded = model.backbone.tokenize(texts)  # type: ignore[union-attr,operator]
    inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    train, test = stratified_split(labels, test_fraction=0.4, seed=0)
    return _Task(
        inputs,
        labels,
        train,
        test,
        TOPICS,
        f"{len(texts)} hand-written sentences in 4 topics (torchfreeze, MIT)",
    )


# ----------------------------------------------------------------------------- output
class _Out:
    """Printing through rich when installed (tables, progress), plain text otherwise."""

    def __init__(self, *, progress: bool, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.progress_enabled = progress
        try:
            from rich.console import Console

            width = None if self.stream.isatty() else 120
            self.console: Any = Console(file=self.stream, width=width, highlight=False)
        except ImportError:
            self.console = None

    def line(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def heading(self, text: str) -> None:
        if self.console is not None:
            self.console.rule(text)
        else:
            print(f"\n== {text} ==", file=self.stream, flush=True)

    def render(self, obj: Any) -> None:
        if self.console is not None:
            self.console.print(obj)
        else:
            print(str(obj), file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, total: int, description: str) -> Iterator[Callable[..., None]]:
        """A progress bar; yields ``advance(n=1, **fields)``."""
        if not self.progress_enabled:
            yield lambda n=1, **fields: None
            return
        if self.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            ) as progress:
                task = progress.add_task(description, total=total, info="")

                def advance(n: int = 1, **fields: Any) -> None:
                    info = "  ".join(f"{k} {v}" for k, v in fields.items())
                    progress.update(task, advance=n, info=info)

                yield advance
            return
        try:
            from tqdm import tqdm
        except ImportError:
            yield lambda n=1, **fields: None
            self.line(f"{description}: done")
            return
        with tqdm(total=total, desc=description, file=self.stream) as bar:

            def advance_tqdm(n: int = 1, **fields: Any) -> None:
                bar.update(n)
                if fields:
                    bar.set_postfix(fields)

            yield advance_tqdm


# ----------------------------------------------------------------------------- training
def _accuracy(model: nn.Module, task: _Task, index: torch.Tensor, batch: int = 256) -> float:
    from torchfreeze import eval_mode

    correct = 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(index), batch):
            part = index[start : start + batch]
            correct += int((model(task.batch(part)).argmax(-1) == task.labels[part]).sum())
    return correct / max(1, len(index))


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: _Task,
    batch: int,
    gen: torch.Generator,
    advance: Callable[..., None],
) -> float:
    model.train()
    order = task.train[torch.randperm(len(task.train), generator=gen)]
    total, seen = 0.0, 0
    for start in range(0, len(order), batch):
        part = order[start : start + batch]
        loss = F.cross_entropy(model(task.batch(part)), task.labels[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(part)
        seen += len(part)
        advance(1, loss=f"{total / seen:.3f}")
    return total / max(1, seen)


def _rss_mb() -> float:
    """Current resident set size in MiB (see :func:`torchfreeze.cli.memory.rss_kib`)."""
    return rss_kib() / 2**10


def _peak_rss_mb() -> float:
    """Peak resident set size in MiB since the last :func:`_reset_peak_rss` (or process start)."""
    return peak_rss_kib() / 2**10


_reset_peak_rss = reset_peak_rss


def _measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Time ``steps`` training steps of one configuration (run in a fresh process)."""
    import warnings

    from torchfreeze import get_model, param_groups, trainable_parameters

    setup = MODELS[spec["model"]]
    # One thread for both configurations: with several, other load on the machine stalls the
    # threads' barriers and the timings scatter by 5-10x; with one they are stable.
    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(int(spec.get("seed", 0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_model(setup.registry, freeze=bool(spec["freeze"]), num_classes=len(_classes(spec["model"])))
    task = _make_task(spec["model"], model)
    batch = int(spec["batch_size"])
    optimizer = torch.optim.AdamW(param_groups(model, setup.head_lr, weight_decay=0.01))
    gen = torch.Generator().manual_seed(0)
    idx = task.train[torch.randperm(len(task.train), generator=gen)]
    batches = [idx[(i * batch) % len(idx) :][:batch] for i in range(int(spec["steps"]) + 2)]
    batches = [b if len(b) else idx[:batch] for b in batches]
    model.train()
    rss_model = _rss_mb()
    # Loading weights has a transient peak (file bytes + parsed tensors); measure training only.
    peak_reset = _reset_peak_rss()

    def step(part: torch.Tensor) -> None:
        loss = F.cross_entropy(model(task.batch(part)), task.labels[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for part in batches[:2]:  # warm-up: allocator, optimizer state, lazy kernels
        step(part)
    times = []
    for part in batches[2:]:
        t0 = time.perf_counter()
        step(part)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "freeze": bool(spec["freeze"]),
        "steps": len(times),
        "step_ms_median": 1000 * times[len(times) // 2],
        "step_ms_mean": 1000 * sum(times) / len(times),
        "step_ms_best": 1000 * times[0],
        "threads": torch.get_num_threads(),
        "rss_after_build_mb": rss_model,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_is_training_only": peak_reset,
        "trainable_parameters": sum(p.numel() for _, p in trainable_parameters(model)),
    }


def _classes(model_key: str) -> Sequence[str]:
    return ("5", "6", "7", "8", "9") if model_key == "digits-cnn" else TOPICS


def _measure_in_subprocess(spec: Mapping[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(spec.get("threads", 1))
    proc = subprocess.run(
        [sys.executable, "-m", "torchfreeze.cli.demo", "--measure", json.dumps(dict(spec))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the measurement process for {dict(spec)} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- demo
@dataclass
class DemoResult:
    """Figures of one demo run (also written to ``results.json``)."""

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


def run_demo(config: DemoConfig, *, stream: Any = None) -> DemoResult:
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
    import warnings

    import torchfreeze as tf
    from torchfreeze.training.state import atomic_write

    setup, epochs, batch = config.resolved()
    out_dir = Path(config.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArgumentError(f"output_dir={str(out_dir)!r} exists and is not a directory; pass a directory path.")
    out_dir.mkdir(parents=True, exist_ok=True)  # fail now, not after training, if it cannot be made
    out = _Out(progress=config.progress, stream=stream)
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    out.heading(f"torchfreeze demo: {config.model}")
    out.line(setup.description)
    out.line(f"get_model({setup.registry!r}, freeze=True)  # pretrained backbone frozen + pinned eval, new head")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tf.hub.NothingPretrainedWarning)
        model = tf.get_model(setup.registry, freeze=True, num_classes=len(_classes(config.model)))
    task = _make_task(config.model, model)
    out.line(f"data: {task.data_note}")
    out.line(f"      {len(task.train)} training examples, {len(task.test)} held out for the accuracy")
    out.render(tf.summary(model, depth=setup.summary_depth))

    # ---- phases 1 and 2: head only, then gradual unfreezing (one GradualUnfreezing step per epoch)
    head_epochs = max(1, math.ceil(epochs / 2))
    optimizer = torch.optim.AdamW(tf.param_groups(model, setup.head_lr, weight_decay=0.01))
    groups = tf.layer_groups(model)
    unfreeze_epochs = epochs - head_epochs
    # {epoch: how many of the last layer groups train}: the head (1), then one more block per epoch
    schedule = {head_epochs + i: min(len(groups), 2 + i) for i in range(min(unfreeze_epochs, setup.unfreeze_groups))}
    sched = tf.GradualUnfreezing(model, optimizer, schedule, lr=setup.backbone_lr) if schedule else None
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(task.train) / batch)
    trainable_head = sum(p.numel() for _, p in tf.trainable_parameters(model))
    total_params = sum(p.numel() for p in model.parameters())
    out.heading(f"1. train the head ({_n(head_epochs, 'epoch')}, backbone frozen, lr {setup.head_lr:g})")
    head_steps = head_epochs * steps_per_epoch
    unfrozen: list[str] = []
    acc_head = acc_final = 0.0
    head_ckpt: Path | None = None
    # guard: after every optimizer step, every frozen tensor (and frozen BatchNorm statistics)
    # must be bit-identical; tensors unfrozen on the way leave the watch list.
    with tf.guard(model, optimizer) as watch:
        watched_at_start = len(watch.names)
        for epoch in range(epochs):
            phase = "head" if epoch < head_epochs else "unfrozen"
            with out.bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs} {phase}") as advance:
                _train_epoch(model, optimizer, task, batch, gen, advance)
            if epoch + 1 == head_epochs:
                acc_head = _accuracy(model, task, task.test)
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
    guard_checks = watch.checks
    out.line(
        f"guard: frozen tensors were bit-identical after each of {guard_checks} checks "
        f"({watched_at_start} tensors watched at the start)"
    )
    if head_epochs == epochs:
        acc_final = acc_head
        out.line("(no epochs left for gradual unfreezing: pass --epochs 2 or more)")
    else:
        acc_final = _accuracy(model, task, task.test)
        out.line(f"held-out accuracy after gradual unfreezing: {acc_final:.1%}")
    trainable_final = sum(p.numel() for _, p in tf.trainable_parameters(model))

    # ---- phase 3: checkpoint
    out.heading("3. save a trainable-only checkpoint")
    ckpt = out_dir / f"{config.model}-trainable.safetensors"
    tf.save_trainable(model, ckpt)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = tf.get_model(setup.registry, freeze=True, num_classes=len(_classes(config.model)))
    tf.load_trainable(fresh, ckpt)
    acc_reloaded = _accuracy(fresh, task, task.test)
    if head_ckpt is not None:
        out.line(
            f"{head_ckpt}: {head_ckpt.stat().st_size / 1024:,.1f} KiB after the head-only phase "
            f"({head_ckpt.stat().st_size / full_bytes:.1%} of the full model state, {full_bytes / 1024:,.0f} KiB)"
        )
    out.line(
        f"{ckpt}: {ckpt.stat().st_size / 1024:,.0f} KiB after gradual unfreezing "
        f"(full model state: {full_bytes / 1024:,.0f} KiB)"
    )
    out.line(f"reloaded into a freshly built pretrained model: held-out accuracy {acc_reloaded:.1%}")

    # ---- phase 4: what freezing saved
    comparison: dict[str, Any] = {}
    if config.compare_steps > 0:
        out.heading(f"4. what freezing saved: {config.compare_steps} training steps each, fresh processes, 1 thread")
        runs = {}
        for frozen in (True, False):
            label = "frozen backbone" if frozen else "full fine-tuning"
            with out.bar(1, f"measuring {label}") as advance:
                runs[label] = _measure_in_subprocess(
                    {
                        "model": config.model,
                        "freeze": frozen,
                        "batch_size": batch,
                        "steps": config.compare_steps,
                        "seed": config.seed,
                    }
                )
                advance(1)
        fz, full = runs["frozen backbone"], runs["full fine-tuning"]
        # best of N steps (as timeit does): other load on the machine only ever adds time
        saved_ms = full["step_ms_best"] - fz["step_ms_best"]
        comparison = {
            "frozen": fz,
            "full": full,
            "time_saved_per_step_ms": saved_ms,
            "speedup": full["step_ms_best"] / max(fz["step_ms_best"], 1e-9),
            "peak_rss_saved_mb": full["peak_rss_mb"] - fz["peak_rss_mb"],
            "head_steps": head_steps,
            "time_saved_head_phase_s": saved_ms * head_steps / 1000,
        }
        out.render(_comparison_table(fz, full, out.console is not None))
        out.line(
            f"freezing saved {saved_ms:.1f} ms per training step (best of {config.compare_steps}: "
            f"{comparison['speedup']:.1f}x faster), "
            f"about {comparison['time_saved_head_phase_s']:.1f} s over the {head_steps} head-only steps "
            f"of this run, and {comparison['peak_rss_saved_mb']:.0f} MiB of peak memory (RSS)."
        )
        if abs(comparison["peak_rss_saved_mb"]) < 5:
            out.line(
                f"(memory: this model's weights are only {full_bytes / 2**20:.1f} MiB, so the process's "
                f"memory is dominated by the Python/PyTorch runtime; see --model minilm for a model "
                f"where gradients and optimizer state of the frozen part would weigh hundreds of MiB.)"
            )
        out.line("(wall-clock, single-threaded so that other load on the machine distorts the comparison less.)")

    result = DemoResult(
        model=config.model,
        data=task.data_note,
        epochs=epochs,
        batch_size=batch,
        train_examples=len(task.train),
        test_examples=len(task.test),
        accuracy_head_only=acc_head,
        accuracy_final=acc_final,
        accuracy_reloaded=acc_reloaded,
        trainable_parameters_head_only=trainable_head,
        trainable_parameters_final=trainable_final,
        total_parameters=total_params,
        checkpoint=str(ckpt),
        checkpoint_bytes=ckpt.stat().st_size,
        head_only_checkpoint_bytes=head_ckpt.stat().st_size if head_ckpt is not None else None,
        full_model_bytes=full_bytes,
        unfrozen=unfrozen,
        comparison=comparison,
        guard_checks=guard_checks,
        seconds=time.perf_counter() - started,
    )
    results_path = out_dir / "results.json"
    text = json.dumps(asdict(result), indent=2) + "\n"
    atomic_write(results_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    out.heading("summary")
    out.line(
        f"held-out accuracy: head only {acc_head:.1%}, after gradual unfreezing {acc_final:.1%} "
        f"({len(task.test)} examples never trained on)"
    )
    out.line(f"checkpoint: {ckpt} (trainable-only); figures: {results_path}")
    out.line(f"demo finished in {result.seconds:.0f} s")
    return result


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _group_of(name: str, groups: list[list[str]]) -> str:
    for group in groups:
        for prefix in group:
            if name == prefix or name.startswith(prefix + "."):
                return prefix
    return name.rsplit(".", 1)[0]


def _comparison_table(fz: Mapping[str, Any], full: Mapping[str, Any], rich: bool) -> Any:
    rows = [
        ("trainable parameters", f"{fz['trainable_parameters']:,}", f"{full['trainable_parameters']:,}"),
        ("time per step, best", f"{fz['step_ms_best']:.1f} ms", f"{full['step_ms_best']:.1f} ms"),
        ("time per step, median", f"{fz['step_ms_median']:.1f} ms", f"{full['step_ms_median']:.1f} ms"),
        ("peak RSS while training", f"{fz['peak_rss_mb']:.0f} MiB", f"{full['peak_rss_mb']:.0f} MiB"),
        (
            "RSS after building the model",
            f"{fz['rss_after_build_mb']:.0f} MiB",
            f"{full['rss_after_build_mb']:.0f} MiB",
        ),
        (
            "training overhead (peak - built)",
            f"{fz['peak_rss_mb'] - fz['rss_after_build_mb']:.0f} MiB",
            f"{full['peak_rss_mb'] - full['rss_after_build_mb']:.0f} MiB",
        ),
    ]
    if rich:
        from rich.table import Table

        table = Table(show_header=True)
        table.add_column("")
        table.add_column("frozen backbone", justify="right")
        table.add_column("full fine-tuning", justify="right")
        for row in rows:
            table.add_row(*row)
        return table
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'frozen backbone':>16}  {'full fine-tuning':>16}"]
    lines += [f"{a:{width}}  {b:>16}  {c:>16}" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # the measurement child: python -m torchfreeze.cli.demo --measure JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(_measure(json.loads(sys.argv[2]))), flush=True)
        raise SystemExit(0)
    raise SystemExit("usage: python -m torchfreeze.cli.demo --measure JSON (internal; use `torchfreeze demo`)")
