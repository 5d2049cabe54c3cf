"""ResNet-34 layout with every residual skip and every BatchNorm removed: a 34-layer plain ReLU CNN.

Architecture: the ResNet-34 of He et al. (2016), "Deep Residual Learning for
Image Recognition", CVPR (7x7 stride-2 stem, 3x3 max-pool, basic blocks in
stages of (3, 4, 6, 3), global average pooling, Linear), i.e. the ResNet-18
design at depth 34, with the identity/projection skips deleted and no
normalisation: 33 convs + ReLU in a chain, then the Linear. Convs keep a bias
(there is no BN to absorb it). Initialisation: PyTorch's default
(``kaiming_uniform_(a=sqrt(5))``, Var W = 1 / (3 fan_in)), which is what a user
gets who writes this network in plain torch without torchvision's
``init_weights``.

Shrunk: stage widths 16/32/64/128 instead of 64/128/256/512, 10 classes,
inputs 2 x 3 x 64 x 64.

What is wrong: with no skip and no BN, every conv multiplies the squared
backward signal by fan_out * Var W * 1/2 = 1/6 (for constant width), so the
gradient shrinks ~2.4x per conv and by ~1e-12 over 33 convs: vanishing.
Measured with autograd (loss <output, seeded direction>): RMS of dLoss/d(stem
conv output) over RMS of dLoss/d(last conv output) 1.0e-15 (0.34x per conv),
over dLoss/d(output) 3.3e-17.
He et al. 2016 (Section 4.1) already find the plain 34-layer net harder to
optimise than the plain 18-layer one *with* BN; without BN and at default
init the backward signal itself vanishes (Glorot & Bengio 2010; He et al.
2015, "Delving Deep into Rectifiers", who need Var W = 2 / fan to train 30
plain layers). With torchvision's Kaiming fan_out init instead, the same
plain stack measures 3.8e-3 stem/last conv (0.84x per conv, much of it the
max-pool and stride-2 convs spreading the gradient over more positions)
instead of 1e-15: the collapse here is the default init times depth without
BN.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS101", "GS102")
REASON = (
    "A 34-layer plain ReLU CNN with no skips, no BN and default init loses ~2.4x of its "
    "gradient per conv (Glorot & Bengio 2010; He et al. 2015, 2016)."
)

WIDTHS = (16, 32, 64, 128)
LAYERS = (3, 4, 6, 3)
NUM_CLASSES = 10
IMAGE_SIZE = 64


class PlainBlock(nn.Module):
    """A ResNet basic block with the skip and both BatchNorms taken out."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


class PlainResNet34(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 7, stride=2, padding=3)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks: list[nn.Module] = []
        cin = WIDTHS[0]
        for i, (w, n) in enumerate(zip(WIDTHS, LAYERS, strict=True)):
            for j in range(n):
                blocks.append(PlainBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.avgpool(self.blocks(x)), 1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return PlainResNet34().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
