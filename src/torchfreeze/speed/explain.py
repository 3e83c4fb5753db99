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

The measuring is :class:`~torchfreeze.speed._recorder.StepRecorder`'s; turning
the record into the :class:`~torchfreeze.speed.report.Explanation` is
:mod:`torchfreeze.speed._advice`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torchfreeze._core.checks import bind_problem, require_bool, require_choice, require_module, short_repr
from torchfreeze._core.tree import tensor_leaves
from torchfreeze._core.uses import parameter_uses
from torchfreeze._core.wrappers import unwrap
from torchfreeze.errors import ArgumentError, ArgumentTypeError
from torchfreeze.speed._advice import frozen_part, speed_up_steps
from torchfreeze.speed._recorder import ModelSnapshot, StepRecorder
from torchfreeze.speed.report import Explanation, FrozenPart

__all__ = ["explain", "Explanation", "FrozenPart"]


def _frozen_modules(model: nn.Module, trainable: set[int]) -> list[tuple[str, nn.Module]]:
    """Every module (first path) that has parameters, none of them trainable, in model order."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(id(p) in trainable for p in params):
            out.append((name, module))
    return out


def _default_loss(output: Any) -> Tensor | None:
    terms = [t.float().sum() for t in tensor_leaves(output) if t.requires_grad and t.is_floating_point()]
    if not terms:
        return None
    return torch.stack(terms).sum()


def _scalar_loss(loss: Any) -> Tensor | None:
    if loss is None or (isinstance(loss, Tensor) and loss.numel() == 1):
        return loss
    raise ArgumentError(
        f"explain: loss_fn must return a scalar tensor, got {type(loss).__name__}"
        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
        + ". Fix: reduce it, e.g. loss_fn=lambda out: out.logits.sum()."
    )


def _require_inputs(model: nn.Module, example_inputs: tuple[Any, ...]) -> None:
    """Refuse example inputs that ``model.forward`` cannot take (checked on its signature, nothing runs)."""
    inner = unwrap(model)  # DDP / DataParallel / torch.compile pass the inputs on to the inner forward
    if model._forward_pre_hooks or inner._forward_pre_hooks:  # a pre-hook may supply the arguments
        return
    problem = bind_problem(inner.forward, *example_inputs)
    if problem is None:
        return
    given = "no example inputs" if not example_inputs else f"{len(example_inputs)} example input(s)"
    shown = ", ".join(
        f"tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else short_repr(t, 30) for t in example_inputs[:3]
    ) + (", ..." if len(example_inputs) > 3 else "")
    raise ArgumentError(
        f"explain(example_inputs=({shown})): {type(inner).__name__}.forward cannot take "
        f"{given} ({problem}); expected the positional inputs of one training batch. "
        "Fix: pass them after the model, e.g. explain(model, batch)."
    )


def _run_step(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    recorder: StepRecorder,
    mode: Literal["train", "eval"] | None,
    loss_fn: Callable[[Any], Tensor] | None,
    warmup: bool,
) -> tuple[float, float]:
    """One forward and backward with the recorder installed; the model is restored after. Returns the ms."""
    snapshot = ModelSnapshot(model, example_inputs)
    try:
        snapshot.clear_grads()
        if mode is not None:
            model.train(mode == "train")
        if warmup:
            with torch.no_grad():
                model(*example_inputs)
            snapshot.restore_buffers()
        recorder.install()
        with torch.enable_grad(), recorder.saved_tensors():
            t0 = time.perf_counter()
            output = model(*example_inputs)
            forward_ms = (time.perf_counter() - t0) * 1000
        loss = _scalar_loss(loss_fn(output) if loss_fn is not None else _default_loss(output))
        backward_ms = 0.0
        if loss is not None and loss.requires_grad:
            t0 = time.perf_counter()
            loss.backward()  # type: ignore[no-untyped-call]
            backward_ms = (time.perf_counter() - t0) * 1000
        del output, loss
    finally:
        recorder.remove()
        snapshot.restore()
    return forward_ms, backward_ms


def explain(
    model: nn.Module,
    *example_inputs: Any,
    mode: Literal["train", "eval"] | None = "train",
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
        An :class:`~torchfreeze.speed.Explanation` (``print`` it, or read ``.parts`` and ``.steps``).

    Raises:
        ArgumentTypeError: ``model`` is not a module, ``loss_fn`` is not callable, or
            ``warmup`` not a bool.
        ArgumentError: a bad ``mode``, example inputs that ``model.forward`` cannot take
            (none given, or too many), or ``loss_fn`` returned something other than a scalar tensor.

    >>> from torchfreeze import freeze
    >>> model = freeze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "0")
    >>> report = explain(model, torch.randn(3, 4))
    >>> [(p.name, p.on_backward_path, p.cacheable) for p in report.parts]
    [('0', False, True)]
    """
    require_module(model, "explain")
    require_choice(mode, ("train", "eval", None), "explain", "mode")
    require_bool(warmup, "explain", "warmup")
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentTypeError(
            f"explain(loss_fn={loss_fn!r}): expected a callable or None, got {type(loss_fn).__name__}. "
            "Fix: pass a function of the model's output, e.g. loss_fn=lambda out: out.sum()."
        )
    _require_inputs(model, example_inputs)

    uses = parameter_uses(model)
    trainable = {key for key, entry in uses.items() if entry.trainable}
    parts = _frozen_modules(model, trainable)
    recorder = StepRecorder(model, parts, example_inputs)
    forward_ms, backward_ms = _run_step(model, example_inputs, recorder, mode, loss_fn, warmup)

    step_ms = forward_ms + backward_ms
    report = Explanation(
        parts=[
            frozen_part(record, model, mode, step_ms, recorder.activation_bytes)
            for record in recorder.records.values()
            if record.calls
        ],
        forward_ms=forward_ms,
        backward_ms=backward_ms,
        activation_bytes=recorder.activation_bytes,
        trainable_parameters=sum(e.parameter.numel() for e in uses.values() if e.trainable),
        frozen_parameters=sum(e.parameter.numel() for e in uses.values() if not e.trainable),
    )
    report.steps = speed_up_steps(report, model, {name for name, _ in parts})
    return report
