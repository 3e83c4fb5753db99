"""How ``torchfreeze bench`` times things: ``torch.utils.benchmark`` Measurements, side by side.

Every figure of the bench is a :class:`torch.utils.benchmark.Measurement` turned into a small
dict (:func:`figure`): ``median`` and the interquartile range ``q1``-``q3`` over all its
repetitions, ``min``, ``max``, ``n`` and ``spread`` (the words the report prints: what the
spread is and over how many repetitions). Three ways to get one:

- :func:`per_call`: a steady per-step / per-epoch figure, ``Timer(...).blocked_autorange``
  called once per round (``min_run_time`` each), rounds of all variants interleaved with the
  order rotated (:func:`rounds`), the round Measurements merged;
- :func:`one_shot`: a one-shot end-to-end figure (a first epoch, a whole run), ``Timer.timeit(1)``
  on fresh states built in the timer's untimed ``setup``, repeated over the rounds and merged.
  ``timeit`` runs two warm-up calls first (torch's rule), so each round costs three runs;
- :func:`from_samples`: times taken inside a run where the timed part cannot be a statement of its
  own (training epochs with an evaluation in between, a backward pass), wrapped into a Measurement.

Ratios (:func:`ratio`) carry a spread too: the median ratio of the medians, and the range that the
two interquartile ranges allow (``q1_a / q3_b`` to ``q3_a / q1_b``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.benchmark import Measurement, Timer

__all__ = [
    "Figure",
    "figure",
    "per_call",
    "one_shot",
    "from_samples",
    "rounds",
    "ratio",
    "paired_ratio",
    "merged",
    "compare_text",
]

#: A figure of the report: ``{"median", "q1", "q3", "min", "max", "n", "unit", "spread"}`` (seconds).
Figure = dict[str, Any]

_T = TypeVar("_T")


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), NaN for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def figure(m: Measurement, *, what: str = "repetitions") -> Figure:
    """A Measurement as a report figure: median and IQR over its times, min-max, count.

    >>> from torch.utils.benchmark import Measurement
    >>> f = figure(from_samples("x", [1.0, 2.0, 3.0, 4.0, 5.0]))
    >>> f["median"], f["q1"], f["q3"], f["min"], f["max"], f["n"]
    (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    """
    times = [float(t) for t in m.times]
    return {
        "median": _quantile(times, 0.5),
        "q1": _quantile(times, 0.25),
        "q3": _quantile(times, 0.75),
        "min": min(times) if times else float("nan"),
        "max": max(times) if times else float("nan"),
        "n": len(times),
        "unit": "s",
        "spread": f"median, IQR and min-max over {len(times)} {what}",
    }


def _timer(stmt: str, setup: str, env: Mapping[str, Any], label: str, sub_label: str, description: str) -> Timer:
    return Timer(
        stmt=stmt,
        setup=setup,
        globals=dict(env),
        label=label,
        sub_label=sub_label,
        description=description,
        num_threads=torch.get_num_threads(),  # Timer's default is 1: keep the bench's own setting
    )


def per_call(
    fn: Callable[[], object], *, label: str, sub_label: str, description: str, min_run_time: float
) -> Measurement:
    """One round of a steady figure: ``blocked_autorange`` of ``fn()`` (seconds per call)."""
    timer = _timer("fn()", "", {"fn": fn}, label, sub_label, description)
    return timer.blocked_autorange(min_run_time=min_run_time)


def one_shot(
    run: Callable[[_T], object], fresh: Callable[[], _T], *, label: str, sub_label: str, description: str
) -> Measurement:
    """One round of a one-shot figure: ``Timer.timeit(1)`` of ``run(state)`` on a fresh ``state``.

    The states are built in the timer's untimed ``setup``: two of them, since ``timeit``'s warm-up
    runs the statement twice in one setup (and the measured call once, in another).
    """
    env = {"run": run, "fresh": fresh}
    timer = _timer("run(states.pop())", "states = [fresh(), fresh()]", env, label, sub_label, description)
    return timer.timeit(1)


def from_samples(
    sub_label: str, samples: Sequence[float], *, label: str = "torchfreeze bench", description: str = ""
) -> Measurement:
    """Times measured inside a run (seconds per sample), as one Measurement (one sample = one run)."""
    from torch.utils.benchmark.utils.common import TaskSpec

    spec = TaskSpec(stmt="", setup="pass", label=label, sub_label=sub_label, description=description)
    return Measurement(number_per_run=1, raw_times=[float(s) for s in samples], task_spec=spec)


def merged(parts: Sequence[Measurement]) -> Measurement:
    """The round Measurements of one variant merged into one (``Measurement.merge``)."""
    out = Measurement.merge(parts)
    if len(out) != 1:  # merge groups by task spec: one variant's rounds share one
        raise RuntimeError(f"internal: {len(out)} task specs among the rounds of one variant")
    return out[0]


def rounds(variants: Mapping[str, Callable[[], Measurement]], repeats: int) -> dict[str, Measurement]:
    """Run every variant's round ``repeats`` times, rotating the order each round; merge each variant's rounds."""
    names = list(variants)
    got: dict[str, list[Measurement]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            got[n].append(variants[n]())
    return {n: merged(ms) for n, ms in got.items()}


def ratio(a: Figure, b: Figure) -> Figure:
    """``a / b`` with its spread: the ratio of the medians and the range the two IQRs allow.

    >>> r = ratio({"median": 2.0, "q1": 1.8, "q3": 2.2}, {"median": 1.0, "q1": 0.9, "q3": 1.1})
    >>> round(r["median"], 3), round(r["q1"], 3), round(r["q3"], 3)
    (2.0, 1.636, 2.444)
    """

    def div(x: float, y: float) -> float:
        return x / y if y > 0 else float("nan")

    return {
        "median": div(a["median"], b["median"]),
        "q1": div(a["q1"], b["q3"]),
        "q3": div(a["q3"], b["q1"]),
        "unit": "x",
        "spread": "ratio of medians; range from both IQRs (q1/q3 to q3/q1)",
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> Figure:
    """``a / b`` round by round (values measured side by side in the same round), as a ratio figure.

    Load on a shared machine drifts between rounds and hits the variants of one round alike: the
    median of the per-round ratios, with their IQR and min-max, is steadier than a ratio of medians.

    >>> r = paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 1.0])
    >>> r["median"], r["min"], r["max"], r["n"], r["unit"]
    (2.0, 2.0, 3.0, 3, 'x')
    """
    values = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    f = figure(from_samples("paired ratio", values), what="rounds")
    return {**f, "unit": "x", "spread": f"median, IQR and min-max of {len(values)} per-round ratios"}


def compare_text(measurements: Sequence[Measurement]) -> str:
    """``torch.utils.benchmark.Compare`` of some Measurements, as text (for the console)."""
    from torch.utils.benchmark import Compare

    return str(Compare(list(measurements)))
