#!/usr/bin/env python
"""Pretrain the "digits-cnn" backbone and write src/torchfreeze/hub/weights/digits_cnn.{safetensors,json}.

What it trains on, and why: scikit-learn's bundled digits (a copy of the test
set of the UCI "Optical Recognition of Handwritten Digits" data: 1,797 8x8
images; UCI, CC BY 4.0; shipped with scikit-learn, BSD-3-Clause), **digits 0-4
only** (901 images; 80% train, 20% validation). The demo then transfers the
backbone to **digits 5-9**, classes the backbone has never seen, so the demo's
transfer step is honest: its held-out accuracy measures what the frozen
features carry over, not memorisation.

Deterministic: fixed seeds, one thread, deterministic algorithms, a fixed
batch order. On the same machine and torch build, re-running reproduces the
file bit for bit (`--check` verifies that against the recorded sha256). Across
CPUs or torch versions the floating-point results can differ in the last bits;
the recorded sha256 is then of the committed file, which is what the library
verifies.

Usage:
    python scripts/pretrain_digits.py            # (re)write the weights + JSON
    python scripts/pretrain_digits.py --check    # retrain in memory, compare sha256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from torchfreeze.hub.models import DigitsBackbone, load_digits_tensors, stratified_split

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
SEED = 0
EPOCHS = 30
BATCH = 32
LR = 2e-3
LABEL_SMOOTHING = 0.2  # keeps the features less specialised to 0-4: better transfer to 5-9
OUT = ROOT / "src" / "torchfreeze" / "hub" / "weights"


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by -1, 0 or +1 pixel in each direction (zero padding)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def train() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)

    images, labels = load_digits_tensors(PRETRAIN_CLASSES)
    train_idx, val_idx = stratified_split(labels, test_fraction=0.2, seed=SEED)
    xtr, ytr = images[train_idx], labels[train_idx]
    xva, yva = images[val_idx], labels[val_idx]

    backbone = DigitsBackbone()
    head = nn.Linear(DigitsBackbone.feature_dim, len(PRETRAIN_CLASSES))
    model = nn.Sequential(backbone, head)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for start in range(0, len(order), BATCH):
            b = order[start : start + BATCH]
            loss = F.cross_entropy(model(shift(xtr[b], gen)), ytr[b], label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xva).argmax(1) == yva).float().mean().item()
        print(f"epoch {epoch + 1:2d}/{EPOCHS}  loss {total / len(xtr):.4f}  val acc {acc:.4f}")

    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    info = {
        "pretrain_classes": list(PRETRAIN_CLASSES),
        "pretrain_train_images": len(xtr),
        "pretrain_val_images": len(xva),
        "pretrain_val_accuracy": round(acc, 4),
        "epochs": EPOCHS,
        "label_smoothing": LABEL_SMOOTHING,
        "seed": SEED,
        "torch": torch.__version__.split("+")[0],
    }
    return state, info


def serialise(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(state, metadata={"format": "pt"})  # one entry: safetensors orders metadata keys by hash (not stable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="retrain and compare with the recorded sha256")
    parser.add_argument("--out-dir", type=Path, default=OUT, help="where to write the two files")
    args = parser.parse_args(argv)

    state, info = train()
    blob = serialise(state)
    digest = hashlib.sha256(blob).hexdigest()
    if args.check:
        recorded = json.loads((args.out_dir / "digits_cnn.json").read_text())["sha256"]
        same = digest == recorded
        print(f"retrained sha256 {digest}\nrecorded  sha256 {recorded}\n" + ("identical" if same else "DIFFERENT"))
        return 0 if same else 1

    n_params = sum(
        v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    description = {
        "name": "digits-cnn-0to4",
        "source": "torchfreeze:hub/weights/digits_cnn.safetensors",
        "sha256": digest,
        "target": "backbone",
        "metadata": {
            "parameters": n_params,
            "license": "MIT (these weights, torchfreeze); data: UCI optdigits, CC BY 4.0, via scikit-learn (BSD-3-Clause)",
            "origin": "trained by scripts/pretrain_digits.py on scikit-learn load_digits, digits 0-4 only",
            "input": "float32 (batch, 1, 8, 8), pixel values / 16 in [0, 1]",
            "output": "features (batch, 128)",
            **info,
        },
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (
        ("digits_cnn.safetensors", blob),
        ("digits_cnn.json", (json.dumps(description, indent=2) + "\n").encode()),
    ):
        fd, tmp = tempfile.mkstemp(dir=args.out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out_dir / name)
    print(f"wrote {args.out_dir / 'digits_cnn.safetensors'} ({len(blob)} bytes, sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
