"""Models, all built from a config with random weights (nothing is downloaded):

- language models: Hugging Face ``LlamaForCausalLM`` and ``GPT2LMHeadModel`` (GPT-2's ``Conv1D``
  layers turned into ``nn.Linear``, so every weight is stored out x in, as Muon's shape scaling
  expects);
- image classifiers: a plain-torch CIFAR-style ResNet with BasicBlocks (ResNet-18/34) or Bottleneck
  blocks (ResNet-50), and Hugging Face ``ViTForImageClassification`` (ViT-Tiny).

The ResNets are written here rather than taken from timm/torchvision: the paper's CIFAR runs use
the CIFAR stem (a 3x3 convolution, no max-pool), which timm's and torchvision's ImageNet ResNets
lack, and the ResNet code is 60 lines of plain torch (timm needs torchvision, whose compiled
operators must match the installed torch build exactly).
"""

from __future__ import annotations

import torch
from torch import nn

from htmuon.cli import UserError
from htmuon.train.presets import (
    BOTTLENECK_PRESETS,
    GPT2_PRESETS,
    LLAMA_PRESETS,
    MODEL_PRESETS,
    RESNET_PRESETS,
    VIT_PRESETS,
)


def check_model_name(name: str) -> None:
    if name not in MODEL_PRESETS:
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


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """The residual path: identity, or a 1x1 projection with batch norm where the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand (x4), batch norm after each, projection shortcut
    where the shape changes (ResNet-50's block; the stride on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, stages of BasicBlocks or Bottlenecks (stride 2 between
    stages), global average pooling and a linear classifier ``fc``. Conv kernels are 4-D; HTMuon
    flattens them."""

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        in_channels: int,
        num_classes: int,
        bottleneck: bool = False,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                if bottleneck:
                    layers.append(Bottleneck(c, w, stride))
                    c = w * Bottleneck.expansion
                else:
                    layers.append(BasicBlock(c, w, stride))
                    c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_resnet(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name in BOTTLENECK_PRESETS:
        widths, blocks = BOTTLENECK_PRESETS[name]
        return ResNet(widths, blocks, in_channels, num_classes, bottleneck=True)
    widths, blocks = RESNET_PRESETS[name]
    return ResNet(widths, blocks, in_channels, num_classes)


def _conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every Hugging Face ``Conv1D`` (weight in x out, ``y = x W + b``) by the equivalent
    ``nn.Linear`` (weight out x in), keeping the initialised values."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            linear = nn.Linear(n_in, n_out, device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def build_gpt2(name: str, vocab_size: int, seq_len: int) -> nn.Module:
    """A randomly initialised GPT-2 of the preset's shape (tied token embedding and LM head, as GPT-2)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UserError("GPT-2 models need the transformers library: pip install htmuon[train]") from None
    shape = dict(GPT2_PRESETS[name])
    shape["n_positions"] = max(shape["n_positions"], seq_len)
    cfg = GPT2Config(vocab_size=vocab_size, use_cache=False, bos_token_id=None, eos_token_id=None, **shape)
    return _conv1d_to_linear(GPT2LMHeadModel(cfg))


def build_vit(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A randomly initialised ViT of the preset's shape for ``image_size`` x ``image_size`` images.

    Its class token (1 x 1 x d) is a vector and its position table (1 x tokens x d) an embedding
    for the optimizers' routing (``htmuon.train.optimizers``), not 3-D weight matrices.
    """
    try:
        from transformers import ViTConfig, ViTForImageClassification
    except ImportError:
        raise UserError("ViT models need the transformers library: pip install htmuon[train]") from None
    shape = VIT_PRESETS[name]
    if image_size % shape["patch_size"]:
        raise UserError(
            f"model '{name}' has {shape['patch_size']}x{shape['patch_size']} patches, which do not tile "
            f"{image_size}x{image_size} images"
        )
    cfg = ViTConfig(image_size=image_size, num_channels=in_channels, num_labels=num_classes, **shape)
    return _LogitsOnly(ViTForImageClassification(cfg))


class _LogitsOnly(nn.Module):
    """``model(x)`` -> logits for a Hugging Face image classifier (the loop calls ``model(x)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_lm(name: str, vocab_size: int, seq_len: int) -> nn.Module:
    """The language model of a preset name (LLaMA or GPT-2)."""
    return (
        build_gpt2(name, vocab_size, seq_len)
        if name in GPT2_PRESETS
        else build_llama(name, vocab_size, seq_len)
    )


def build_image_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The image classifier of a preset name (ResNet or ViT)."""
    if name in VIT_PRESETS:
        return build_vit(name, in_channels, num_classes, image_size)
    return build_resnet(name, in_channels, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
