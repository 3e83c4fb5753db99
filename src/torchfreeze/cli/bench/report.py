"""Outputs of ``torchfreeze bench``: ``bench.md`` (markdown, shaped for BENCHMARKS.md) and the console table.

Every figure is a dict from :func:`torchfreeze.cli.bench.timing.figure` (or ``ratio``): it is printed
as its median with its spread, ``median [q1-q3]``; the spread's meaning is stated once at the top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torchfreeze._core.render import Table

__all__ = ["to_markdown", "headline_table", "fmt_figure", "headline_rows"]


def _fmt_s(s: float) -> str:
    if s != s:  # NaN
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1000:.2f} ms" if s < 10 else f"{s:.2f} s"


def fmt_figure(f: Mapping[str, Any]) -> str:
    """``median [q1-q3]`` of a figure, in its unit (seconds printed as ms/us/s, ratios as x).

    >>> fmt_figure({"median": 0.0021, "q1": 0.002, "q3": 0.0023, "unit": "s"})
    '2.10 ms [2.00-2.30 ms]'
    >>> fmt_figure({"median": 1.5, "q1": 1.25, "q3": 1.75, "unit": "x"})
    '1.500x [1.250-1.750]'
    """
    if f.get("unit") == "x":
        return f"{f['median']:.3f}x [{f['q1']:.3f}-{f['q3']:.3f}]"
    q1, q3 = _fmt_s(f["q1"]), _fmt_s(f["q3"])
    unit = q3.split()[-1]
    lo = q1.split()[0] if q1.split()[-1] == unit else q1
    return f"{_fmt_s(f['median'])} [{lo}-{q3}]"


def _goal_of(s: Mapping[str, Any], name: str) -> tuple[str, str]:
    for g in s.get("goals", []):
        if g.get("ratio") == name:
            return str(g["goal"]), "**met**" if g["met"] else "**not met**"
    return "", ""


def headline_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """``(scenario, model, measurement, value, goal, met)`` for every ratio and goal of the run."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    for s in results["scenarios"]:
        for name, f in s.get("ratios", {}).items():
            goal, met = _goal_of(s, name)
            rows.append((str(s["scenario"]), str(s["model"]), name, fmt_figure(f), goal, met))
        for g in s.get("goals", []):
            if "value" in g:
                met = "**met**" if g["met"] else "**not met**"
                rows.append((str(s["scenario"]), str(s["model"]), g["what"], f"{g['value']:+.2f}", g["goal"], met))
    return rows


