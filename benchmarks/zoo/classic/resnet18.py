"""ResNet-18 (basic blocks, BatchNorm, identity skips), torchvision layout and init.

Architecture: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2016), "Deep
Residual Learning for Image Recognition", CVPR; written after torchvision's
``resnet18``: 7x7 stride-2 stem conv + BN + ReLU + 3x3 stride-2 max-pool, four
stages of two basic blocks (two 3x3 conv + BN, identity skip, 1x1 conv + BN
projection where the shape changes), global average pooling, one Linear.
Initialisation as torchvision's ``ResNet.__init__``: convs
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BN weight 1 and bias 0
(``zero_init_residual=False``, torchvision's default), the Linear at PyTorch's
default.

Shrunk: stage widths 32/64/128/256 instead of 64/128/256/512, 10 classes,
inputs 2 x 3 x 64 x 64 (the stem and stages divide by 32, leaving 2 x 2).

Expected verdict: healthy. ResNet-18 trains from exactly this init in the
paper and in torchvision's reference recipe; BN in train mode keeps every
branch at unit scale and the identity skips carry the backward signal.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(stem conv
output) over RMS of dLoss/d(output) 0.10; over the last conv's (layer4.1.conv2)
3.0: the signal grows a little towards the stem, as residual sums do; the 0.10
is the global average pool (2 x 2) and the head, not depth.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "ResNet-18 with BN and torchvision's Kaiming fan_out init is the standard trainable "
    "baseline (He et al. 2016)."
)

WIDTHS = (32, 64, 128, 256)
LAYERS = (2, 2, 2, 2)
NUM_CLASSES = 10
IMAGE_SIZE = 64


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
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
                blocks.append(BasicBlock(self.inplanes, w, 2 if (i > 0 and j == 0) else 1))
                self.inplanes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
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
    return ResNet().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
