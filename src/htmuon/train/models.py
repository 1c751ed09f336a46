"""Models: Hugging Face ``LlamaForCausalLM`` built from a config (no weights downloaded) and a
plain-torch BasicBlock ResNet (torchvision is not needed)."""

from __future__ import annotations

import torch
from torch import nn

from htmuon.cli import UserError
from htmuon.train.presets import LLAMA_PRESETS, MODEL_PRESETS, RESNET_PRESETS


def check_model_name(name: str) -> None:
    if name not in LLAMA_PRESETS and name not in RESNET_PRESETS:
        raise UserError(f"unknown model preset '{name}' (choose from {', '.join(MODEL_PRESETS)})")


def build_llama(name: str, vocab_size: int, seq_len: int) -> nn.Module:
    """A randomly initialised LLaMA of the preset's shape (untied embeddings, as LLaMA)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise UserError("LLaMA models need the transformers library: pip install htmuon[train]") from None
    shape = LLAMA_PRESETS[name]
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(seq_len, 256),
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **shape,
    )
    return LlamaForCausalLM(cfg)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, stages of BasicBlocks (stride 2 between stages), global
    average pooling and a linear classifier ``fc``. Conv kernels are 4-D; HTMuon flattens them."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_resnet(name: str, in_channels: int, num_classes: int) -> nn.Module:
    widths, blocks = RESNET_PRESETS[name]
    return ResNet(widths, blocks, in_channels, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
