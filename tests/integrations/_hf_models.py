"""A tiny BERT classifier built from a config (random weights, no download) and a Trainer run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from torchfreeze.integrations.transformers import FreezeCallback, FreezeTrainer


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """16 sentences of 8 tokens with a label (fixed)."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, 40, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "max_steps": 8,
        "save_strategy": "steps",
        "save_steps": 4,
        "logging_strategy": "no",
        "learning_rate": 1e-2,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def callback(**overrides: Any) -> FreezeCallback:
    options: dict[str, Any] = {
        "freeze": ["bert.embeddings", "bert.encoder"],
        "mode": "eval",
        "schedule": {3: "bert.encoder.layer.1"},
        "interval": "step",
    }
    options.update(overrides)
    return FreezeCallback(**options)


def run(out: Path, *, resume: str | None = None, **cb: Any) -> tuple[BertForSequenceClassification, FreezeTrainer]:
    model = tiny_bert()
    trainer = FreezeTrainer(model=model, args=arguments(out), train_dataset=Rows(), callbacks=[callback(**cb)])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer
