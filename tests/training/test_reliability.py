"""The reliability matrix: "frozen means frozen" under every optimizer and training knob.

A small model with a trainable layer *before* a frozen backbone (so gradients flow through
it), a ``Frozen`` use, a pinned-eval BatchNorm and a trainable head is trained for a few steps;
every frozen tensor must stay bit-identical and the trainable ones must move.

Axes: every optimizer of ``torch.optim`` that runs on this model x weight decay on/off x
``zero_grad(set_to_none=False/True)`` x bf16 autocast on/off x gradient clipping on/off x
parameters given to the optimizer (all of ``model.parameters()``, frozen ones included, or
``torchfreeze.param_groups``). Every optimizer meets a pairwise-covering set of 6 rows of the
five binary axes (fast part); the rest of the full product is marked ``slow`` (still run by the
default test command). Test ids carry ``<index>of<total>``.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.checkpoint as ckpt
from torch import nn

from torchfreeze import (
    Frozen,
    add_unfrozen,
    check,
    freeze,
    guard,
    load_trainable,
    param_groups,
    save_trainable,
    unfreeze,
)

STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster and immune to contention from parallel jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RelNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pre = nn.Linear(6, 8)  # trainable, upstream of the frozen part
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.adapter = Frozen(nn.Linear(8, 8))  # a Frozen use
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        h = self.adapter(self.backbone(h))
        out: torch.Tensor = self.head(h)
        return out


def make_model(seed: int = 0) -> RelNet:
    model = RelNet(seed)
    freeze(model, "backbone", mode="eval")  # BatchNorm pinned eval
    # give the pinned BatchNorm non-trivial statistics so a change would show
    with torch.no_grad():
        model.get_buffer("backbone.1.running_mean").uniform_(-1, 1)
        model.get_buffer("backbone.1.running_var").uniform_(0.5, 2)
    return model.train()


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    frozen = {
        "backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "backbone.3.weight",
        "backbone.3.bias", "backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked",
        "adapter.module.weight", "adapter.module.bias",
    }  # fmt: skip
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in frozen}


def trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(("pre.", "head."))}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


# ---------------------------------------------------------------------------- optimizers

#: name -> (constructor, kwargs). Weight decay is added when the constructor accepts it.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, {"lr": 0.1}),
    "SGD-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "SGD-nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "Adam": (torch.optim.Adam, {"lr": 0.01}),
    "Adam-amsgrad": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    "AdamW": (torch.optim.AdamW, {"lr": 0.01}),
    "Adamax": (torch.optim.Adamax, {"lr": 0.01}),
    "NAdam": (torch.optim.NAdam, {"lr": 0.01}),
    "RAdam": (torch.optim.RAdam, {"lr": 0.01}),
    "RMSprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
    "Adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "ASGD": (torch.optim.ASGD, {"lr": 0.1}),
    "Rprop": (torch.optim.Rprop, {"lr": 0.01}),
    "LBFGS": (torch.optim.LBFGS, {"lr": 0.5, "max_iter": 3}),
}
if hasattr(torch.optim, "Adafactor"):
    OPTIMIZERS["Adafactor"] = (torch.optim.Adafactor, {"lr": 0.01})
if hasattr(torch.optim, "Muon"):
    OPTIMIZERS["Muon"] = (torch.optim.Muon, {"lr": 0.02})  # 2-D parameters only

#: torch.optim optimizers that do not apply to this model, and why.
NOT_APPLICABLE = {"SparseAdam": "needs sparse gradients (nn.Embedding(sparse=True)); no dense model runs it"}


def test_matrix_covers_every_torch_optimizer() -> None:
    classes = {
        name
        for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }
    covered = {cls.__name__ for cls, _ in OPTIMIZERS.values()} | set(NOT_APPLICABLE)
    assert classes <= covered, f"new optimizer(s) in torch.optim: {sorted(classes - covered)}"


def build_optimizer(name: str, model: nn.Module, *, weight_decay: float, source: str) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    kwargs = dict(kwargs)
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = weight_decay
    if name == "Muon":
        params = [p for p in model.parameters() if p.ndim == 2]
        if source == "groups":
            trainable = {id(p) for g in param_groups(model, 1.0) for p in g["params"]}
            params = [p for p in params if id(p) in trainable]
        return cls(params, **kwargs)
    if source == "all":
        return cls(model.parameters(), **kwargs)
    groups = param_groups(model, kwargs.pop("lr"), weight_decay=weight_decay)
    if name == "LBFGS":  # one group only
        return torch.optim.LBFGS([p for g in groups for p in g["params"]], lr=0.5, max_iter=3)
    return cls(groups, **kwargs)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    *,
    steps: int = STEPS,
    set_to_none: bool = True,
    bf16: bool = False,
    clip: bool = False,
    start: int = 0,
) -> Any:
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, start + steps):
        x, y = batch(step)

        def closure() -> Any:
            opt.zero_grad(set_to_none=set_to_none)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            return loss

        if isinstance(opt, torch.optim.LBFGS):
            opt.step(closure)  # type: ignore[no-untyped-call]
        else:
            closure()
            opt.step()


def assert_frozen_and_learned(
    model: nn.Module,
    frozen_before: dict[str, torch.Tensor],
    trainable_before: dict[str, torch.Tensor],
    *,
    learned: tuple[str, ...] = ("pre.weight", "head.2.weight"),
) -> None:
    after = frozen_snapshot(model)
    changed = [k for k in frozen_before if not torch.equal(frozen_before[k], after[k])]
    assert not changed, f"frozen tensors moved: {changed}"
    now = trainable_snapshot(model)
    for k in learned:
        assert not torch.equal(trainable_before[k], now[k]), f"{k} did not learn"


# ---------------------------------------------------------------------------- the matrix

AXES = ("weight_decay", "set_to_none", "bf16", "clip", "source")
_VALUES: dict[str, tuple[Any, Any]] = {"weight_decay": (0.0, 0.1), "set_to_none": (True, False), "bf16": (False, True),
           "clip": (False, True), "source": ("groups", "all")}  # fmt: skip


def pairwise_rows() -> list[tuple[int, ...]]:
    """6 rows over 5 binary axes covering every pair of values of every pair of axes.

    Row 0 is all zeros; each axis is "on" in a distinct 3-subset of rows 1..5: two distinct
    3-subsets of a 5-set meet (1/1), differ both ways (1/0, 0/1), and row 0 gives 0/0.
    """
    subsets = [(1, 2, 3), (1, 4, 5), (2, 4, 5), (3, 4, 5), (1, 2, 4)]
    return [tuple(int(r in s) for s in subsets) for r in range(6)]


def test_pairwise_rows_cover_every_pair() -> None:
    rows = pairwise_rows()
    for a, b in itertools.combinations(range(len(AXES)), 2):
        assert {(r[a], r[b]) for r in rows} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def _configs() -> Any:
    full = [(opt, bits) for opt in OPTIMIZERS for bits in itertools.product((0, 1), repeat=len(AXES))]
    pairwise = set(pairwise_rows())
    fast, slow = [], []
    for i, (opt, bits) in enumerate(full, start=1):
        values = {axis: _VALUES[axis][b] for axis, b in zip(AXES, bits)}
        label = (
            f"{i:03d}of{len(full)}-{opt}-wd{bits[0]}-stn{int(values['set_to_none'])}-bf16{bits[2]}"
            f"-clip{bits[3]}-{values['source']}"
        )
        if bits in pairwise:
            fast.append(pytest.param(opt, values, id=label))
        else:
            slow.append(pytest.param(opt, values, id=label, marks=pytest.mark.slow))
    return fast + slow


CONFIGS = _configs()


@pytest.mark.parametrize("opt_name, knobs", CONFIGS)
def test_frozen_stays_bit_identical(opt_name: str, knobs: dict[str, Any]) -> None:
    model = make_model()
    opt = build_optimizer(opt_name, model, weight_decay=knobs["weight_decay"], source=knobs["source"])
    frozen_before, trainable_before = frozen_snapshot(model), trainable_snapshot(model)
    with guard(model, opt), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Muon on tiny matrices
        train(model, opt, set_to_none=knobs["set_to_none"], bf16=knobs["bf16"], clip=knobs["clip"])
    assert_frozen_and_learned(model, frozen_before, trainable_before)
    codes = [p.code for p in check(model, opt)]
    assert codes == (["trainable-not-in-optimizer"] if opt_name == "Muon" else [])  # Muon: 2-D only


# ---------------------------------------------------------------------------- scenarios


@pytest.mark.slow
@pytest.mark.parametrize(
    "opt_name, source, bf16",
    [
        pytest.param("AdamW", "all", False, id="AdamW-all-stn0"),
        pytest.param("SGD-momentum", "groups", True, id="SGD-momentum-groups-bf16"),
    ],
)
def test_torch_compile_keeps_frozen_bit_identical(opt_name: str, source: str, bf16: bool) -> None:
    torch._dynamo.reset()
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = build_optimizer(opt_name, model, weight_decay=0.1, source=source)
    frozen_before, trainable_before = frozen_snapshot(model), trainable_snapshot(model)
    loss_fn = nn.CrossEntropyLoss()
    with guard(model, opt):
        for step in range(STEPS):
            x, y = batch(step)
            opt.zero_grad(set_to_none=False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(compiled(x).float(), y)
            loss.backward()
            opt.step()
    assert not model.backbone[1].training  # the pin holds under compile
    assert_frozen_and_learned(model, frozen_before, trainable_before)


class CheckpointedLM(nn.Module):
    """Frozen input embedding -> trainable block under activation checkpointing -> head."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.use_reentrant = use_reentrant

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = ckpt.checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        out: torch.Tensor = self.head(h.mean(1))
        return out


