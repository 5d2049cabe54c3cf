"""Plain 20-conv CNN (no skips, no normalisation) with Kaiming (He) initialisation.

Architecture: the "plain" CIFAR network of He et al. (2016), "Deep Residual
Learning for Image Recognition", CVPR, Section 4.2 (3x3 convs in three stages
of 16/32/64 channels, the first conv of stages 2 and 3 with stride 2, global
average pooling, a Linear), but without BatchNorm and initialised as in
Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2015), "Delving Deep
into Rectifiers", ICCV: conv weights ``kaiming_normal_(mode="fan_in",
nonlinearity="relu")``, biases 0. 20 convs: 1 stem + 7 + 6 + 6 (stages), then
pooling and ``nn.Linear(64, 10)`` at PyTorch's default.

Shrunk: nothing beyond CIFAR sizes; inputs 2 x 3 x 32 x 32.

Expected verdict: healthy. He et al. 2015 derive that Var W = 2 / fan_in keeps
the forward and backward signal of a deep ReLU stack at constant scale and
show 22- and 30-layer plain nets without BN converging from it (where Xavier
init stalls at 30 layers).

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(first conv
output) over RMS of dLoss/d(output) 5.5e-4; over the last conv's 0.24
(0.24-0.47 over init seeds 0-2; 0.42-0.68 with widths doubled or quadrupled).
The 20 convs cost a factor of ~3; the rest is the 8 x 8 global average pool
(1/64 per element) and the default-init head (~0.23).
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = "He et al. 2015: Kaiming init keeps a 20-30 layer plain ReLU stack trainable without BN."

# (channels, number of convs, first stride) per stage, after a 3 -> 16 stem conv
STAGES = ((16, 7, 1), (32, 6, 2), (64, 6, 2))
NUM_CLASSES = 10
IMAGE_SIZE = 32


class PlainCNN20(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True)]
        cin = 16
        for ch, n, stride in STAGES:
            for i in range(n):
                layers += [
                    nn.Conv2d(cin, ch, 3, stride=stride if i == 0 else 1, padding=1),
                    nn.ReLU(inplace=True),
                ]
                cin = ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, NUM_CLASSES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return PlainCNN20().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
