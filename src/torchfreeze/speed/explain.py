"""``explain``: what freezing saves in a model, measured, and why not more.

One forward and one backward pass on an example tell, for every frozen part of
the model (each maximal subtree whose parameters are all frozen):

* whether it sits on the backward path, and which trainable parameter or input
  upstream puts it there (gradients must then flow *through* it to reach that
  parameter, at the cost of its input gradients);
* whether its forward could run without autograd (off the backward path);
* whether its outputs are cacheable with :func:`torchfreeze.cache_features`, and why not;
* its measured share of the step time and of the activation memory autograd saves.

It ends with the best available speed-up steps, in plain words. The model is
left exactly as it was: train/eval flags, gradients, buffers (BatchNorm
statistics) and the random number generator state are restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torchfreeze.errors import ArgumentError

__all__ = ["explain", "Explanation", "FrozenPart"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_MAX_GRAPH_NODES = 20000


@dataclass
class FrozenPart:
    """What :func:`explain` found about one frozen part of the model (one entry of ``Explanation.parts``).

    >>> from torchfreeze import freeze
    >>> part = explain(freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0"), torch.ones(4, 2)).parts[0]
    >>> part.name, part.on_backward_path, part.cacheable
    ('0', False, True)
    """

    name: str
    type: str
    parameters: int
    calls: int
    on_backward_path: bool
    upstream: list[str]
    can_skip_autograd: bool
    cacheable: bool
    not_cacheable_because: list[str]
    stochastic_layers: list[str]
    updating_batchnorms: list[str]
    forward_ms: float
    backward_ms: float
    time_share: float
    activation_bytes: int
    activation_share: float


@dataclass
class Explanation:
    """The report of :func:`explain`: per frozen part, totals, and speed-up steps.

    ``str()`` gives a plain-text table followed by the steps; ``to_dict()`` a JSON-able dict.

    >>> from torchfreeze import freeze
    >>> report = explain(freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0"), torch.ones(4, 2))
    >>> report.part("0").can_skip_autograd, "Best speed-up steps" in str(report)
    (True, True)
    """

    parts: list[FrozenPart]
    forward_ms: float
    backward_ms: float
    activation_bytes: int
    trainable_parameters: int
    frozen_parameters: int
    steps: list[str] = field(default_factory=list)

    @property
    def step_ms(self) -> float:
        """Measured forward + backward time of the example step."""
        return self.forward_ms + self.backward_ms

    def part(self, name: str) -> FrozenPart:
        """The report of the frozen part called ``name`` (KeyError if there is none)."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no frozen part named {name!r}; parts: {[p.name for p in self.parts]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form of the whole report."""
        d = asdict(self)
        d["step_ms"] = self.step_ms
        return d

    def __str__(self) -> str:
        lines = [
            f"explain: one training step took {self.step_ms:.1f} ms (forward {self.forward_ms:.1f}, "
            f"backward {self.backward_ms:.1f}); autograd saved {_fmt_bytes(self.activation_bytes)} of activations.",
            f"parameters: {self.trainable_parameters:,} trainable, {self.frozen_parameters:,} frozen.",
        ]
        if not self.parts:
            lines.append("No frozen part: every parameter trains.")
        else:
            header = ("frozen part", "type", "backward path", "no autograd", "cacheable", "time", "activations")
            rows = []
            for p in self.parts:
                rows.append(
                    (
                        p.name or "<model>",
                        p.type,
                        ("yes, via " + p.upstream[0])
                        if p.on_backward_path and p.upstream
                        else ("yes" if p.on_backward_path else "no"),
                        "yes" if p.can_skip_autograd else "no",
                        "yes" if p.cacheable else "no",
                        f"{p.time_share:.0%} ({p.forward_ms:.1f}+{p.backward_ms:.1f} ms)",
                        f"{p.activation_share:.0%} ({_fmt_bytes(p.activation_bytes)})",
                    )
                )
            widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
            for r in [header, *rows]:
                lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
            for p in self.parts:
                if p.not_cacheable_because:
                    lines.append(f"- {p.name or '<model>'} is not cacheable: " + "; ".join(p.not_cacheable_because))
        lines.append("Best speed-up steps:")
        if self.steps:
            lines.extend(f"  {i}. {s}" for i, s in enumerate(self.steps, 1))
        else:
            lines.append("  none: freezing already saves what it can here.")
        return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _tensors(obj: Any) -> list[Tensor]:
    out: list[Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            out.append(o)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)

    walk(obj)
    return out


def _default_loss(output: Any) -> Tensor | None:
    terms = [t.float().sum() for t in _tensors(output) if t.requires_grad and t.is_floating_point()]
    if not terms:
        return None
    return torch.stack(terms).sum()


def _trainable_ids(model: nn.Module) -> set[int]:
    try:
        from torchfreeze.nn.freezing import trainable_parameters
    except Exception:  # the core is always there in the package; keep a fallback anyway
        return {id(p) for p in model.parameters() if p.requires_grad}
    return {id(p) for _, p in trainable_parameters(model)}


def _frozen_modules(model: nn.Module, trainable: set[int]) -> list[tuple[str, nn.Module]]:
    """Every module (first path) that has parameters, none of them trainable, in model order."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(id(p) in trainable for p in params):
            out.append((name, module))
    return out


def _upstream(tensors: list[Tensor], names: dict[int, str], limit: int = 3) -> list[str]:
    """Nearest trainable parameters / inputs behind ``tensors`` in the autograd graph (BFS)."""
    found: list[str] = []
    seen: set[int] = set()
    queue: list[Any] = []
    for t in tensors:
        if not t.requires_grad:
            continue
        if t.grad_fn is None:
            n = names.get(id(t))
            if n and n not in found:
                found.append(n)
        else:
            queue.append(t.grad_fn)
    i = 0
    while i < len(queue) and len(found) < limit and i < _MAX_GRAPH_NODES:
        node = queue[i]
        i += 1
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            n = names.get(id(var), "a tensor created outside the model")
            if n not in found:
                found.append(n)
            continue
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None:
                queue.append(nxt)
    return found


def explain(
    model: nn.Module,
    *example_inputs: Any,
    mode: str | None = "train",
    loss_fn: Callable[[Any], Tensor] | None = None,
    warmup: bool = True,
) -> Explanation:
    """Measure what freezing saves in ``model`` on one example step, and how to save more.

    Args:
        model: any ``nn.Module``.
        *example_inputs: passed to ``model(*example_inputs)`` (a batch like the real ones).
        mode: ``"train"`` (default: explain a training step; pins respected),
            ``"eval"``, or ``None`` for the model's current flags.
        loss_fn: maps the model's output to a scalar loss; default: the sum of
            every floating-point output tensor that requires grad.
        warmup: run one forward without autograd first, so one-off costs are not measured.

    Returns:
        An :class:`Explanation` (``print`` it, or read ``.parts`` and ``.steps``).

    Raises:
        ArgumentError: ``model`` is not a module, a bad ``mode``, or ``loss_fn``
            returned something other than a scalar tensor.

    >>> from torchfreeze import freeze
    >>> model = freeze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "0")
    >>> report = explain(model, torch.randn(3, 4))
    >>> [(p.name, p.on_backward_path, p.cacheable) for p in report.parts]
    [('0', False, True)]
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"explain: model must be an nn.Module, got {type(model).__name__}.")
    if mode not in ("train", "eval", None):
        raise ArgumentError(f"explain: mode must be 'train', 'eval' or None, got {mode!r}.")
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentError(f"explain: loss_fn must be callable or None, got {type(loss_fn).__name__}.")

    from torchfreeze.speed.cache import cache_refusal_reasons

    trainable = _trainable_ids(model)
    parts = _frozen_modules(model, trainable)
    frozen_names = {n for n, _ in parts}
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), f"parameter '{n}'")
    for i, x in enumerate(example_inputs):
        for t in _tensors(x):
            names.setdefault(id(t), f"example input #{i}")
    param_ptrs = {p.data_ptr() for p in model.parameters()}

    # Everything explain may change, saved to be restored exactly.
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    # the example inputs' gradients too: backward would accumulate into them (and into existing .grad in place)
    input_leaves = {id(t): t for x in example_inputs for t in _tensors(x) if t.is_leaf and t.requires_grad}
    input_grads = [(t, t.grad) for t in input_leaves.values()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    stats = {
        name: {
            "fwd": 0.0,
            "bwd": 0.0,
            "calls": 0,
            "on_path": False,
            "upstream": [],
            "act": 0,
            "seen": set(),
            "out_t": None,
            "in_t": None,
        }
        for name, _ in parts
    }
    current: list[str] = []  # the outermost frozen module being run, if any
    depth = [0]
    total_act = [0, set()]
    handles = []

    def pre_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            depth[0] += 1
            if current:  # nested inside an outer frozen module: it is accounted there
                return
            current.append(name)
            stats[name]["start"] = time.perf_counter()

        return hook

    def post_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            depth[0] -= 1
            if not current or current[0] != name or depth[0] != 0:
                return
            current.pop()
            s = stats[name]
            s["fwd"] += (time.perf_counter() - s.pop("start")) * 1000
            s["calls"] += 1
            if not torch.is_grad_enabled():
                return
            ins = [t for t in _tensors((args, kwargs)) if t.requires_grad]
            outs = [t for t in _tensors(output) if t.requires_grad]
            if ins or outs:
                s["on_path"] = True
                for u in _upstream(ins or outs, names):
                    if u not in s["upstream"]:
                        s["upstream"].append(u)
            if outs and ins:

                def out_hook(g: Tensor) -> None:
                    if s["out_t"] is None:
                        s["out_t"] = time.perf_counter()

                def in_hook(g: Tensor) -> None:
                    s["in_t"] = time.perf_counter()

                for t in outs:
                    handles.append(t.register_hook(out_hook))
                for t in ins:
                    if t.grad_fn is not None or t.is_leaf:
                        handles.append(t.register_hook(in_hook))  # removed at the end (inputs outlive explain)

        return hook

    def pack(t: Tensor) -> Tensor:
        try:
            ptr = t.data_ptr()
        except Exception:
            return t
        if ptr in param_ptrs or isinstance(t, nn.Parameter):
            return t
        key = (ptr, t.numel(), t.dtype)
        nbytes = t.numel() * t.element_size()
        if key not in total_act[1]:
            total_act[1].add(key)
            total_act[0] += nbytes
        if current:
            s = stats[current[0]]
            if key not in s["seen"]:
                s["seen"].add(key)
                s["act"] += nbytes
        return t

    def unpack(t: Tensor) -> Tensor:
        return t

    try:
        # backward accumulates in place into an existing .grad: start from None, restore the objects after
        for p, _ in grads:
            p.grad = None
        for t, _ in input_grads:
            t.grad = None
        if mode is not None:
            model.train(mode == "train")
        if warmup:
            with torch.no_grad():
                model(*example_inputs)
            for b, saved in buffers:
                b.copy_(saved)
        for name, module in parts:
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            t0 = time.perf_counter()
            output = model(*example_inputs)
            forward_ms = (time.perf_counter() - t0) * 1000
        loss = loss_fn(output) if loss_fn is not None else _default_loss(output)
        if loss is not None and not (isinstance(loss, Tensor) and loss.numel() == 1):
            raise ArgumentError(
                f"explain: loss_fn must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
                + ". Fix: reduce it, e.g. loss_fn=lambda out: out.logits.sum()."
            )
        backward_ms = 0.0
        if loss is not None and loss.requires_grad:
            t0 = time.perf_counter()
            loss.backward()
            backward_ms = (time.perf_counter() - t0) * 1000
        del output, loss
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
        for p, g in grads:
            p.grad = g
        for t, g in input_grads:
            t.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    step_ms = forward_ms + backward_ms
    frozen_count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in trainable)
    trainable_count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) in trainable)
    reports: list[FrozenPart] = []
    for name, module in parts:
        s = stats[name]
        if s["calls"] == 0:
            continue
        bwd = 0.0
        if s["out_t"] is not None and s["in_t"] is not None:
            bwd = max(0.0, (s["in_t"] - s["out_t"]) * 1000)
        mode_flags_now = [(m, m.training) for m in module.modules()]
        # Judge cacheability and stochastic layers in the mode the step ran in.
        if mode is not None:
            with torch.no_grad():
                module_modes = _modes_in(model, module, mode)
            for m, flag in module_modes:
                m.training = flag
        reasons = cache_refusal_reasons(module, prefix=name)
        dropouts = [
            f"{name}.{n}" if n else name
            for n, m in module.named_modules()
            if isinstance(m, _DROPOUT) and m.training and m.p > 0
        ]
        bns = [
            f"{name}.{n}" if n else name
            for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        ]
        for m, flag in mode_flags_now:
            m.training = flag
        if s["on_path"]:
            why = ", ".join(s["upstream"][:2]) or "an input that requires grad"
            reasons = [f"its input depends on {why}, so a cached output would cut the gradient path", *reasons]
        reports.append(
            FrozenPart(
                name=name,
                type=type(module).__name__,
                parameters=sum(p.numel() for p in module.parameters()),
                calls=s["calls"],
                on_backward_path=s["on_path"],
                upstream=list(s["upstream"]),
                can_skip_autograd=not s["on_path"],
                cacheable=not reasons,
                not_cacheable_because=reasons,
                stochastic_layers=dropouts,
                updating_batchnorms=bns,
                forward_ms=s["fwd"],
                backward_ms=bwd,
                time_share=(s["fwd"] + bwd) / step_ms if step_ms > 0 else 0.0,
                activation_bytes=s["act"],
                activation_share=s["act"] / total_act[0] if total_act[0] else 0.0,
            )
        )
    result = Explanation(
        parts=reports,
        forward_ms=forward_ms,
        backward_ms=backward_ms,
        activation_bytes=total_act[0],
        trainable_parameters=trainable_count,
        frozen_parameters=frozen_count,
    )
    result.steps = _steps(result, model, frozen_names)
    return result


