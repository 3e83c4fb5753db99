"""Static lint of the known traps around frozen parameters: ``check``, ``Problem`` and ``CODES``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchfreeze._core.checks import require_module, short_repr
from torchfreeze._core.mode import pinned_modes
from torchfreeze._core.uses import frozen_map, parameter_uses, trainable_map
from torchfreeze._core.wrappers import ddp_reduced_ids, live_ddp, unwrap
from torchfreeze.errors import ArgumentTypeError
from torchfreeze.training._randomness import randomness_findings
from torchfreeze.training._watch import buffers_mutated_while_frozen, eval_pinned_ids, stats_update_while_frozen

__all__ = ["check", "Problem", "CODES"]


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check`.

    Args:
        code: short stable identifier (see ``CODES``).
        names: qualified names of the parameters / modules involved.
        message: what is wrong.
        fix: a one-line fix.

    Example:
        >>> str(Problem("trainable-not-in-optimizer", ("head.weight",), "head.weight never learns.",
        ...             "torchfreeze.add_unfrozen(model, optimizer)."))
        '[trainable-not-in-optimizer] head.weight never learns. Fix: torchfreeze.add_unfrozen(model, optimizer).'
    """

    code: str
    names: tuple[str, ...]
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message} Fix: {self.fix}"


#: Every code :func:`check` can return, with its meaning.
CODES: dict[str, str] = {
    "frozen-grad-not-none": "a frozen parameter holds a .grad tensor that optimizers (weight decay, momentum) would use",
    "frozen-param-has-optimizer-state": "a frozen parameter has momentum / moment buffers in the optimizer",
    "bn-stats-update-while-frozen": "a normalisation layer with frozen affine weights still updates its running statistics",
    "train-mode-in-frozen-subtree": "unpinned dropout (modules, attention, RNN) or BatchNorm in train mode inside a frozen subtree that nothing trainable comes before (a feature extractor)",
    "stochastic-depth-over-frozen": "a parent skips frozen layers at random in train mode (LayerDrop), whatever their pins",
    "frozen-module-forces-grad": "a fully frozen module makes its input require grad in train mode (its own _requires_grad switch)",
    "shared-frozen-and-trainable": "a parameter used through Frozen is also trained through another use",
    "trainable-not-in-optimizer": "a trainable parameter that the optimizer does not hold",
    "ddp-trainable-not-reduced": "a trainable parameter that the live DistributedDataParallel does not all-reduce",
    "ddp-frozen-reduced": "a frozen parameter that the live DistributedDataParallel still all-reduces (wasted bytes)",
    "frozen-use-requires-grad": "a parameter used only through Frozen still requires grad under torch.distributed",
    "optimizer-holds-nothing-trainable": "the optimizer holds no trainable parameter (GradScaler: 'No inf checks were recorded')",
    "requires-grad-but-recorded-frozen": "a parameter requires grad although the recorded freeze state says frozen (replaced?)",
    "frozen-module-updates-buffers": "a frozen module rewrites buffers in train mode (spectral_norm's weight_u / weight_v)",
}


