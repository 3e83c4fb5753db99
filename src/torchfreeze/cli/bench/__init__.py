"""``torchfreeze bench``: what freezing saves, measured against plain PyTorch and against the floor.

Every scenario runs its plain-PyTorch variants and its torchfreeze variants in the same process,
side by side, rotating their order from one round to the next, and times them with
``torch.utils.benchmark`` (:mod:`~torchfreeze.cli.bench.timing`): every figure carries its spread
(median and interquartile range over its repetitions, min-max in the tables). Scenarios:

1. feature caching on three backbones (the 6-layer MLP of issue 13, the bench CNN, MiniLM):
   plain ``requires_grad=False``, the careful eval + ``no_grad`` loop, ``cache_features`` (first
   epoch, and epochs 2+), ``precompute_features`` and the floor (features computed once, looked up
   by batch index); goals: cached epochs <= 1.3x the floor, cached first epoch <= 1.05x no_grad;
   identical training results;
2. frozen lower half, trainable upper half: step time and peak memory (RSS of a fresh process per
   variant) against plain full fine-tuning and plain freezing;
3. frozen middle block behind trainable layers: what ``explain`` says, and its backward cost
   against the block's own input-gradient cost;
4. ``FrozenBatchNorm2d`` and folded BatchNorm against ``BatchNorm2d`` in eval;
5. the cost of torchfreeze machinery on the training path against the hand-written equivalent;
6. progressive freezing with prefix caching, end to end, against full fine-tuning, static freezing
   and gradual unfreezing (MiniLM on the demo's text task); goal: >= 3x faster than full
   fine-tuning, held-out accuracy within 1 point.

``--quick`` swaps in tiny stand-ins and small sizes so the whole run takes seconds (for tests).
Outputs in ``--output-dir``: ``bench.json``, ``bench.md`` (shaped for BENCHMARKS.md),
``feature_caching.png`` and ``progressive_accuracy.png``.

Modules: :mod:`~torchfreeze.cli.bench.timing` (the harness), :mod:`~torchfreeze.cli.bench.workload`
(sizes, models, data, the peak-memory child), :mod:`~torchfreeze.cli.bench.scenarios_probe` (1),
:mod:`~torchfreeze.cli.bench.scenarios_freeze` (2), :mod:`~torchfreeze.cli.bench.scenarios_machinery`
(3-5), :mod:`~torchfreeze.cli.bench.scenarios_progressive` (6), :mod:`~torchfreeze.cli.bench.report`
(markdown, console) and :mod:`~torchfreeze.cli.bench.plots`. ``python -m torchfreeze.cli.bench ARGS``
runs the same as ``torchfreeze bench ARGS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchfreeze.cli.bench.plots import write_plots
from torchfreeze.cli.bench.report import headline_table, to_markdown
from torchfreeze.cli.bench.scenarios_freeze import scenario_lower
from torchfreeze.cli.bench.scenarios_machinery import scenario_batchnorm, scenario_middle, scenario_overhead
from torchfreeze.cli.bench.scenarios_probe import Backbone, build_mlp, scenario_probe
from torchfreeze.cli.bench.scenarios_progressive import build_setup, scenario_progressive
from torchfreeze.cli.bench.workload import FULL, QUICK, Kind, Sizes, build_cnn, build_encoder, measure_memory
from torchfreeze.cli.console import Output

__all__ = ["main", "to_markdown", "measure_memory"]

ALL_SCENARIOS = (1, 2, 3, 4, 5, 6)
#: The models, in the order scenarios run them (mlp: scenario 1 only).
KINDS: tuple[Backbone, ...] = ("mlp", "cnn", "encoder")
#: The models of scenario 2, in order.
LOWER_KINDS: tuple[Kind, ...] = ("encoder", "cnn")
# ----------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchfreeze bench",
        description="Benchmark torchfreeze against plain PyTorch and the floor (scenarios 1-6; see docs/speed.md).",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("torchfreeze-bench"),
        metavar="DIR",
        help="where bench.json, bench.md and the PNG plots go (default: ./torchfreeze-bench)",
    )
    p.add_argument("--quick", action="store_true", help="tiny stand-in models and sizes: seconds, for tests")
    p.add_argument("--scenarios", default="1,2,3,4,5,6", metavar="LIST", help="comma-separated subset of 1-6")
    p.add_argument(
        "--models",
        default="mlp,cnn,encoder",
        metavar="LIST",
        help="comma-separated subset of mlp (scenario 1 only), cnn and encoder (MiniLM) (default: all three)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="rounds per variant (default 3, 5 for scenario 1, 2 for scenario 6; quick 2, 1 for scenario 6)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads (default: leave)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes of scenario 2")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plots")
    return p


def _error(message: str) -> int:
    print(f"torchfreeze bench: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str]) -> int:
    """Run the benchmark (the ``torchfreeze bench`` command).

    Args:
        argv: command-line arguments without the program name.

    Returns:
        0 on success, 2 on bad options (a message on stderr naming the option, nothing written).

    >>> main(["--scenarios", "9"])
    2
    """
    argv = list(argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        scenarios = sorted({int(s) for s in args.scenarios.split(",") if s.strip()})
    except ValueError:
        scenarios = [-1]
    names = [k.strip() for k in args.models.split(",") if k.strip()]
    if not scenarios or any(s not in ALL_SCENARIOS for s in scenarios):
        return _error(f"--scenarios {args.scenarios!r}: expected a comma-separated subset of 1,2,3,4,5,6")
    if not names or any(k not in KINDS for k in names):
        return _error(f"--models {args.models!r}: expected a comma-separated subset of mlp,cnn,encoder")
    if args.repeats is not None and args.repeats < 1:
        return _error(f"--repeats {args.repeats}: expected a positive number of rounds")
    if args.threads is not None and args.threads < 1:
        return _error(f"--threads {args.threads}: expected a positive number of threads")
    kinds = [k for k in KINDS if k in names]
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        sizes = dataclasses.replace(
            sizes, repeats=args.repeats, probe_repeats=args.repeats, progressive_repeats=args.repeats
        )
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _run(args, argv, scenarios, kinds, sizes, threads)
    finally:
        torch.set_num_threads(threads_before)


def _run(
    args: argparse.Namespace,
    argv: list[str],
    scenarios: list[int],
    kinds: list[Backbone],
    sizes: Sizes,
    threads: int | None,
) -> int:
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    out = Output(progress=False, soft_wrap=True)
    log = out.line

    t_start = time.perf_counter()
    command = "torchfreeze bench " + " ".join(argv)
    log(f"torchfreeze bench: scenarios {scenarios}, models {kinds}, {'quick' if args.quick else 'full'} mode")
    results: dict[str, Any] = {"scenarios": []}
    quick = bool(args.quick)
    encoder = build_encoder(quick) if "encoder" in kinds and set(scenarios) & {1, 2, 3} else None
    cnn = build_cnn(quick) if "cnn" in kinds and set(scenarios) & {1, 2, 4, 5} else None
    mlp = build_mlp(sizes) if "mlp" in kinds and 1 in scenarios else None
    bases: dict[str, Any] = {"mlp": mlp, "cnn": cnn, "encoder": encoder}
    memory = not args.no_memory
    for s in scenarios:
        t_s = time.perf_counter()
        log(f"scenario {s} ...")
        if s == 1:
            for kind in kinds:
                if bases[kind] is not None:
                    results["scenarios"].append(
                        scenario_probe(kind, bases[kind], sizes, log, repeats=sizes.probe_repeats)
                    )
        elif s == 2:
            for lower in LOWER_KINDS:
                if bases[lower] is not None:
                    results["scenarios"].append(
                        scenario_lower(lower, bases[lower], sizes, log, quick=quick, memory=memory, threads=threads)
                    )
        elif s == 3 and encoder is not None:
            results["scenarios"].append(scenario_middle(encoder, sizes, log))
        elif s == 4 and cnn is not None:
            results["scenarios"].append(scenario_batchnorm(cnn, sizes, log))
        elif s == 5 and cnn is not None:
            results["scenarios"].append(scenario_overhead(cnn, sizes, log))
        elif s == 6 and "encoder" in kinds:
            results["scenarios"].append(scenario_progressive(build_setup(quick), sizes, log))
        log(f"  ({time.perf_counter() - t_s:.1f} s)")
    results["meta"] = {
        "command": command,
        "quick": quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": sizes.__dict__,
        "total_seconds": time.perf_counter() - t_start,
    }
    plots: list[str] = []
    if not args.no_plot:
        plots, note = write_plots(results, out_dir)
        if note:
            log(note)
    results["meta"]["plots"] = plots
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "bench.md").write_text(to_markdown(results))
    out.render(headline_table(results))
    log(
        f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
        + "".join(f", {name}" for name in plots)
        + f" in {results['meta']['total_seconds']:.0f} s"
    )
    return 0
