"""What ``explain`` measures during its one step: a recorder of hooks, and a snapshot that undoes the step.

:class:`StepRecorder` installs forward hooks on the frozen parts and a
saved-tensors hook, and fills one :class:`PartRecord` per part: forward time
(of the outermost frozen module running), calls, whether its inputs or outputs
carry gradients and which trainable parameter or input upstream causes it,
backward time (from its output's gradient to its input's), and the activation
bytes autograd saved while it ran. :class:`ModelSnapshot` restores everything
the step may change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torchfreeze._core.tree import tensor_leaves

__all__ = ["PartRecord", "StepRecorder", "ModelSnapshot", "upstream"]

_MAX_GRAPH_NODES = 20000
_UPSTREAM_LIMIT = 3

ActivationKey = tuple[int, int, torch.dtype]


@dataclass
class PartRecord:
    """Measurements of one frozen part during the step."""

    name: str
    module: nn.Module
    forward_ms: float = 0.0
    calls: int = 0
    on_path: bool = False
    upstream: list[str] = field(default_factory=list)
    activation_bytes: int = 0
    seen: set[ActivationKey] = field(default_factory=set)
    started: float = 0.0
    output_grad_at: float | None = None
    input_grad_at: float | None = None

    @property
    def backward_ms(self) -> float:
        """From its output's gradient being ready until its input's (0.0 when not measured)."""
        if self.output_grad_at is None or self.input_grad_at is None:
            return 0.0
        return max(0.0, (self.input_grad_at - self.output_grad_at) * 1000)


def upstream(tensors: list[Tensor], names: dict[int, str], limit: int = _UPSTREAM_LIMIT) -> list[str]:
    """Nearest trainable parameters / inputs behind ``tensors`` in the autograd graph (breadth first)."""
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
        queue.extend(nxt for nxt, _ in getattr(node, "next_functions", ()) if nxt is not None)
    return found


class StepRecorder:
    """Hooks that time and weigh the frozen parts of ``model`` during one step.

    Args:
        model: the model explained.
        parts: ``(name, module)`` of every frozen part.
        example_inputs: the step's inputs (to name an input that requires grad).
    """

    def __init__(self, model: nn.Module, parts: list[tuple[str, nn.Module]], example_inputs: tuple[Any, ...]) -> None:
        self.records = {name: PartRecord(name, module) for name, module in parts}
        self.names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), f"parameter '{n}'")
        for i, x in enumerate(example_inputs):
            for t in tensor_leaves(x):
                self.names.setdefault(id(t), f"example input #{i}")
        self.activation_bytes = 0
        self._param_ptrs = {p.data_ptr() for p in model.parameters()}
        self._seen: set[ActivationKey] = set()
        self._current: str | None = None  # the outermost frozen part running, if any
        self._depth = 0
        self._handles: list[RemovableHandle] = []
        self._modules = [(name, m) for name, m in model.named_modules() if name]
        self._stack: list[str] = []  # the modules whose forward is running, innermost last

    # -- install / remove -----------------------------------------------------
    def install(self) -> None:
        """Register the forward hooks on every frozen part, and the hooks that name gradient forcers."""
        for name, module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._leave(name), with_kwargs=True, always_call=True))
        for record in self.records.values():
            self._handles.append(record.module.register_forward_pre_hook(self._pre_hook(record.name), with_kwargs=True))
            self._handles.append(record.module.register_forward_hook(self._post_hook(record.name), with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook, the tensor hooks on inputs included (inputs outlive ``explain``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def saved_tensors(self) -> Iterator[None]:
        """Count the activation bytes autograd saves for backward inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield

    # -- hooks ----------------------------------------------------------------
    def _enter(self, name: str) -> Any:
        """Pre-hook on every module: a new leaf that requires grad among its inputs was made by the caller."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._stack and torch.is_grad_enabled():
                for t in tensor_leaves((args, kwargs)):
                    if t.requires_grad and t.grad_fn is None and id(t) not in self.names:
                        self.names[id(t)] = (
                            f"module '{self._stack[-1]}', which sets requires_grad=True on a tensor in its forward"
                        )
            self._stack.append(name)

        return hook

    def _leave(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()

        return hook

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._depth += 1
            if self._current is not None:  # nested inside an outer frozen part: accounted there
                return
            self._current = name
            self.records[name].started = time.perf_counter()

        return hook

    def _post_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            self._depth -= 1
            if self._current != name or self._depth != 0:
                return
            self._current = None
            record = self.records[name]
            record.forward_ms += (time.perf_counter() - record.started) * 1000
            record.calls += 1
            if torch.is_grad_enabled():
                self._trace(record, tensor_leaves((args, kwargs)), tensor_leaves(output))

        return hook

    def _trace(self, record: PartRecord, inputs: list[Tensor], outputs: list[Tensor]) -> None:
        """Note whether gradients flow through the part, from where, and time its backward."""
        ins = [t for t in inputs if t.requires_grad]
        outs = [t for t in outputs if t.requires_grad]
        if not (ins or outs):
            return
        record.on_path = True
        for u in upstream(ins or outs, self.names):
            if u not in record.upstream:
                record.upstream.append(u)
        if not (ins and outs):
            return

        def output_grad(g: Tensor) -> None:
            if record.output_grad_at is None:
                record.output_grad_at = time.perf_counter()

        def input_grad(g: Tensor) -> None:
            record.input_grad_at = time.perf_counter()

        self._handles.extend(t.register_hook(output_grad) for t in outs)  # type: ignore[no-untyped-call]
        self._handles.extend(
            t.register_hook(input_grad)  # type: ignore[no-untyped-call]
            for t in ins
            if t.grad_fn is not None or t.is_leaf
        )

    def _pack(self, t: Tensor) -> Tensor:
        try:
            ptr = t.data_ptr()
        except RuntimeError:  # a tensor without storage (e.g. a fake or functional tensor)
            return t
        if ptr in self._param_ptrs or isinstance(t, nn.Parameter):
            return t
        key = (ptr, t.numel(), t.dtype)
        nbytes = t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.activation_bytes += nbytes
        if self._current is not None:
            record = self.records[self._current]
            if key not in record.seen:
                record.seen.add(key)
                record.activation_bytes += nbytes
        return t


def _unpack(t: Tensor) -> Tensor:
    return t


class ModelSnapshot:
    """Everything one ``explain`` step may change, saved to be restored exactly.

    Train/eval flags, parameter gradients (backward accumulates into an existing
    ``.grad`` in place, so the step starts from ``None`` and the objects are put
    back), the example inputs' gradients, buffers (BatchNorm statistics) and the
    random number generator states.
    """

    def __init__(self, model: nn.Module, example_inputs: tuple[Any, ...]) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.grads = [(p, p.grad) for p in model.parameters()]
        leaves = {id(t): t for t in tensor_leaves(example_inputs) if t.is_leaf and t.requires_grad}
        self.input_grads = [(t, t.grad) for t in leaves.values()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.rng = torch.get_rng_state()
        cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        self.cuda_rng = torch.cuda.get_rng_state_all() if cuda_on else None

    def clear_grads(self) -> None:
        """Start the step with no gradients on the parameters and the example inputs."""
        for p, _ in self.grads:
            p.grad = None
        for t, _ in self.input_grads:
            t.grad = None

    def restore_buffers(self) -> None:
        """Put the saved buffer values back."""
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was taken."""
        for m, flag in self.flags:
            m.training = flag
        for p, g in self.grads:
            p.grad = g
        for t, g in self.input_grads:
            t.grad = g
        self.restore_buffers()
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
