"""ResNet-50 (bottleneck blocks, BatchNorm, identity skips), torchvision layout and init.

Architecture: He et al. (2016), "Deep Residual Learning for Image Recognition",
CVPR, the 50-layer model with bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by
4, BN after each conv, stride on the 3x3 as in torchvision's "ResNet v1.5"),
stages of (3, 4, 6, 3) blocks, a 1x1 conv + BN projection on the first block of
each stage. Initialisation as torchvision's ``ResNet.__init__``: convs
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BN weight 1 and bias 0
(``zero_init_residual=False``), Linear at PyTorch's default.

Shrunk: bottleneck widths 16/32/64/128 (outputs 64/128/256/512) instead of
64/128/256/512 (outputs 256/.../2048); the depth (3, 4, 6, 3) is kept; 10
classes; inputs 2 x 3 x 64 x 64.

Expected verdict: healthy. This is the network and init of the paper and of
torchvision's reference training; BN in train mode and identity skips keep the
gradient within a small factor from output to stem.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(stem conv
output) over RMS of dLoss/d(output) 3.0; over the last conv's (layer4.2.conv3)
92: the residual sums and BN in train mode amplify the signal towards the stem
(the projection shortcuts carry BN'd branches too); no attenuation anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "ResNet-50 with BN and torchvision's Kaiming fan_out init trains from scratch (He et al. 2016)."
)

WIDTHS = (16, 32, 64, 128)
LAYERS = (3, 4, 6, 3)
EXPANSION = 4
NUM_CLASSES = 10
IMAGE_SIZE = 64


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    def __init__(self, widths=WIDTHS, layers=LAYERS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for i, (w, n) in enumerate(zip(widths, layers, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(self.inplanes, w, 2 if (i > 0 and j == 0) else 1))
                self.inplanes = w * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return ResNet50().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