#: Optimizer state that moves a parameter on a step even when its gradient is zero (momentum and
#: first moments). Accumulators of squared gradients (Adagrad, RMSprop, Adadelta, Adafactor), Rprop
#: step sizes and ASGD averages do not move a parameter whose gradient is zero.
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def _short(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def check(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, state: Mapping[str, Any] | None = None
) -> list[Problem]:
    """Static lint of the known traps around frozen parameters; changes nothing.

    Codes (stable strings, see ``CODES``): ``frozen-grad-not-none``,
    ``frozen-param-has-optimizer-state``, ``bn-stats-update-while-frozen``,
    ``train-mode-in-frozen-subtree``, ``shared-frozen-and-trainable``,
    ``trainable-not-in-optimizer`` (the last two optimizer codes need ``optimizer``), and
    under torch.distributed ``ddp-trainable-not-reduced``, ``ddp-frozen-reduced``
    (against a live DDP that torchfreeze has seen: passed as ``model`` or built by
    ``torchfreeze.distributed.wrap``) and ``frozen-use-requires-grad``.

    ``optimizer-holds-nothing-trainable`` (with ``optimizer``: everything it holds is frozen, so
    ``GradScaler.step`` asserts "No inf checks were recorded") and
    ``requires-grad-but-recorded-frozen`` (with ``state``: a parameter the freeze state lists as
    frozen requires grad, e.g. because ``m[0] = new_layer`` or ``load_state_dict(assign=True)``
    replaced it) come from issue 10.3 and 10.4.

    ``train-mode-in-frozen-subtree`` is reported only where the frozen part works as a feature
    extractor (nothing trainable before it); with trainable parts before or inside it (joint
    training, LoRA adapters) its dropout is a chosen regulariser. ``stochastic-depth-over-frozen``
    (LayerDrop over frozen layers) and ``frozen-module-forces-grad`` (a model's own switch makes a
    frozen module's input require grad) come from issue 9; ``training/_randomness.py`` has the rule.

    Args:
        model: the model.
        optimizer: the optimizer that will train it, if any.
        state: the freeze state recorded earlier (:func:`torchfreeze.freeze_state`, e.g. from the
            checkpoint), to compare the model against.

    Returns:
        The problems found, in the order of ``CODES``; an empty list when all is well.

    Raises:
        ArgumentTypeError: ``model`` / ``optimizer`` / ``state`` of the wrong type.

    Example:
        >>> import torch, torchfreeze
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
        >>> _ = torchfreeze.freeze(m, "0", "1")
        >>> [p.code for p in check(m)]
        ['bn-stats-update-while-frozen']
        >>> _ = torchfreeze.freeze_batchnorm(m, "1")
        >>> check(m)
        []
    """
    require_module(model, "check")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"check(optimizer={short_repr(optimizer)}): expected a torch.optim.Optimizer or None, got "
            f"{type(optimizer).__name__}. Fix: pass the optimizer that trains the model."
        )
    if state is not None and not (isinstance(state, Mapping) and isinstance(state.get("frozen"), (list, tuple))):
        raise ArgumentTypeError(
            f"check(state={short_repr(state)}): expected a freeze state dict from torchfreeze.freeze_state(model), "
            f"got {type(state).__name__}. Fix: pass the dict freeze_state returned (or None)."
        )
    problems: list[Problem] = []
    frozen = frozen_map(model)
    frozen_ids = {id(p) for p in frozen.values()}

    # 1. frozen parameter with a gradient tensor
    with_grad = [n for n, p in frozen.items() if p.grad is not None]
    if with_grad:
        problems.append(
            Problem(
                "frozen-grad-not-none",
                tuple(with_grad),
                f"{len(with_grad)} frozen parameter(s) hold a .grad tensor ({_short(with_grad)}); an optimizer "
                "that holds them applies weight decay / momentum to them even if the gradient is zero.",
                "set p.grad = None for them (torchfreeze.freeze does) and use optimizer.zero_grad(set_to_none=True).",
            )
        )

    # 2. optimizer state on frozen parameters
    if optimizer is not None:
        stateful = []
        for n, p in frozen.items():
            st = optimizer.state.get(p, {})
            if any(isinstance(st.get(k), torch.Tensor) and bool(st[k].detach().any()) for k in _MOMENTUM_KEYS):
                stateful.append(n)
        if stateful:
            problems.append(
                Problem(
                    "frozen-param-has-optimizer-state",
                    tuple(stateful),
                    f"{len(stateful)} frozen parameter(s) carry non-zero momentum / first-moment state in the "
                    f"optimizer ({_short(stateful)}): it moves them on any step where .grad is not None "
                    "(a zero gradient is enough).",
                    "rebuild the optimizer from torchfreeze.param_groups(model, lr) (or drop the state: "
                    "optimizer.state.pop(p)).",
                )
            )

    # 3. normalisation layers with frozen affine weights whose statistics still update
    eval_ids = eval_pinned_ids(model)
    bn_names = [n for n, m in model.named_modules() if stats_update_while_frozen(m, frozen_ids, eval_ids)]
    if bn_names:
        problems.append(
            Problem(
                "bn-stats-update-while-frozen",
                tuple(bn_names),
                f"{len(bn_names)} normalisation layer(s) have frozen affine weights but will update their running "
                f"statistics in train mode ({_short(bn_names)}).",
                "torchfreeze.freeze_batchnorm(model, "
                + repr(bn_names[0] if len(bn_names) == 1 else bn_names)
                + ") (or pass train_bn=True to freeze if they should train).",
            )
        )

    # 3b. other buffers a frozen module rewrites in train mode (spectral normalisation's power iteration)
    mutated = buffers_mutated_while_frozen(model, frozen_ids, eval_ids)
    if mutated:
        owners = sorted({n.rpartition(".")[0] for n in mutated})
        problems.append(
            Problem(
                "frozen-module-updates-buffers",
                tuple(mutated),
                f"{len(mutated)} buffer(s) of frozen module(s) change on every training forward pass "
                f"({_short(mutated)}); trainable checkpoints save them with the trained part.",
                f"pin the module(s) to eval if they should stay fixed: torchfreeze.pin_mode(model, {owners!r}).",
            )
        )

    # 4. randomness in frozen parts where it is a mistake (a feature extractor: nothing trainable before
    #    it), LayerDrop over frozen layers, modules forcing gradients through themselves (_randomness.py;
    #    the one nondeterminism predicate; a pinned module is left as the user chose)
    for code, names, message, fix in randomness_findings(
        model, frozen_ids, set(pinned_modes(model)), set(bn_names), _frozen_subtrees(model, frozen_ids)
    ):
        problems.append(Problem(code, names, message, fix))

    # 5. parameters both used through Frozen and trained through another use
    shared = [e for e in parameter_uses(model).values() if e.frozen_use_paths and e.trainable]
    if shared:
        names = tuple(n for e in shared for n in e.paths)
        uses = [p for e in shared for p in e.frozen_use_paths]
        problems.append(
            Problem(
                "shared-frozen-and-trainable",
                names,
                f"{len(shared)} parameter(s) used through Frozen ({_short(uses)}) also train through another "
                f"use ({_short([e.trainable_paths[0] for e in shared])}), so the Frozen use sees values that "
                "change every step.",
                "if the Frozen use must stay fixed give it its own copy: Frozen(copy.deepcopy(module)); "
                "otherwise this is the intended tie.",
            )
        )

    # 6. trainable parameters the optimizer does not hold
    if optimizer is not None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in trainable_map(model).items() if id(p) not in held]
        if missing:
            problems.append(
                Problem(
                    "trainable-not-in-optimizer",
                    tuple(missing),
                    f"{len(missing)} trainable parameter(s) are not in the optimizer and will never learn "
                    f"({_short(missing)}).",
                    "torchfreeze.add_unfrozen(model, optimizer).",
                )
            )

    # 7-9. torch.distributed: what a live DDP reduces against what trains (names, not DDP's indices)
    problems.extend(_distributed_problems(model))
    problems.extend(_recorded_problems(model, optimizer, state))
    return problems