def _make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """The documented recipe for reentrant checkpointing after a frozen embedding."""
    return output.requires_grad_(True)


@pytest.mark.parametrize(
    "use_reentrant, recipe, block_learns",
    [
        pytest.param(False, False, True, id="non-reentrant"),
        pytest.param(True, False, False, id="reentrant-trap"),
        pytest.param(True, True, True, id="reentrant-with-recipe"),
    ],
)
def test_gradient_checkpointing_with_frozen_input_embedding(
    use_reentrant: bool, recipe: bool, block_learns: bool
) -> None:
    model = freeze(CheckpointedLM(use_reentrant), "embed")
    if recipe:
        model.get_submodule("embed").register_forward_hook(_make_inputs_require_grad)
    opt = torch.optim.AdamW(param_groups(model, 0.05, weight_decay=0.1))
    embed_weight, block_weight = model.get_parameter("embed.weight"), model.get_parameter("block.0.weight")
    embed, block = embed_weight.detach().clone(), block_weight.detach().clone()
    tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    with guard(model, opt), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            opt.zero_grad()
            model(tokens).sum().backward()
            opt.step()
    assert torch.equal(embed, embed_weight) and embed_weight.grad is None
    assert (not torch.equal(block, block_weight)) is block_learns
    if not block_learns:  # torch says so; the docs explain the trap and the recipe
        assert any("requires_grad" in str(w.message) for w in caught)


