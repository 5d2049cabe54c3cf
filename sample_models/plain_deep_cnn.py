"""Plain 20-layer CNN at PyTorch's default init: vanishing without skips or norms.

Model: ``DEPTH`` = 20 ``nn.Conv2d(3x3, padding=1)`` layers (3 -> 16 channels,
then 16 -> 16) each followed by ReLU, on 16x16 inputs, then global average
pooling and an ``nn.Linear(16, 10)`` classifier. No BatchNorm, no residual
connections, PyTorch's default init.

EXPECTED DIAGNOSIS: vanishing gradient. PyTorch's default conv init has
``Var W = 1 / (3 fan_in)``; with ReLU's ``E[phi'^2] = 1/2`` each conv-ReLU
step multiplies the squared backward signal by ``chi = 1/6``, so across the
19 steps between the first and the last conv the per-element RMS of the
backward signal falls by ~(1/6)^(19/2) ~ 4e-8 (measured 1.0e-8; 1e-8 to
5.5e-8 over other init seeds: with only 16 channels the product of 19 random
layer gains fluctuates by a few times). The global average pool also divides
the per-element signal by the 256 pixels, but that happens after the last
conv and does not enter the first/last ratio.

Papers: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2016), "Deep
Residual Learning for Image Recognition", CVPR (plain deep nets degrade; the
motivation for skips); Kaiming He et al. (2015), "Delving Deep into
Rectifiers" (the chi = 1 init that the default one misses by 6x per layer).
docs/static-estimate.md (reference behaviour): "Plain deep CNN with default init vanishes".
"""

from __future__ import annotations

import torch
from torch import nn

DEPTH = 20
CHANNELS = 16
IN_CHANNELS = 3
IMAGE_SIZE = 16
NUM_CLASSES = 10
BATCH_SIZE = 8


class PlainCNN(nn.Module):
    """A VGG-like stack: nothing in it can rescue the backward signal."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = IN_CHANNELS
        for _ in range(DEPTH):
            layers.append(nn.Conv2d(in_ch, CHANNELS, kernel_size=3, padding=1))
            layers.append(nn.ReLU())
            in_ch = CHANNELS
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(CHANNELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.classifier(h)


def build_model() -> nn.Module:
    """Keep PyTorch's default init: it is the cause of the diagnosis."""
    torch.manual_seed(0)
    return PlainCNN()


def example_inputs() -> torch.Tensor:
    """Small images so twenty convs run forward and backward in milliseconds."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
