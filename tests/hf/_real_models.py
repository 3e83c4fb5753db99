"""Real architectures built from tiny configs (random weights, nothing downloaded), and a ResNet."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logging.getLogger("transformers").setLevel(logging.ERROR)  # tiny vocabularies make GPT-2 warn about token ids


def bert() -> nn.Module:
    import transformers as t

    config = t.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=16,
    )  # fmt: skip
    config.num_labels = 2
    return t.BertForSequenceClassification(config)


def distilbert() -> nn.Module:
    import transformers as t

    config = t.DistilBertConfig(vocab_size=30, dim=8, n_layers=2, n_heads=2, hidden_dim=8, max_position_embeddings=16)
    return t.DistilBertForSequenceClassification(config)


def gpt2() -> nn.Module:
    import transformers as t

    config = t.GPT2Config(vocab_size=30, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    return t.GPT2LMHeadModel(config)


def vit() -> nn.Module:
    import transformers as t

    config = t.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=8,
    )  # fmt: skip
    config.num_labels = 2
    return t.ViTForImageClassification(config)


def wav2vec2(**overrides: Any) -> nn.Module:
    import transformers as t

    config = t.Wav2Vec2Config(
        vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
        conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, **overrides,
    )  # fmt: skip
    return t.Wav2Vec2ForCTC(config)


def hf_resnet() -> nn.Module:
    import transformers as t

    config = t.ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic")
    config.num_labels = 2
    return t.ResNetForImageClassification(config)


class BasicBlock(nn.Module):
    """torchvision's residual block: ``self.bn1(self.conv1(x))`` in ``forward``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    """A torchvision-style ResNet: stem ``conv1``/``bn1`` at the root, ``layer1``/``layer2`` of blocks, ``fc``."""

    def __init__(self, blocks: int = 2, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(*(BasicBlock(channels) for _ in range(blocks)))
        self.layer2 = nn.Sequential(*(BasicBlock(channels) for _ in range(blocks)))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        out: torch.Tensor = self.fc(x.mean(dim=(2, 3)))
        return out


def resnet() -> nn.Module:
    return ResNet()


def example_input(name: str) -> dict[str, torch.Tensor]:
    """A batch of two for the model ``name`` builds."""
    torch.manual_seed(0)
    if name in ("bert", "distilbert", "gpt2"):
        return {"input_ids": torch.randint(1, 30, (2, 6))}
    if name in ("vit", "hf_resnet"):
        return {"pixel_values": torch.randn(2, 3, 8, 8)}
    if name == "wav2vec2":
        return {"input_values": torch.randn(2, 64)}
    return {"x": torch.randn(2, 3, 8, 8)}


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "bert": bert,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "vit": vit,
    "wav2vec2": wav2vec2,
    "hf_resnet": hf_resnet,
    "resnet": resnet,
}
