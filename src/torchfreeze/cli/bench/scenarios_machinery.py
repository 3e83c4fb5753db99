"""Scenarios 3 to 5 of ``torchfreeze bench``: torchfreeze's own parts against the hand-written equivalent.

3. Frozen middle block behind trainable layers: what ``explain`` says, and its
   backward cost against the block's own input-gradient cost.
4. ``FrozenBatchNorm2d`` and folded BatchNorm against ``BatchNorm2d`` in eval.
5. The cost of torchfreeze machinery on the training path (pins, ``Frozen``,
   leftovers of freeze/unfreeze) against the hand-written equivalent.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Measurement

import torchfreeze as tf
from torchfreeze._core.tree import tensor_leaves
from torchfreeze.cli.bench.timing import Figure, figure, from_samples, per_call, ratio, rounds
from torchfreeze.cli.bench.workload import (
    QUICK,
    Sizes,
    alternate,
    make_batch,
    median,
    middle_blocks,
    prepare,
    step_runner,
    step_timer,
)


def _figs(samples: dict[str, list[float]], label: str, what: str = "repetitions") -> dict[str, Figure]:
    """Sample lists measured in-run, as figures (median, IQR, min-max)."""
    return {k: figure(from_samples(k, v, label=label), what=what) for k, v in samples.items()}


def _paired(samples: list[float]) -> Figure:
    """Per-round ratios as a ratio figure (median and IQR of the paired ratios)."""
    f = figure(from_samples("paired ratio", samples), what="paired rounds")
    return {**f, "unit": "x", "spread": f"median and IQR of {len(samples)} per-round ratios"}


__all__ = ["scenario_middle", "scenario_batchnorm", "scenario_overhead"]


def scenario_middle(base: nn.Module, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """3. Frozen middle block behind trainable layers: explain, and its backward = input-gradient cost."""
    kind = "encoder"
    bs = sizes.enc_step_batch
    x, y = make_batch(kind, sizes, bs)
    model = prepare(kind, "middle", "torchfreeze", base)
    report = tf.explain(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y))
    block_name = middle_blocks(kind)[0]
    part = report.part(block_name)

    # The block alone: its input, captured from a forward of the model.
    block = copy.deepcopy(model.get_submodule(block_name))
    captured: dict[str, Any] = {}

    def grab(mod: nn.Module, args: Any, kwargs: Any) -> None:
        captured["args"], captured["kwargs"] = args, kwargs

    h = model.get_submodule(block_name).register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model.eval()
        model(x)
    h.remove()
    hidden = captured["args"][0].detach()
    rest_args = captured["args"][1:]
    kwargs = captured["kwargs"]
    block.eval()

    def backward_cost(weights: bool) -> Callable[[], float]:
        def go() -> float:
            block.requires_grad_(weights)
            inp = hidden.clone().requires_grad_(True)
            out = tensor_leaves(block(inp, *rest_args, **kwargs))[0]
            t0 = time.perf_counter()
            out.sum().backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            dt = time.perf_counter() - t0
            block.zero_grad(set_to_none=True)
            return dt

        return go

    def forward_cost() -> float:
        block.requires_grad_(False)
        with torch.no_grad():
            t0 = time.perf_counter()
            block(hidden, *rest_args, **kwargs)
            return time.perf_counter() - t0

    res = alternate(
        {
            "input_grad_only": backward_cost(False),
            "input_and_weight_grad": backward_cost(True),
            "forward": forward_cost,
        },
        max(3, sizes.repeats),
    )
    # explain's own measurement, repeated so it is as robust as the standalone numbers
    explained = [part.backward_ms / 1000]
    for _ in range(max(2, sizes.repeats) - 1):
        explained.append(
            tf.explain(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y)).part(block_name).backward_ms
            / 1000
        )
    label = "3. frozen middle block"
    med = _figs(res, label)
    in_model = _figs({"block backward inside the model (explain)": explained}, label)
    full = prepare(kind, "middle", "plain_full", base)
    fns = {"plain_full": step_runner(full, x, y), "torchfreeze_frozen_middle": step_runner(model, x, y)}

    def timed(k: str, fn: Callable[[], None]) -> Callable[[], Measurement]:
        return lambda: per_call(fn, label=label, sub_label=k, description=kind, min_run_time=sizes.min_run_time)

    steps = rounds(
        {k: timed(k, fn) for k, fn in fns.items()},
        sizes.repeats,
    )
    step_med = {f"step, {k}": figure(m, what="timed blocks (blocked_autorange)") for k, m in steps.items()}
    in_fig = next(iter(in_model.values()))
    out: dict[str, Any] = {
        "scenario": 3,
        "title": "frozen middle block behind trainable layers",
        "model": kind,
        "frozen": middle_blocks(kind),
        "batch": bs,
        "explain": str(report),
        "explain_part": {
            k: getattr(part, k)
            for k in (
                "name",
                "on_backward_path",
                "upstream",
                "can_skip_autograd",
                "cacheable",
                "time_share",
                "activation_bytes",
                "activation_share",
            )
        },
        "block_standalone_seconds": {**in_model, **{f"block alone: {k}": f for k, f in med.items()}},
        "seconds": step_med,
        "ratios": {
            "in_model_backward_vs_input_grad_cost": ratio(in_fig, med["input_grad_only"]),
            "input_grad_vs_input_and_weight_grad": ratio(med["input_grad_only"], med["input_and_weight_grad"]),
            "step_time_frozen_middle_vs_plain_full": ratio(
                step_med["step, torchfreeze_frozen_middle"], step_med["step, plain_full"]
            ),
        },
    }
    r = {k: f["median"] for k, f in out["ratios"].items()}
    log(
        f"  [3 {kind}] '{block_name}' on backward path={part.on_backward_path} via {part.upstream[:1]}; its "
        f"backward in the model = {r['in_model_backward_vs_input_grad_cost']:.2f}x its input-gradient cost "
        f"(input grads = {r['input_grad_vs_input_and_weight_grad']:.2f}x input+weight grads)"
    )
    return out


def scenario_batchnorm(base: nn.Module, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """4. Frozen CNN backbone forward: BatchNorm2d eval vs FrozenBatchNorm2d vs folded."""
    x, _ = make_batch("cnn", sizes, sizes.cnn_batch)
    # backbones (ModuleBackbone) reached by attribute: forward_features, module[i]
    plain: Any = copy.deepcopy(base).backbone
    plain.requires_grad_(False).eval()
    frozen_bn: Any = copy.deepcopy(base).backbone
    tf.freeze(frozen_bn)
    tf.freeze_batchnorm(frozen_bn, convert=True)
    folded: Any = copy.deepcopy(base).backbone
    tf.freeze(folded)
    tf.freeze_batchnorm(folded)
    tf.fold_batchnorm(folded)
    models = {"plain_bn_eval": plain, "frozen_batchnorm": frozen_bn, "folded": folded}
    with torch.no_grad():
        ref = plain.forward_features(x)
        diffs = {k: float((m.forward_features(x) - ref).abs().max()) for k, m in models.items()}

    label = "4. BatchNorm"

    def timer(k: str, m: Any) -> Callable[[], Any]:
        def go() -> None:
            m.train()  # as in a training loop: pins / conversions must keep BN in inference behaviour
            with torch.no_grad():
                m.forward_features(x)

        return lambda: per_call(go, label=label, sub_label=k, description="cnn", min_run_time=sizes.min_run_time)

    plain_train = plain.train
    plain.train = lambda mode=True: plain_train(False)  # hand-written "stay eval"
    res = rounds({k: timer(k, m) for k, m in models.items()}, max(3, sizes.repeats * 2))
    med = {k: figure(m, what="timed blocks (blocked_autorange)") for k, m in res.items()}
    out: dict[str, Any] = {
        "scenario": 4,
        "title": "FrozenBatchNorm2d / folded BatchNorm vs BatchNorm2d in eval (frozen CNN forward)",
        "model": "cnn",
        "batch": sizes.cnn_batch,
        "seconds": {f"forward, {k}": f for k, f in med.items()},
        "max_abs_difference_vs_plain": diffs,
        "ratios": {
            "frozen_batchnorm_vs_bn_eval": ratio(med["frozen_batchnorm"], med["plain_bn_eval"]),
            "folded_vs_bn_eval": ratio(med["folded"], med["plain_bn_eval"]),
        },
    }
    r = {k: f["median"] for k, f in out["ratios"].items()}
    log(
        f"  [4 cnn] forward time: FrozenBatchNorm2d {r['frozen_batchnorm_vs_bn_eval']:.3f}x, folded "
        f"{r['folded_vs_bn_eval']:.3f}x BatchNorm2d eval (max |diff| folded {diffs['folded']:.1e})"
    )
    return out


def scenario_overhead(base: nn.Module, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """5. torchfreeze machinery on the training path against the hand-written equivalent."""
    x, y = make_batch("cnn", sizes, sizes.cnn_batch)
    steps = sizes.overhead_steps

    def prepared(what: str) -> Any:  # a Composite, reached by attribute (backbone.module[i])
        m: Any = copy.deepcopy(base)
        if what == "freeze_unfreeze_leftovers":
            tf.freeze(m, "backbone", mode="eval")
            tf.unfreeze(m, "backbone")
        elif what == "pins":
            tf.pin_mode(m, "backbone", mode="train")
        elif what in ("plain_frozen_block", "guard_on"):
            m.backbone.module[1].requires_grad_(False)  # kept in eval by hand in step_timer
        elif what == "Frozen_wrapper":
            m.backbone.module[1] = tf.Frozen(m.backbone.module[1], mode="eval")
        return m

    def timed(what: str) -> Callable[[], float]:
        m = prepared(what)
        hand = m.backbone.module[1] if what in ("plain_frozen_block", "guard_on") else None
        fn = step_timer(m, x, y, steps, keep_eval=hand)
        if what != "guard_on":
            return fn
        opt_model = m

        def with_guard() -> float:
            with tf.guard(opt_model):  # checks at exit (no optimizer passed: one check per timed block)
                return fn()

        return with_guard

    pairs = {
        "freeze_unfreeze_leftovers": "plain",
        "pins": "plain",
        "Frozen_wrapper": "plain_frozen_block",
        "guard_on": "plain_frozen_block",
    }
    variants = ["plain", "freeze_unfreeze_leftovers", "pins", "plain_frozen_block", "Frozen_wrapper", "guard_on"]
    res = alternate({v: timed(v) for v in variants}, sizes.overhead_repeats)
    med = {v: median(res[v]) for v in variants}
    step_figs = _figs(res, "5. machinery overhead", what="interleaved single steps")
    paired_figs: dict[str, Figure] = {}
    overhead: dict[str, dict[str, Any]] = {}
    for v, ref in pairs.items():
        paired = [a / b for a, b in zip(res[v], res[ref])]
        paired_figs[f"{v}_vs_{ref}"] = _paired(paired)
        q = sorted(paired)
        overhead[v] = {
            "against": ref,
            "median_ratio": median(paired),
            "overhead_percent": (median(paired) - 1) * 100,
            "interquartile_percent": [(q[len(q) // 4] - 1) * 100, (q[(3 * len(q)) // 4] - 1) * 100],
        }

    # The machinery in isolation (far less noisy than whole steps on a busy machine): the extra
    # microseconds it adds per step, as a share of the plain step.
    iso_ratio: dict[str, Figure] = {}

    def paired_us(
        plain_fn: Callable[[], Any], other_fn: Callable[[], Any], n: int, name: str = ""
    ) -> tuple[float, float, float]:
        """Median per-call microseconds of both, called alternately, and the median paired difference."""
        plain_fn()
        other_fn()
        a, b, d = [], [], []
        for i in range(n):
            first, second = (plain_fn, other_fn) if i % 2 == 0 else (other_fn, plain_fn)
            t0 = time.perf_counter()
            first()
            t1 = time.perf_counter()
            second()
            t2 = time.perf_counter()
            tp, to = (t1 - t0, t2 - t1) if i % 2 == 0 else (t2 - t1, t1 - t0)
            a.append(tp)
            b.append(to)
            d.append(to - tp)
        if name:  # the extra time per call as a share of the plain step, each pair on its own
            iso_ratio[f"isolated_{name}_vs_plain_step"] = _paired([1 + di / med["plain"] for di in d])
        return median(a) * 1e6, median(b) * 1e6, median(d) * 1e6

    calls = 50 if sizes is QUICK else 400
    m_plain, m_pins, m_left = prepared("plain"), prepared("pins"), prepared("freeze_unfreeze_leftovers")
    p_us, pin_us, pin_d = paired_us(m_plain.train, m_pins.train, calls, "pins")
    _, left_us, left_d = paired_us(m_plain.train, m_left.train, calls, "freeze_unfreeze_leftovers")
    train_us = {"plain": p_us, "pins": pin_us, "freeze_unfreeze_leftovers": left_us}
    hand_block = prepared("plain_frozen_block").backbone.module[1].eval()
    wrapped_block = prepared("Frozen_wrapper").backbone.module[1]
    with torch.no_grad():
        act = base.get_submodule("backbone.module.0")(x)
    act.requires_grad_(True)
    fwd_calls = 10 if sizes is QUICK else 60
    hb_us, fz_us, fz_d = paired_us(lambda: hand_block(act), lambda: wrapped_block(act), fwd_calls, "Frozen_wrapper")
    block_us = {"plain_frozen_block": hb_us, "Frozen_wrapper": fz_us}
    step_us = med["plain"] * 1e6
    isolated: dict[str, Any] = {
        "train_call_us": train_us,
        "block_forward_us": block_us,
        "plain_step_us": step_us,
        "overhead_percent_of_step": {
            "pins": pin_d / step_us * 100,
            "freeze_unfreeze_leftovers": left_d / step_us * 100,
            "Frozen_wrapper": fz_d / step_us * 100,
        },
    }
    out: dict[str, Any] = {
        "scenario": 5,
        "title": "overhead of torchfreeze machinery on the training path (CNN training step)",
        "model": "cnn",
        "batch": sizes.cnn_batch,
        "seconds": {f"step, {k}": f for k, f in step_figs.items()},
        "overhead": overhead,
        "isolated": isolated,
        "ratios": {**paired_figs, **iso_ratio},
        "note": (
            "target: at most 2% for pins, Frozen and leftovers (guard_on is opt-in and reported for information); "
            "whole steps are interleaved one by one, medians of per-round ratios; 'isolated' times the machinery "
            "alone (train() calls, the wrapped block's forward) against the plain step"
        ),
    }
    log(
        "  [5 cnn] whole steps: "
        + ", ".join(f"{v} {o['overhead_percent']:+.1f}%" for v, o in overhead.items())
        + "; isolated: "
        + ", ".join(f"{k} {v:+.3f}%" for k, v in isolated["overhead_percent_of_step"].items())
    )
    return out
