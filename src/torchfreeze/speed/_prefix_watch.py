"""What :mod:`torchfreeze.speed.prefix` watches: modules in no group, call order, hooks; refusal texts."""

from __future__ import annotations

from typing import Any

import torch.nn.modules.module as torch_module
from torch import Tensor, nn

from torchfreeze._core import tree
from torchfreeze.speed._prefix_state import Call

__all__ = ["FED_BY_TRAINABLE", "REPLAY_CAUSES", "mark", "loose_marks", "watch_order", "hooked"]

FED_BY_TRAINABLE = (
    "a trainable parameter feeds the output of '{boundary}' (a position embedding or class token named in a "
    "later group, say): a replay would cut its gradient. Fix: put it in the group where it is used, or freeze it"
)

REPLAY_CAUSES = (
    "; likely causes: the call asks for early outputs (output_hidden_states=True, output_attentions=True: "
    "such calls stay uncached, others are not affected), or something after the prefix reads an early "
    "module's output (a skip connection). Fix for the latter: pass groups= whose prefix ends in one module "
    "that everything after it reads, or cache a part with cache_features instead"
)

_PLAIN = (int, float, str, bool, type(None))


def mark(value: Any) -> Any:
    """What is compared of an attribute: plain values by value, a tensor by identity and version,
    anything else by identity (comparing a Hugging Face config by value on every call would cost
    more than the replay saves)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Tensor):
        return (id(value), value._version)
    if isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value):
        return value
    return ("id", id(value))


def loose_marks(modules: list[nn.Module]) -> list[Any]:
    """Own public attributes, parameters and buffers of each module (not of its children)."""
    marks: list[Any] = []
    for m in modules:
        attrs = {k: mark(v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
        own = [*m._parameters.items(), *m._buffers.items()]
        marks.append((attrs, [(n, id(t), t._version, t.data_ptr(), t.requires_grad) for n, t in own if t is not None]))
    return marks


def watch_order(call: Call, names: list[list[str]], modules: list[list[nn.Module]]) -> None:
    """Hooks (removed after the call) that record which prefix modules run before the rest starts,
    what they return, and a copy of the latest output as it was returned."""
    depth = call.store.depth if call.store is not None else 0

    def recorder(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not call.suffix_started:
                call.order.append(name)
                call.outputs[name] = output
                # copied now: something after the prefix may change it in place (Dropout(inplace=True))
                call.last = (name, [t.detach().clone() for t in tree.tensor_leaves(output)])

        return hook

    def suffix_marker(_module: nn.Module, _args: Any) -> None:
        call.suffix_started = True

    for g, (group_names, group_modules) in enumerate(zip(names, modules, strict=True)):
        for name, module in zip(group_names, group_modules, strict=True):
            if g < depth:
                call.handles.append(module.register_forward_hook(recorder(name)))
            else:
                call.handles.append(module.register_forward_pre_hook(suffix_marker))


def hooked(prefix_modules: list[nn.Module]) -> str:
    """Why a replay would skip someone's forward hooks (or hand them stand-ins); ``""`` if it would not."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "global module forward hooks are registered (a replay would skip or mislead them)"
    for m in prefix_modules:
        if m._forward_hooks or m._forward_pre_hooks:
            return (
                f"a prefix module ({type(m).__name__}) has a forward hook: a replay would not run it, or hand it "
                "stand-ins. Fix: hook a module after the prefix, or remove the hook"
            )
    return ""