def _figures_table(title: str, figs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [f"| {title} | median [IQR] | min-max | n |", "|---|---|---|---|"]
    for k, f in figs.items():
        lines.append(f"| {k} | {fmt_figure(f)} | {_fmt_s(f['min'])}-{_fmt_s(f['max'])} | {f['n']} |")
    return lines


def _probe(s: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{s['samples']} samples, batch {s['batch']}; the head trained with {s['optimizer']}. Per-epoch figures: "
        "`blocked_autorange` of one epoch; `cache_first_epoch` (freezing, wrapping and the filling epoch) and "
        f"`precompute_end_to_end` (precomputing plus {s['epochs_end_to_end']} epochs): `Timer.timeit(1)` on a "
        f"fresh model. `floor`: the head trained on features computed once up front, looked up by batch index "
        "(the inputs never read); `floor_read`: the floor plus reading each batch's inputs and hashing them once "
        "(`row_keys_fast`), the least any content-keyed cache does. `plain`: `requires_grad=False`, model in "
        "train mode; `no_grad`: backbone in "
        "eval under `torch.no_grad`.",
        "",
        *_figures_table("variant", s["seconds_per_epoch"]),
        "",
        f"Identical training: max abs difference of the final head weights against `no_grad` after "
        f"{s['identity_epochs']} epochs from the same head, same batches: "
        + ", ".join(f"{v} {d:.1e}" for v, d in s["head_max_abs_difference_vs_no_grad"].items())
        + ".",
    ]
    cs = s.get("cache_stats")
    if cs:
        lines += ["", f"Cache: {cs.get('hits')} hits, {cs.get('misses')} misses, {cs.get('bytes')} bytes."]
    return lines


def _progressive(s: Mapping[str, Any]) -> list[str]:
    epochs = s["epochs"]
    lines = [
        f"{s['source']}; {s['train_samples']} training / {s['test_samples']} held-out samples, {epochs} epochs, "
        f"batch {s['batch']}, the same initial weights, seed and batch order for every variant; {s['repeats']} "
        "run(s) per variant, order rotated. Training time excludes the held-out evaluation after each epoch "
        "(timed apart).",
        "",
        "| variant | total training | evaluation (all epochs) | final accuracy | accuracy per epoch | frozen groups |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in s["variants"].items():
        accs = " ".join(f"{a:.3f}" for a in v["accuracy_per_epoch"])
        frozen = " ".join(str(n) for n in v["frozen_groups_per_epoch"])
        lines.append(
            f"| {name} | {fmt_figure(v['total_train_seconds'])} | {fmt_figure(v['eval_seconds_total'])} | "
            f"{v['final_accuracy']:.3f} | {accs} | {frozen} |"
        )
    head = "| variant | " + " | ".join(f"epoch {i + 1}" for i in range(epochs)) + " |"
    lines += ["", "Training time per epoch (median [IQR]):", "", head, "|---" * (epochs + 1) + "|"]
    for name, v in s["variants"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_figure(f) for f in v["train_seconds_per_epoch"]) + " |")
    lines += ["", "Variants:", ""]
    for name, v in s["variants"].items():
        lines.append(f"- `{name}`: {v['description']} ({v['implementation']}); config `{v['config']}`")
    for name, v in s["variants"].items():
        st = v.get("prefix_cache_stats")
        if isinstance(st, dict):
            phases = ", ".join(f"{k} {_fmt_s(float(t))}" for k, t in st.get("seconds", {}).items())
            lines += [
                "",
                f"Prefix cache of `{name}` (first run): boundary `{st.get('boundary')}`, {st.get('hits')} hits, "
                f"{st.get('misses')} misses, {st.get('bytes')} bytes; time by phase (the cache's own account, "
                f"all epochs): {phases or 'n/a'}.",
            ]
    return lines


def _other(s: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for key in ("seconds", "block_standalone_seconds"):
        figs = s.get(key)
        if figs:
            lines += [*_figures_table("measurement", figs), ""]
    mem = s.get("memory") or {}
    if mem:
        lines += ["| variant | training memory (peak RSS above loaded model) |", "|---|---|"]
        for v, m in mem.items():
            lines.append(f"| {v} | {m['delta_mib']:.0f} MiB |" if "delta_mib" in m else f"| {v} | not measured |")
        lines.append("")
    if s.get("frozen"):
        lines += [f"Frozen: {', '.join(s['frozen'])}.", ""]
    if s.get("explain"):
        lines += ["What `explain` says:", "", "```", s["explain"], "```", ""]
    if s.get("note"):
        lines += [s["note"] + ".", ""]
    return lines


def to_markdown(results: Mapping[str, Any]) -> str:
    """The run as markdown: command, machine, headline table (spreads, goals), then one section per scenario."""
    meta = results["meta"]
    lines = [
        "# torchfreeze bench results",
        "",
        "Command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Machine: {meta['machine']}; Python {meta['python']}; torch {meta['torch']}; {meta['threads']} "
        f"thread(s); {'quick mode' if meta['quick'] else 'full mode'}; {meta['total_seconds']:.0f} s wall time.",
        "",
        "Timing: `torch.utils.benchmark` (`Timer.blocked_autorange` for per-step/per-epoch figures, `Timer.timeit(1)` "
        "on a fresh state for one-shot figures, in-run times wrapped into Measurements where evaluation or setup sits "
        "between the timed parts). Every variant of a scenario runs in this process, side by side, the order rotated "
        "each round. Each figure is `median [q1-q3]`, the interquartile range over its repetitions (min-max and "
        "counts in the tables). Ratios of scenarios 1, 5 and 6 are paired: one ratio per round (the two variants "
        "ran side by side in it), then their median [IQR]; the other ratios are ratios of medians, their range "
        "from both IQRs (q1/q3 to q3/q1). Every `spread` field of bench.json says which.",
        "",
        "## Headline",
        "",
        "| scenario | model | measurement | median [range] | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in headline_rows(results)]
    for s in results["scenarios"]:
        lines += ["", f"## {s['scenario']}. {s['title']} ({s['model']})", ""]
        if s["scenario"] == 1:
            lines += _probe(s)
        elif s["scenario"] == 6:
            lines += _progressive(s)
        else:
            lines += _other(s)
    return "\n".join(lines).rstrip("\n") + "\n"


def headline_table(results: Mapping[str, Any]) -> Table:
    """The headline of a run, for the terminal (the same rows as ``bench.md``'s first table)."""
    rows: list[Sequence[Any]] = [tuple(c.replace("**", "") for c in r) for r in headline_rows(results)]
    return Table(("scenario", "model", "measurement", "median [range]", "goal", "met"), rows, title="headline")