#: optimizer -> whether its state would move a frozen parameter with a zero gradient (momentum)
STATEFUL_OPTIMIZERS = {"SGD-momentum": True, "Adam": True, "AdamW": True, "RMSprop": True, "Adagrad": False}


@pytest.mark.parametrize("opt_name", list(STATEFUL_OPTIMIZERS))
@pytest.mark.parametrize("set_to_none", [True, False], ids=["stn1", "stn0"])
def test_freezing_after_some_training_steps(opt_name: str, set_to_none: bool) -> None:
    model = RelNet().train()
    opt = build_optimizer(opt_name, model, weight_decay=0.1, source="all")
    train(model, opt, steps=2, set_to_none=set_to_none)  # everything trains, optimizer state builds up
    freeze(model, "backbone", mode="eval")
    flagged = "frozen-param-has-optimizer-state" in [p.code for p in check(model, opt)]
    assert flagged is STATEFUL_OPTIMIZERS[opt_name]
    frozen_before, trainable_before = frozen_snapshot(model), trainable_snapshot(model)
    with guard(model, opt):
        train(model, opt, steps=STEPS, set_to_none=set_to_none, start=2)
    assert_frozen_and_learned(model, frozen_before, trainable_before)


@pytest.mark.parametrize("opt_name", ["SGD-momentum", "AdamW", "RMSprop"])
def test_unfreezing_mid_run(opt_name: str) -> None:
    model = make_model()
    opt = build_optimizer(opt_name, model, weight_decay=0.1, source="groups")
    train(model, opt, steps=2)
    unfreeze(model, "backbone.3")
    assert add_unfrozen(model, opt) == ["backbone.3.weight", "backbone.3.bias"]
    still_frozen = {k: v for k, v in frozen_snapshot(model).items() if not k.startswith("backbone.3")}
    unfrozen_before = model.get_parameter("backbone.3.weight").detach().clone()
    trainable_before = trainable_snapshot(model)
    with guard(model, opt):
        train(model, opt, steps=STEPS, start=2)
    after = frozen_snapshot(model)
    assert all(torch.equal(v, after[k]) for k, v in still_frozen.items())
    assert not torch.equal(unfrozen_before, model.get_parameter("backbone.3.weight"))
    assert_frozen_and_learned(model, still_frozen, trainable_before)


