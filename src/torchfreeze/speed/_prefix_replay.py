"""Replaying a stored prefix: stand-ins for the skipped modules, and the check that a replay is exact."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from torchfreeze._core import tree
from torchfreeze._core.behaviour import nondeterministic_modules
from torchfreeze.speed._prefix_state import Call, ForwardRestore, Store, difference

__all__ = ["stand_in", "install_stubs", "stubbed", "replay_problem", "ungrouped_randomness", "submodule"]


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` by attribute lookups (cheaper: this runs on every call)."""
    module = model
    for part in name.split("."):
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise AttributeError(f"'{name}' is not a module of the model")
    return module


def stand_in(store: Store, slots: Tensor, name: str, n: int) -> Any:
    """What module ``name`` returns in a replay: the stored rows at the boundary, zeros of its recorded shape before."""
    record = store.records[name]
    if name == store.boundary:
        cached = iter(store.slabs.gather(slots))
        leaves = [next(cached) if isinstance(x, tuple) else x for x in record.leaves]
        return tree.unflatten(record.spec, leaves)
    leaves = []
    for x in record.leaves:
        if isinstance(x, tuple):
            dtype, device, row, full = x
            shape = (n, *row) if row is not None else full
            leaves.append(torch.zeros(shape, dtype=dtype, device=device))
        else:
            leaves.append(x)
    return tree.unflatten(record.spec, leaves)


def install_stubs(model: nn.Module, call: Call, store: Store, slots: Tensor) -> None:
    """Make the modules of ``store``'s prefix return stand-ins for this call (undone by ``call.handles``)."""
    for name in store.early:
        module = submodule(model, name)

        def stub(*_args: Any, _name: str = name, **_kwargs: Any) -> Any:
            return stand_in(store, slots, _name, call.n)

        module.forward = stub
        call.handles.append(ForwardRestore(module))


@contextmanager
def stubbed(model: nn.Module, call: Call, store: Store, slots: Tensor) -> Iterator[None]:
    """The stand-ins installed for the ``with`` block only."""
    install_stubs(model, call, store, slots)
    try:
        yield
    finally:
        for handle in call.handles:
            handle.remove()
        call.handles.clear()


def replay_problem(
    model: nn.Module,
    store: Store,
    slots: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    n: int,
    *,
    suffix: list[nn.Module],
    check_grad: bool = False,
) -> str:
    """How the model's output differs replayed from run in full (``""``: it does not).

    Both passes run under ``no_grad`` from the same random state, with the ``suffix`` (the
    groups after the prefix) in eval mode for the two passes, so its BatchNorm statistics do
    not move and a graph the caller keeps from an earlier call stays valid; a buffer that a
    pass changed anyway is put back afterwards. With ``check_grad`` the full pass runs under
    autograd and the boundary's output must not require grad (nothing trainable may feed it).
    """
    flags = [(m, m.training) for top in suffix for m in top.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]

    def rewind() -> None:
        torch.set_rng_state(rng)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):  # copying bumps the version: only where something changed
                    b.copy_(saved)

    fed: list[bool] = []

    def boundary_hook(_module: nn.Module, _args: Any, output: Any) -> None:
        fed.append(any(t.requires_grad for t in tree.tensor_leaves(output)))

    handle = model.get_submodule(store.boundary).register_forward_hook(boundary_hook)
    try:
        for m, _ in flags:
            m.training = False
        with torch.set_grad_enabled(check_grad):
            full = model.forward(*args, **kwargs)
        handle.remove()
        if any(fed):
            return (
                f"a trainable parameter feeds the output of '{store.boundary}' (a position embedding or class "
                "token named in a later group, say): a replay would cut its gradient. Fix: put it in the group "
                "where it is used, or freeze it"
            )
        rewind()
        with torch.no_grad(), stubbed(model, Call("replay", n=n), store, slots):
            replayed = model.forward(*args, **kwargs)
    finally:
        handle.remove()
        for m, flag in flags:
            m.training = flag
        rewind()
    return difference(full, replayed)


def ungrouped_randomness(model: nn.Module, groups: list[list[str]]) -> str:
    """A random layer in no group (a parameter-free Dropout between blocks), named with the fix; else ``""``."""
    grouped = {name for names in groups for name in names}

    def inside(name: str) -> bool:
        return any(name == g or name.startswith(g + ".") for g in grouped)

    loose = [found for found in nondeterministic_modules(model) if not inside(found.name)]
    if not loose:
        return ""
    return (
        f"; {loose[0].sentence()} and belongs to no layer group, so freezing the groups does not pin it: "
        f"pin it too (pin_mode(model, '{loose[0].name}', mode='eval')) or pass groups= that include it"
    )
