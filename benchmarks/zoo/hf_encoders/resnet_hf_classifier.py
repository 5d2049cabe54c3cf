"""ResNet classifier (Hugging Face ``ResNetForImageClassification``), shrunk.

Architecture: He et al. (2016), "Deep Residual Learning for Image
Recognition": 7x7 stride-2 conv + BatchNorm + ReLU stem and 3x3 max pool, stages
of basic residual blocks (two 3x3 conv-BN layers, ReLU, projection shortcut
where the shape changes), global average pool, linear classifier.

Shrunk: 64 px images (the stem divides by 4), stem width 16, 2 stages of
widths (32, 64) with one basic block each, 10 classes; batch 2. Default
Hugging Face init (Kaiming normal, fan_out, ReLU for the convs; unit/zero
BatchNorm), train mode (batch statistics).

Why healthy: ResNets train from this init; He init with BatchNorm and identity
shortcuts keeps the backward signal at order one.

Measured (plain autograd, loss <logits, seeded direction>, example batch): the
per-element RMS of the gradient at the stem conv's output is 0.0053x the RMS at
the logits (norm ratio 0.22), behind the max pool (32 x 32 to 16 x 16) and the average
pool over 8 x 8 positions: pooling, not vanishing.
"""

from __future__ import annotations

import torch
from transformers import ResNetConfig, ResNetForImageClassification

SEED = 0
EXPECT = "healthy"
EXPECT_RULES: tuple[str, ...] = ()
REASON = "He init, BatchNorm and shortcuts: the textbook trainable ResNet."


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64],
                          depths=[1, 1], layer_type="basic", num_labels=10)
    return ResNetForImageClassification(config).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g)