@pytest.mark.parametrize("opt_name", ["SGD-nesterov", "AdamW", "NAdam"])
def test_resume_from_trainable_checkpoint(opt_name: str, tmp_path: Path) -> None:
    ref = make_model()
    ref_opt = build_optimizer(opt_name, ref, weight_decay=0.1, source="groups")
    train(ref, ref_opt, steps=4)

    model = make_model()
    opt = build_optimizer(opt_name, model, weight_decay=0.1, source="groups")
    train(model, opt, steps=2)
    path = save_trainable(model, tmp_path / "run.safetensors")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    fresh = RelNet(seed=0)  # the same pretrained base, nothing frozen yet
    with torch.no_grad():
        for name in ("backbone.1.running_mean", "backbone.1.running_var"):
            fresh.get_buffer(name).copy_(ref.get_buffer(name))
    load_trainable(fresh, path)  # restores the freeze state (pins included) and the trained part
    fresh.train()
    opt2 = build_optimizer(opt_name, fresh, weight_decay=0.1, source="groups")
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    frozen_before = frozen_snapshot(fresh)
    with guard(fresh, opt2):
        train(fresh, opt2, steps=2, start=2)
    assert all(torch.equal(v, frozen_snapshot(fresh)[k]) for k, v in frozen_before.items())
    for (k, a), (_, b) in zip(ref.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------- issue 10.3 / 10.4


def test_check_reports_an_optimizer_that_holds_nothing_trainable() -> None:
    """Everything frozen + GradScaler: torch asserts 'No inf checks were recorded'; check says so first."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before everything was frozen
    assert "optimizer-holds-nothing-trainable" not in [p.code for p in check(model, opt)]
    freeze(model)
    assert "optimizer-holds-nothing-trainable" in [p.code for p in check(model, opt)]


class _Replace:
    """Ways to swap a frozen tensor for another object (issue 10.4)."""

    @staticmethod
    def reassign_module(model: RelNet) -> None:
        model.backbone[0] = nn.Linear(8, 8)  # what older resize_token_embeddings did

    @staticmethod
    def load_assign(model: RelNet) -> None:
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(sd, assign=True)

    @staticmethod
    def replace_buffer(model: RelNet) -> None:
        model.backbone[1].running_mean = torch.zeros(8)


@pytest.mark.parametrize("how", ["reassign_module", "load_assign", "replace_buffer"])
def test_guard_reports_a_replaced_frozen_tensor(how: str) -> None:
    from torchfreeze.errors import FrozenTensorChangedError

    model = make_model()
    with pytest.raises(FrozenTensorChangedError, match="replaced") as info:
        with guard(model):
            getattr(_Replace, how)(model)
    name = {
        "reassign_module": "backbone.0.weight",
        "load_assign": "backbone.0.weight",
        "replace_buffer": "backbone.1.running_mean",
    }[how]
    assert name in info.value.changes and name in str(info.value)


def test_guard_does_not_report_an_unfreeze_as_replaced() -> None:
    model = make_model()
    with guard(model) as g:
        unfreeze(model, "backbone.0")
        g.verify()
    assert "backbone.0.weight" not in g.names


def test_check_reports_recorded_frozen_parameters_that_require_grad() -> None:
    from torchfreeze import freeze_state

    model = make_model()
    state = freeze_state(model)
    assert "requires-grad-but-recorded-frozen" not in [p.code for p in check(model, state=state)]
    model.backbone[0] = nn.Linear(8, 8)  # the new layer trains silently
    found = [p for p in check(model, state=state) if p.code == "requires-grad-but-recorded-frozen"]
    assert found and set(found[0].names) == {"backbone.0.weight", "backbone.0.bias"}
    with pytest.raises(TypeError, match="state="):
        check(model, state=[1, 2])  # type: ignore[arg-type]


def _stored_fp16() -> Any:
    from torchfreeze.compose import Composite, store_frozen_backbone

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    model = Composite(backbone, nn.Linear(8, 2))
    freeze(model, "backbone")
    return store_frozen_backbone(model, torch.float16)


def _scaler_steps(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    scaler = torch.amp.GradScaler("cpu")
    for i in range(2):
        loss = model(torch.randn(3, 4, generator=torch.Generator().manual_seed(i))).pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)  # fp16 gradients: "Attempting to unscale FP16 gradients"
        scaler.update()
        opt.zero_grad()


@pytest.mark.parametrize("how", ["unfreeze", "freeze_to", "gradual"])
def test_unfreezing_a_backbone_stored_in_fp16_restores_float32(how: str) -> None:
    """Issue 10.3: the unfrozen part trains in float32 and the optimizer holds the restored parameters."""
    from torchfreeze import GradualUnfreezing, freeze_to

    model = _stored_fp16()
    weight = model.get_parameter("backbone.2.weight")
    rounded = weight.detach().clone()
    opt = torch.optim.SGD(param_groups(model, 0.1), lr=0.1)
    if how == "unfreeze":
        unfreeze(model, "backbone.2")
        add_unfrozen(model, opt)
    elif how == "freeze_to":
        freeze_to(model, 1, groups=["backbone.0", "backbone.2", "head"])
        add_unfrozen(model, opt, groups=["backbone.0", "backbone.2", "head"])
    else:
        GradualUnfreezing(model, opt, {1: "backbone.2"}).step()
    assert model.get_parameter("backbone.2.weight") is weight  # identity kept: the optimizer holds it
    assert all(t.dtype == torch.float32 for t in model.backbone.parameters())
    assert torch.equal(weight.detach(), rounded.float())  # the values it was stored with
    assert model.frozen_storage_dtype is None
    assert any(p is weight for g in opt.param_groups for p in g["params"])
    _scaler_steps(model, opt)
    assert not torch.equal(weight.detach(), rounded.float())  # it trained


@pytest.mark.parametrize("how", ["unfreeze", "freeze_to-train_bn"])
def test_a_converted_batchnorm_of_an_fp16_backbone_comes_back_in_float32(how: str) -> None:
    """Issue 10.3 through BatchNorm conversion: the layer that gets trainable parameters back trains in float32."""
    from torchfreeze import freeze_batchnorm, freeze_to
    from torchfreeze.compose import Composite, store_frozen_backbone

    torch.manual_seed(0)
    model = Composite(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)), nn.Linear(8, 2))
    freeze(model, "backbone", mode="eval")
    freeze_batchnorm(model, "backbone", convert=True)
    store_frozen_backbone(model, torch.float16)
    if how == "unfreeze":
        unfreeze(model, "backbone.1")
    else:
        freeze_to(model, 1, groups=["backbone", "head"], train_bn=True)
    bn = model.backbone[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.weight.requires_grad
    assert bn.weight.dtype == torch.float32 and bn.running_mean.dtype == torch.float32
    assert model.frozen_storage_dtype is None


def test_unfreeze_that_fails_leaves_the_fp16_backbone_alone() -> None:
    from torchfreeze.errors import SelectorError

    model = _stored_fp16()
    with pytest.raises(SelectorError):
        unfreeze(model, "backbone.2", "bakbone.9")
    assert model.get_parameter("backbone.2.weight").dtype == torch.float16
    assert model.frozen_storage_dtype == torch.float16
