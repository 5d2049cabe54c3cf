"""DenseNet-121-style network (dense blocks with concatenation), torchvision layout and init.

Architecture: Gao Huang, Zhuang Liu, Laurens van der Maaten and Kilian Q.
Weinberger (2017), "Densely Connected Convolutional Networks", CVPR; written
after torchvision's ``densenet121``: 7x7 stride-2 stem conv + BN + ReLU + max-pool,
dense blocks whose layers are BN-ReLU-conv1x1 (4 x growth) - BN-ReLU-conv3x3
(growth 32) and whose output is *concatenated* to all previous feature maps,
transitions BN-ReLU-conv1x1 (compression 0.5) - 2x2 average pool, a final BN +
ReLU, global average pooling and a Linear. Initialisation as torchvision's
``DenseNet.__init__``: convs ``kaiming_normal_`` (fan_in, default gain), BN
weight 1 bias 0, Linear bias 0 (weight at PyTorch's default).

Shrunk: dense blocks of (2, 2, 2, 2) layers instead of (6, 12, 24, 16); growth
rate 32, bottleneck size 4 and the 64-channel stem are kept; 10 classes;
inputs 2 x 3 x 64 x 64.

Expected verdict: healthy. DenseNets train from this init; every layer's
output is concatenated straight into every later layer's input within a block
(and into the transition), so the gradient reaches early layers through short
paths, the point of the architecture.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(stem conv
output) over RMS of dLoss/d(output) 0.010; over the last dense layer's conv
0.30. The 0.010 is mostly the global average pool (2 x 2) and the head, plus
the three transitions' 2x2 average pools, which each quarter the per-element
RMS by spreading it over four positions.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "DenseNet with BN and concatenation shortcuts trains from torchvision's init (Huang et al. "
    "2017)."
)

GROWTH = 32
BLOCKS = (2, 2, 2, 2)
INIT_FEATURES = 64
BN_SIZE = 4
NUM_CLASSES = 10
IMAGE_SIZE = 64


class DenseLayer(nn.Module):
    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, BN_SIZE * GROWTH, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(BN_SIZE * GROWTH)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(BN_SIZE * GROWTH, GROWTH, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, n: int, in_ch: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * GROWTH) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet(nn.Module):
    def __init__(self, blocks=BLOCKS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        ch = INIT_FEATURES
        layers: list[nn.Module] = [
            nn.Conv2d(3, ch, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, ch))
            ch = ch + n * GROWTH
            if i != len(blocks) - 1:
                layers.append(Transition(ch, ch // 2))
                ch = ch // 2
        layers.append(nn.BatchNorm2d(ch))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.features(x))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return DenseNet().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
