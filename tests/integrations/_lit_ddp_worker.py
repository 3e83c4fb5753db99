"""Worker for test_lightning.py: a 2-process Lightning DDP run (gloo, CPU) with unfreezing mid-run.

Run as ``python _lit_ddp_worker.py OUT_DIR [--no-rewrap]``; Lightning's DDP launcher starts the
second process by running this script again. Each rank writes its final ``state_dict`` to
``OUT_DIR/rank<r>.pt``. ``--no-rewrap`` disables the callback's DDP re-wrap (the control run:
replicas must then drift apart).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _lit_models import TinyModule, data

import torchfreeze.integrations.lightning as tfl


def main() -> None:
    out = Path(sys.argv[1])
    if "--no-rewrap" in sys.argv:
        tfl._adopt_ddp = lambda trainer: None  # the control: Lightning's own DDP, never re-wrapped
    torch.set_num_threads(1)
    model = TinyModule(scheduler=False)
    cb = tfl.FreezeCallback(freeze=["backbone"], mode="eval", schedule={1: "backbone.3"}, lr=0.05, guard=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    trainer.fit(model, data(n=64, batch=8))
    torch.save(
        {k: v.detach().clone() for k, v in model.state_dict().items()}
        | {"_trainable": model.backbone[3].weight.requires_grad},
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
