"""Turn what ``explain`` recorded into its report: one :class:`FrozenPart` per part, and ranked steps."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from torchfreeze._core.behaviour import nondeterministic_modules
from torchfreeze.nn import foldable_pairs
from torchfreeze.speed._recorder import PartRecord
from torchfreeze.speed.refusal import cache_refusal_reasons
from torchfreeze.speed.report import Explanation, FrozenPart, format_bytes

__all__ = ["frozen_part", "speed_up_steps"]

Mode = Literal["train", "eval"]

#: how :class:`~torchfreeze.speed._recorder.StepRecorder` names a module that makes a tensor require grad
_FORCER = "which sets requires_grad=True on a tensor in its forward"


def _modes_in(model: nn.Module, module: nn.Module, mode: Mode) -> list[tuple[nn.Module, bool]]:
    """The flags ``module``'s subtree had during the explained step (model.train/eval, pins respected)."""
    saved = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        model.train(mode == "train")
    during = [(m, m.training) for m in module.modules()]
    for m, flag in saved:
        m.training = flag
    return during


def _join(name: str, child: str) -> str:
    return f"{name}.{child}" if name and child else (name or child)


def frozen_part(
    record: PartRecord, model: nn.Module, mode: Mode | None, step_ms: float, total_activation_bytes: int
) -> FrozenPart:
    """The report of one recorded frozen part, judged in the mode the step ran in."""
    name, module = record.name, record.module
    now = [(m, m.training) for m in module.modules()]
    if mode is not None:
        for m, flag in _modes_in(model, module, mode):
            m.training = flag
    try:
        reasons = cache_refusal_reasons(module, prefix=name)
        found = nondeterministic_modules(module, prefix=name)
    finally:
        for m, flag in now:
            m.training = flag
    if record.on_path:
        why = ", ".join(record.upstream[:2]) or "an input that requires grad"
        reasons = [f"its input depends on {why}, so a cached output would cut the gradient path", *reasons]
    backward_ms = record.backward_ms
    return FrozenPart(
        name=name,
        type=type(module).__name__,
        parameters=sum(p.numel() for p in module.parameters()),
        calls=record.calls,
        on_backward_path=record.on_path,
        upstream=list(record.upstream),
        can_skip_autograd=not record.on_path,
        cacheable=not reasons,
        not_cacheable_because=reasons,
        stochastic_layers=[f.name for f in found if f.kind == "random"],
        updating_batchnorms=[f.name for f in found if f.kind == "updates-statistics"],
        forward_ms=record.forward_ms,
        backward_ms=backward_ms,
        time_share=(record.forward_ms + backward_ms) / step_ms if step_ms > 0 else 0.0,
        activation_bytes=record.activation_bytes,
        activation_share=record.activation_bytes / total_activation_bytes if total_activation_bytes else 0.0,
    )


# --------------------------------------------------------------------------- steps


def _expr(name: str) -> str:
    """``"a.0.b"`` -> ``"model.a[0].b"`` (a Python expression for the submodule)."""
    out = "model"
    for seg in name.split(".") if name else []:
        out += f"[{seg}]" if seg.isdigit() else f".{seg}"
    return out


def _lift(name: str, frozen_names: set[str]) -> str:
    """The highest ancestor of ``name`` whose whole subtree is frozen (``name`` itself if none)."""
    best = name
    parts = name.split(".") if name else []
    for i in range(len(parts) - 1, -1, -1):
        ancestor = ".".join(parts[:i])
        if ancestor not in frozen_names:
            break
        best = ancestor
    return best