def _modes_in(model: nn.Module, module: nn.Module, mode: str) -> list[tuple[nn.Module, bool]]:
    """The flags ``module``'s subtree had during the explained step (model.train/eval, pins respected)."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    during = [(m, m.training) for m in module.modules()]
    for m, flag in saved:
        m.training = flag
    return during


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
        anc = ".".join(parts[:i])
        if anc in frozen_names:
            best = anc
        else:
            break
    return best


def _steps(report: Explanation, model: nn.Module, frozen_names: set[str]) -> list[str]:
    ranked: list[tuple[float, str]] = []
    if report.trainable_parameters == 0:
        ranked.append((2.0, "Nothing trains: run the model under torch.inference_mode() and in eval mode."))

    # Off the backward path and deterministic: cache, at the highest fully frozen ancestor.
    targets: dict[str, float] = {}
    for p in report.parts:
        if not p.on_backward_path and p.cacheable:
            t = _lift(p.name, frozen_names)
            targets[t] = targets.get(t, 0.0) + p.time_share
    if len(targets) == 1 or (targets and report.trainable_parameters == 0):
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
    elif targets:
        share = sum(targets.values())
        names = list(targets)
        shown = ", ".join(f"'{n}'" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        ranked.append(
            (
                share,
                f"The frozen parts {shown} take {share:.0%} of the step and nothing before them trains, but they "
                "are not one module: move them into one frozen sub-module (a feature extractor) and wrap it with "
                "cache_features, so that from the second epoch on they cost one lookup. Caching each part "
                f"separately also works (e.g. `{_expr(names[-1])} = cache_features({_expr(names[-1])})`) but "
                "still runs and hashes every part's inputs.",
            )
        )

    for p in report.parts:
        label = f"'{p.name}'" if p.name else "the model"
        share = p.time_share
        if not p.on_backward_path and not p.cacheable:
            fix = []
            if p.stochastic_layers:
                fix.append(
                    f"its {len(p.stochastic_layers)} dropout layer(s) (e.g. '{p.stochastic_layers[0]}') run in train mode"
                )
            if p.updating_batchnorms:
                fix.append(f"its BatchNorm layer(s) (e.g. '{p.updating_batchnorms[0]}') update their statistics")
            if fix:
                ranked.append(
                    (
                        share + 0.01,
                        f"Pin {label} to eval mode with `freeze(model, '{p.name}', mode='eval')`"
                        + (f" and `freeze_batchnorm(model, '{p.name}')`" if p.updating_batchnorms else "")
                        + f": {' and '.join(fix)}, which costs time, changes the frozen part's output from step "
                        f"to step and prevents caching. Then cache it (it takes {share:.0%} of the step).",
                    )
                )
            else:
                ranked.append((share * 0.1, f"{label} is not cacheable: " + "; ".join(p.not_cacheable_because) + "."))
        elif p.on_backward_path:
            via = p.upstream[0] if p.upstream else "an input that requires grad"
            bshare = p.backward_ms / report.step_ms if report.step_ms else 0.0
            ranked.append(
                (
                    bshare * 0.5,
                    f"{label} is frozen but on the backward path because {via} trains before it: its backward "
                    f"({p.backward_ms:.1f} ms, {bshare:.0%} of the step) computes only input gradients, and "
                    f"autograd keeps {_fmt_bytes(p.activation_bytes)} of its activations. Freezing everything "
                    f"before it too would remove that cost and make it cacheable; otherwise this is the price "
                    f"of training {via}."
                    + (
                        f" Its {len(p.stochastic_layers)} dropout layer(s) run in train mode: pinning it to eval "
                        f"(`freeze(model, '{p.name}', mode='eval')`) also saves their cost."
                        if p.stochastic_layers
                        else ""
                    ),
                )
            )
    try:
        from torchfreeze.nn.fold import foldable_pairs

        for p in report.parts:
            module = model.get_submodule(p.name) if p.name else model
            if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
                continue
            ok = [(c, b) for c, b, r in foldable_pairs(module) if r is None]
            if ok:
                ranked.append(
                    (
                        p.time_share * 0.05,
                        f"Fold the {len(ok)} frozen BatchNorm layer(s) of {p.name or 'the model'} into the "
                        f"layers before them with `fold_batchnorm(model, '{p.name}')` (documented state_dict "
                        "change; unfold_batchnorm is the way back).",
                    )
                )
    except Exception:
        pass
    ranked.sort(key=lambda r: -r[0])
    return [s for _, s in ranked]
