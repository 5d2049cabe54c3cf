"""Plain CIFAR CNN with BatchNorm: 6 x (conv + BN + ReLU), max-pools, a Linear.

Architecture: the textbook CIFAR-10 convnet (VGG-style blocks after Simonyan &
Zisserman 2015, with BatchNorm after every conv, Ioffe & Szegedy 2015): three
stages of two 3x3 conv + BN + ReLU (32, 64, 128 channels), each stage followed
by a 2x2 max-pool, then flatten (128 x 4 x 4) and ``nn.Linear(2048, 10)``.
PyTorch's default initialisation.

Shrunk: nothing beyond the usual small-CIFAR widths; inputs 2 x 3 x 32 x 32.

Expected verdict: healthy. Six BN'd conv layers train from default init; BN
in train mode normalises every layer's output, so neither the weight scale nor
the depth can shrink the signal.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(first conv
output) over RMS of dLoss/d(output) 0.054; over the last conv's 0.90: flat
through the six BN'd convs; the 0.054 is the 2048 -> 10 Linear head and the
max-pools.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = "A 6-conv CIFAR CNN with BatchNorm trains from default init (Ioffe & Szegedy 2015)."

WIDTHS = (32, 32, 64, 64, 128, 128)
NUM_CLASSES = 10
IMAGE_SIZE = 32


class CifarCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(WIDTHS):
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * (IMAGE_SIZE // 8) ** 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return CifarCNN().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
