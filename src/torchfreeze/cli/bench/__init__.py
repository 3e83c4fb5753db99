"""``torchfreeze bench``: what freezing saves, measured against plain PyTorch.

Every scenario runs its plain-PyTorch variants and its torchfreeze variants in
the same process, alternating their order from one repetition to the next, and
reports medians and ratios (the ratios are the headline; absolute times depend
on the machine). Scenarios:

1. linear probe, 5 epochs over a fixed in-memory data set: plain
   ``requires_grad=False`` (and the careful hand-written eval + ``no_grad``
   version) against torchfreeze with ``cache_features``, and the floor no cache
   can beat (features precomputed once, looked up by sample index);
2. frozen lower half, trainable upper half: step time and peak memory (RSS of a
   fresh process per variant) against plain full fine-tuning and plain freezing;
3. frozen middle block behind trainable layers: what ``explain`` says, and its
   backward cost against the block's own input-gradient cost;
4. ``FrozenBatchNorm2d`` and folded BatchNorm against ``BatchNorm2d`` in eval;
5. the cost of torchfreeze machinery on the training path (pins, ``Frozen``,
   leftovers of freeze/unfreeze) against the hand-written equivalent.

Models: the real all-MiniLM-L6-v2 encoder (``get_model("minilm-classifier")``)
and a small conv+BatchNorm CNN built here. ``--quick`` swaps in tiny stand-ins
and small sizes so the whole run takes seconds (for tests). Outputs in
``--output-dir``: ``bench.json``, ``bench.md`` and ``time_per_epoch.png``.

Modules: :mod:`~torchfreeze.cli.bench.workload` (sizes, models, data, timing
loops, the peak-memory child), :mod:`~torchfreeze.cli.bench.scenarios_freeze`
(1, 2), :mod:`~torchfreeze.cli.bench.scenarios_machinery` (3-5),
:mod:`~torchfreeze.cli.bench.report` (markdown, plot, console table).
``python -m torchfreeze.cli.bench ARGS`` runs the same as ``torchfreeze bench ARGS``.
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
from typing import Any, cast

import torch

from torchfreeze.cli.bench.report import headline_table, plot, to_markdown
from torchfreeze.cli.bench.scenarios_freeze import scenario_lower, scenario_probe
from torchfreeze.cli.bench.scenarios_machinery import scenario_batchnorm, scenario_middle, scenario_overhead
from torchfreeze.cli.bench.workload import FULL, QUICK, Kind, Sizes, build_cnn, build_encoder, measure_memory
from torchfreeze.cli.console import Output

__all__ = ["main", "to_markdown", "measure_memory"]

ALL_SCENARIOS = (1, 2, 3, 4, 5)
KINDS: tuple[Kind, ...] = ("encoder", "cnn")


# ----------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchfreeze bench",
        description="Benchmark torchfreeze against plain PyTorch (scenarios 1-5; see docs/speed.md).",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("torchfreeze-bench"),
        metavar="DIR",
        help="where bench.json, bench.md and time_per_epoch.png go (default: ./torchfreeze-bench)",
    )
    p.add_argument("--quick", action="store_true", help="tiny stand-in models and sizes: seconds, for tests")
    p.add_argument("--scenarios", default="1,2,3,4,5", metavar="LIST", help="comma-separated subset of 1-5")
    p.add_argument(
        "--models",
        default="encoder,cnn",
        metavar="LIST",
        help="comma-separated subset of encoder (MiniLM) and cnn (default: both)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="repetitions per variant (default 3, 5 for the probe; quick 2)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads (default: leave)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes of scenario 2")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return p


def main(argv: Sequence[str]) -> int:
    """Run the benchmark (the ``torchfreeze bench`` command).

    Args:
        argv: command-line arguments without the program name.

    Returns:
        0 on success, 2 on bad options.

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
        print(
            f"torchfreeze bench: error: --scenarios {args.scenarios!r}: expected a subset of 1,2,3,4,5", file=sys.stderr
        )
        return 2
    if not names or any(k not in KINDS for k in names):
        print(f"torchfreeze bench: error: --models {args.models!r}: expected a subset of encoder,cnn", file=sys.stderr)
        return 2
    if (args.repeats is not None and args.repeats < 1) or (args.threads is not None and args.threads < 1):
        print("torchfreeze bench: error: --repeats and --threads must be positive", file=sys.stderr)
        return 2
    kinds = [cast(Kind, k) for k in names]
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=args.repeats, probe_repeats=args.repeats)
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
    kinds: list[Kind],
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
    encoder = build_encoder(args.quick) if "encoder" in kinds and set(scenarios) & {1, 2, 3} else None
    cnn = build_cnn(args.quick) if "cnn" in kinds and set(scenarios) & {1, 2, 4, 5} else None
    memory = not args.no_memory
    for s in scenarios:
        t_s = time.perf_counter()
        log(f"scenario {s} ...")
        if s == 1:
            for kind, base in zip(KINDS, (encoder, cnn)):
                if base is not None:
                    results["scenarios"].append(scenario_probe(kind, base, sizes, log))
        elif s == 2:
            for kind, base in zip(KINDS, (encoder, cnn)):
                if base is not None:
                    results["scenarios"].append(
                        scenario_lower(kind, base, sizes, log, quick=args.quick, memory=memory, threads=threads)
                    )
        elif s == 3 and encoder is not None:
            results["scenarios"].append(scenario_middle(encoder, sizes, log))
        elif s == 4 and cnn is not None:
            results["scenarios"].append(scenario_batchnorm(cnn, sizes, log))
        elif s == 5 and cnn is not None:
            results["scenarios"].append(scenario_overhead(cnn, sizes, log))
        log(f"  ({time.perf_counter() - t_s:.1f} s)")
    results["meta"] = {
        "command": command,
        "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": sizes.__dict__,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "bench.md").write_text(to_markdown(results))
    if not args.no_plot:
        note = plot(results, out_dir / "time_per_epoch.png")
        if note:
            log(note)
    out.render(headline_table(results))
    log(
        f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
        + ("" if args.no_plot else ", time_per_epoch.png")
        + f" in {results['meta']['total_seconds']:.0f} s"
    )
    return 0
