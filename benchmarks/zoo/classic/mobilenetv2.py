"""MobileNetV2 (inverted residuals, linear bottlenecks, ReLU6), torchvision layout and init.

Architecture: Mark Sandler, Andrew Howard, Menglong Zhu, Andrey Zhmoginov and
Liang-Chieh Chen (2018), "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR; written after torchvision's ``mobilenet_v2``: 3x3 stride-2
stem conv + BN + ReLU6, the paper's 17 inverted-residual blocks (1x1 expand +
BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 linear projection + BN, identity
skip when stride 1 and channels match), 1x1 conv to 1280 + BN + ReLU6, global
average pooling, Dropout(0.2), Linear. Initialisation as torchvision's
``MobileNetV2.__init__``: convs ``kaiming_normal_(mode="fan_out")``, conv biases
0, BN weight 1 bias 0, Linear ``normal_(0, 0.01)`` bias 0.

Shrunk: nothing in the network (width multiplier 1.0, the paper's block table);
10 classes; inputs 2 x 3 x 64 x 64 (stride 32 leaves 2 x 2).

Expected verdict: healthy. MobileNetV2 trains from this init (torchvision's
reference recipe); BN in every block and the identity skips keep the backward
signal in range.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(stem conv
output) over RMS of dLoss/d(output) 0.86; over the last 1x1 conv's (1280
channels) 122: the head (normal(0, 0.01), 10 classes) scales the signal down by
~0.03 at the top and BN in train mode scales it up again towards the stem.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "MobileNetV2 with BN, inverted residuals and torchvision's init is a standard trainable "
    "model (Sandler et al. 2018)."
)

# t (expansion), c (output channels), n (repeats), s (first stride)
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
NUM_CLASSES = 10
IMAGE_SIZE = 64


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        cin = 32
        features: list[nn.Module] = [conv_bn_act(3, cin, 3, stride=2)]
        for t, c, n, s in SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(conv_bn_act(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return MobileNetV2().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