def _cache_steps(report: Explanation, frozen_names: set[str]) -> list[tuple[float, str]]:
    """Off the backward path and deterministic: cache, at the highest fully frozen ancestor."""
    targets: dict[str, float] = {}
    for p in report.parts:
        if not p.on_backward_path and p.cacheable:
            t = _lift(p.name, frozen_names)
            targets[t] = targets.get(t, 0.0) + p.time_share
    if len(targets) == 1 or (targets and report.trainable_parameters == 0):
        ranked = []
        for t, share in targets.items():
            label = f"'{t}'" if t else "the model"
            speed = f"{1.0 / (1.0 - share):.1f}x" if share < 0.999 else "many times"
            ranked.append(
                (
                    share,
                    f"Cache {label} with `{_expr(t)} = cache_features({_expr(t)})`: it takes {share:.0%} of the "
                    f"step and nothing before it trains, so from the second epoch on its forward is a lookup "
                    f"(step up to {speed} faster on repeated inputs; inputs augmented each epoch miss the cache).",
                )
            )
        return ranked
    if not targets:
        return []
    share = sum(targets.values())
    names = list(targets)
    shown = ", ".join(f"'{n}'" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return [
        (
            share,
            f"The frozen parts {shown} take {share:.0%} of the step and nothing before them trains, but they "
            "are not one module: `prefix = cache_frozen_prefix(model)` stores the output of the model's "
            "frozen leading layer groups and skips them from the second epoch on (it checks that the skip "
            "is exact). Otherwise move them into one frozen sub-module and wrap it with cache_features; "
            f"caching each part separately (e.g. `{_expr(names[-1])} = cache_features({_expr(names[-1])})`) "
            "still runs and hashes every part's inputs.",
        )
    ]


def _pin_step(p: FrozenPart) -> tuple[float, str]:
    """A part off the backward path that is not cacheable: pin eval when randomness or statistics are why."""
    label = f"'{p.name}'" if p.name else "the model"
    share = p.time_share
    fix = []
    if p.stochastic_layers:
        fix.append(
            f"its {len(p.stochastic_layers)} dropout layer(s) (e.g. '{p.stochastic_layers[0]}') run in train mode"
        )
    if p.updating_batchnorms:
        fix.append(f"its BatchNorm layer(s) (e.g. '{p.updating_batchnorms[0]}') update their statistics")
    if not fix:
        return share * 0.1, f"{label} is not cacheable: " + "; ".join(p.not_cacheable_because) + "."
    return (
        share + 0.01,
        f"Pin {label} to eval mode with `freeze(model, '{p.name}', mode='eval')`"
        + (f" and `freeze_batchnorm(model, '{p.name}')`" if p.updating_batchnorms else "")
        + f": {' and '.join(fix)}, which costs time, changes the frozen part's output from step "
        f"to step and prevents caching. Then cache it (it takes {share:.0%} of the step).",
    )


def _backward_path_step(p: FrozenPart, step_ms: float) -> tuple[float, str]:
    """A frozen part behind trainable layers: the price of its input gradients."""
    label = f"'{p.name}'" if p.name else "the model"
    via = p.upstream[0] if p.upstream else "an input that requires grad"
    bshare = p.backward_ms / step_ms if step_ms else 0.0
    if _FORCER in via:
        forcer = via.split("'")[1]
        return bshare * 0.5 + 0.01, (
            f"{label} is frozen but on the backward path because {via} (a model's own switch, such as Hugging "
            f"Face's _requires_grad on feature encoders): autograd keeps {format_bytes(p.activation_bytes)} of "
            f"its activations for input gradients nothing uses. Fix: `freeze(model, '{forcer}')` turns that "
            f"switch off (as model.freeze_feature_encoder() does), or call its _freeze_parameters()."
        )
    text = (
        f"{label} is frozen but on the backward path because {via} trains before it: its backward "
        f"({p.backward_ms:.1f} ms, {bshare:.0%} of the step) computes only input gradients, and "
        f"autograd keeps {format_bytes(p.activation_bytes)} of its activations. Freezing everything "
        f"before it too would remove that cost and make it cacheable; otherwise this is the price "
        f"of training {via}."
    )
    if p.stochastic_layers:
        text += (
            f" Its {len(p.stochastic_layers)} dropout layer(s) run in train mode: pinning it to eval "
            f"(`freeze(model, '{p.name}', mode='eval')`) also saves their cost."
        )
    return bshare * 0.5, text


def _fold_steps(report: Explanation, model: nn.Module) -> list[tuple[float, str]]:
    """Frozen parts with Conv/Linear -> BatchNorm pairs that can be folded."""
    ranked = []
    for p in report.parts:
        module = model.get_submodule(p.name) if p.name else model
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            continue
        ok = [(c, b) for c, b, reason in foldable_pairs(module) if reason is None]
        if ok:
            ranked.append(
                (
                    p.time_share * 0.05,
                    f"Fold the {len(ok)} frozen BatchNorm layer(s) of {p.name or 'the model'} into the "
                    f"layers before them with `fold_batchnorm(model, '{p.name}')` (documented state_dict "
                    "change; unfold_batchnorm is the way back).",
                )
            )
    return ranked


def speed_up_steps(report: Explanation, model: nn.Module, frozen_names: set[str]) -> list[str]:
    """The best available speed-up steps, in plain words, largest expected saving first."""
    ranked: list[tuple[float, str]] = []
    if report.trainable_parameters == 0:
        ranked.append((2.0, "Nothing trains: run the model under torch.inference_mode() and in eval mode."))
    ranked += _cache_steps(report, frozen_names)
    for p in report.parts:
        if not p.on_backward_path and not p.cacheable:
            ranked.append(_pin_step(p))
        elif p.on_backward_path:
            ranked.append(_backward_path_step(p, report.step_ms))
    ranked += _fold_steps(report, model)
    ranked.sort(key=lambda r: -r[0])
    return [s for _, s in ranked]
