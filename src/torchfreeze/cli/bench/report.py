"""Outputs of ``torchfreeze bench``: ``bench.md`` (markdown, a file format), the PNG plot, and the console table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchfreeze._core.render import Table

__all__ = ["to_markdown", "plot", "headline_table"]


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.1f} s"


def to_markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (ratios first)."""
    meta = results["meta"]
    lines = [
        "# torchfreeze bench results",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; "
        f"{'quick mode' if meta['quick'] else 'full mode'}; total {meta['total_seconds']:.0f} s.",
        "",
        "## Headline ratios",
        "",
        "| scenario | model | ratio | value |",
        "|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        for k, v in s.get("ratios", {}).items():
            lines.append(f"| {s['scenario']}. {s['title']} | {s['model']} | {k} | {v:.3f} |")
    for s in results["scenarios"]:
        lines += ["", f"## {s['scenario']}. {s['title']} ({s['model']})", ""]
        if s["scenario"] == 1:
            lines.append(
                f"{s['samples']} samples, batch {s['batch']}, {s['epochs']} epochs, shuffled batches of the "
                "in-memory data set (the same loader for every variant); median seconds per epoch "
                "(epoch 1 includes setting up: freezing and wrapping the backbone). "
                "First-epoch ratios compare with the plain variant's median over all its epochs (same work each)."
            )
            lines.append("")
            head = "| variant | " + " | ".join(f"epoch {i + 1}" for i in range(s["epochs"])) + " |"
            lines += [head, "|---" * (s["epochs"] + 1) + "|"]
            for v, ts in s["median_epoch_seconds"].items():
                lines.append(f"| {v} | " + " | ".join(_fmt_s(t) for t in ts) + " |")
            if s.get("cache_stats"):
                cs = s["cache_stats"]
                lines += [
                    "",
                    f"Cache (last torchfreeze run): {cs['hits']} hits, {cs['misses']} misses, "
                    f"{cs['bytes']} bytes in memory.",
                ]
        elif s["scenario"] == 2:
            lines += ["| variant | median step | training memory (peak RSS above loaded model) |", "|---|---|---|"]
            for v, t in s["median_step_seconds"].items():
                m = s["memory"].get(v, {})
                mem = f"{m['delta_mib']:.0f} MiB" if "delta_mib" in m else m.get("error", "not measured")[:60]
                lines.append(f"| {v} | {_fmt_s(t)} | {mem} |")
            lines += ["", f"Frozen: {', '.join(s['frozen'])}; batch {s['batch']}."]
        elif s["scenario"] == 3:
            st = s["block_standalone_seconds"]
            lines += [
                f"Frozen: {', '.join(s['frozen'])}; embeddings and layers 0-1 train; batch {s['batch']}.",
                "",
                "| measurement | time |",
                "|---|---|",
                f"| block backward inside the model (explain) | {_fmt_s(s['block_backward_in_model_seconds'])} |",
                f"| block alone: input gradients only | {_fmt_s(st['input_grad_only'])} |",
                f"| block alone: input + weight gradients | {_fmt_s(st['input_and_weight_grad'])} |",
                f"| block alone: forward | {_fmt_s(st['forward'])} |",
            ]
            for k, v in s["median_step_seconds"].items():
                lines.append(f"| step, {k} | {_fmt_s(v)} |")
            lines += ["", "What `explain` says:", "", "```", s["explain"], "```"]
        elif s["scenario"] == 4:
            lines += ["| variant | median forward | max abs diff vs BatchNorm2d eval |", "|---|---|---|"]
            for v, t in s["median_forward_seconds"].items():
                lines.append(f"| {v} | {_fmt_s(t)} | {s['max_abs_difference_vs_plain'][v]:.1e} |")
        elif s["scenario"] == 5:
            lines += ["| variant | median step | against | overhead |", "|---|---|---|---|"]
            for v, t in s["median_step_seconds"].items():
                o = s["overhead"].get(v)
                extra = f"{o['against']} | {o['overhead_percent']:+.2f}%" if o else "- | -"
                lines.append(f"| {v} | {_fmt_s(t)} | {extra} |")
            iso = s.get("isolated")
            if iso:
                lines += [
                    "",
                    "The machinery alone (median per call; share of the plain step "
                    f"{_fmt_s(iso['plain_step_us'] / 1e6)}):",
                    "",
                    "| what | plain | torchfreeze | extra per step |",
                    "|---|---|---|---|",
                ]
                tu, bu, pct = iso["train_call_us"], iso["block_forward_us"], iso["overhead_percent_of_step"]
                for k in ("pins", "freeze_unfreeze_leftovers"):
                    lines.append(f"| `model.train()` ({k}) | {tu['plain']:.1f} us | {tu[k]:.1f} us | {pct[k]:+.3f}% |")
                lines.append(
                    f"| frozen block forward (Frozen vs requires_grad_(False)) | {bu['plain_frozen_block']:.0f} us "
                    f"| {bu['Frozen_wrapper']:.0f} us | {pct['Frozen_wrapper']:+.3f}% |"
                )
            lines += ["", s["note"] + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional dependency
        return f"plot skipped: {exc}"
    probes = [s for s in results["scenarios"] if s["scenario"] == 1]
    if not probes:
        return "plot skipped: scenario 1 did not run"
    fig, axes = plt.subplots(1, len(probes), figsize=(5.5 * len(probes), 4), squeeze=False)
    for ax, s in zip(axes[0], probes):
        for v, ts in s["median_epoch_seconds"].items():
            ax.plot(range(1, len(ts) + 1), ts, marker="o", label=v)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("seconds per epoch (median, log scale)")
        ax.set_title(f"linear probe, {s['model']}")
        ax.set_xticks(range(1, s["epochs"] + 1))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def headline_table(results: dict[str, Any]) -> Table:
    """The headline ratios of a run, for the terminal (the same rows as ``bench.md``'s first table)."""
    rows: list[Sequence[Any]] = [
        (f"{s['scenario']}", s["model"], name, f"{value:.3f}")
        for s in results["scenarios"]
        for name, value in s.get("ratios", {}).items()
    ]
    return Table(("scenario", "model", "ratio", "value"), rows, title="headline ratios")