def _recorded_problems(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: Mapping[str, Any] | None
) -> list[Problem]:
    """Issue 10.3: an optimizer over frozen parameters only; 10.4: recorded-frozen parameters that require grad."""
    out: list[Problem] = []
    if optimizer is not None:
        held = [p for g in optimizer.param_groups for p in g["params"]]
        trainable = {id(p) for p in trainable_map(model).values()}
        in_model = {id(p) for _, p in model.named_parameters(remove_duplicate=False)}
        if held and not any(id(p) in trainable or (id(p) not in in_model and p.requires_grad) for p in held):
            out.append(
                Problem(
                    "optimizer-holds-nothing-trainable",
                    (),
                    f"the optimizer holds {len(held)} parameter(s), none of them trainable: its steps do nothing and "
                    "torch.amp.GradScaler.step fails with 'No inf checks were recorded for this optimizer'.",
                    "skip the optimizer (and the scaler) while everything is frozen, or unfreeze something and "
                    "build it from torchfreeze.param_groups(model, lr).",
                )
            )
    if state is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        wrong = [n for n in state["frozen"] if isinstance(n, str) and n in params and params[n].requires_grad]
        if wrong:
            out.append(
                Problem(
                    "requires-grad-but-recorded-frozen",
                    tuple(wrong),
                    f"{len(wrong)} parameter(s) the recorded freeze state lists as frozen require grad "
                    f"({_short(wrong)}): a module or tensor was replaced (m[0] = new_layer, "
                    "load_state_dict(assign=True), resize_token_embeddings) and the new one trains.",
                    "torchfreeze.load_freeze_state(model, state) (or freeze them again), then "
                    "torchfreeze.add_unfrozen / rebuild the optimizer.",
                )
            )
    return out


def _distributed_problems(model: nn.Module) -> list[Problem]:
    uses = parameter_uses(model)
    ddps = live_ddp(model)
    distributed = bool(ddps) or (torch.distributed.is_available() and torch.distributed.is_initialized())
    out: list[Problem] = []
    reduced: set[int] = set()
    for ddp in ddps:
        reduced |= ddp_reduced_ids(ddp) or set()
    if ddps:
        missing = [e.name for key, e in uses.items() if e.trainable and key not in reduced]
        if missing:
            out.append(
                Problem(
                    "ddp-trainable-not-reduced",
                    tuple(missing),
                    f"{len(missing)} trainable parameter(s) are not all-reduced by the live DistributedDataParallel "
                    f"({_short(missing)}): requires_grad changed after DDP was built, so the replicas drift apart.",
                    "wrap with torchfreeze.distributed.wrap(model) (re-wraps after each change), or rebuild the DDP.",
                )
            )
        wasted = [(e.name, e.parameter) for key, e in uses.items() if not e.parameter.requires_grad and key in reduced]
        if wasted:
            names = [n for n, _ in wasted]
            size = sum(p.numel() * p.element_size() for _, p in wasted)
            out.append(
                Problem(
                    "ddp-frozen-reduced",
                    tuple(names),
                    f"{len(names)} frozen parameter(s) are still all-reduced by the live DistributedDataParallel "
                    f"({_short(names)}): {size} bytes per step for nothing (and DDP waits for their gradients).",
                    "freeze before wrapping, or wrap with torchfreeze.distributed.wrap(model) (re-wraps).",
                )
            )
    if distributed:
        # under a DDP only those it reduces matter (torchfreeze.distributed.wrap leaves them out)
        idle = [
            e.name
            for key, e in uses.items()
            if e.parameter.requires_grad and not e.trainable_paths and (not ddps or key in reduced)
        ]
        if idle:
            out.append(
                Problem(
                    "frozen-use-requires-grad",
                    tuple(idle),
                    f"{len(idle)} parameter(s) used only through Frozen still require grad ({_short(idle)}): they "
                    "never get a gradient, so DDP (find_unused_parameters=False) fails, or reduces them for nothing.",
                    "torchfreeze.prepare_for_distributed(model) before wrapping, or torchfreeze.distributed.wrap(model).",
                )
            )
    return out


def _frozen_subtrees(model: nn.Module, frozen_ids: set[int]) -> list[tuple[str, nn.Module]]:
    """Maximal subtrees with at least one parameter, all of them frozen (the model itself excluded
    unless it is entirely frozen)."""

    def all_frozen(m: nn.Module) -> bool:
        params = list(m.parameters())
        return bool(params) and all(id(p) in frozen_ids for p in params)

    out: list[tuple[str, nn.Module]] = []

    def visit(name: str, m: nn.Module) -> None:
        if all_frozen(m):
            out.append((name, m))
            return
        for cname, child in m.named_children():
            visit(f"{name}.{cname}" if name else cname, child)

    visit("", model)
    return out
