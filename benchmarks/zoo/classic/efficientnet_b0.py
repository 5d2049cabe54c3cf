"""EfficientNet-B0 (MBConv with SiLU and squeeze-excitation), torchvision layout and init.

Architecture: Mingxing Tan and Quoc V. Le (2019), "EfficientNet: Rethinking
Model Scaling for Convolutional Neural Networks", ICML; written after
torchvision's ``efficientnet_b0``: 3x3 stride-2 stem conv (32) + BN + SiLU, the
B0 table of 16 MBConv blocks (1x1 expand + BN + SiLU when the expansion is not
1, kxk depthwise + BN + SiLU, squeeze-excitation with SiLU and a sigmoid gate
and squeeze width input_channels / 4, 1x1 projection + BN, identity skip when
stride 1 and channels match), 1x1 conv to 1280 + BN + SiLU, global average
pooling, Dropout(0.2), Linear. Stochastic depth is off (torchvision uses 0.2 at
training time; it only drops whole residual branches). Initialisation as
torchvision's ``EfficientNet.__init__``: convs ``kaiming_normal_(mode="fan_out")``,
conv biases 0, BN weight 1 bias 0, Linear ``uniform_(-1/sqrt(out), 1/sqrt(out))``
bias 0.

Shrunk: nothing in the network (width and depth multipliers 1.0); 10 classes;
inputs 2 x 3 x 64 x 64 (stride 32 leaves 2 x 2).

Expected verdict: healthy. EfficientNet-B0 trains from this init
(torchvision's reference recipe).

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(stem conv
output) over RMS of dLoss/d(output) 1.9; over the last 1x1 conv's (1280
channels) 19: BN in train mode and the MBConv skips make the signal grow mildly
towards the stem.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "EfficientNet-B0 with BN, MBConv skips and torchvision's init is a standard trainable model"
    " (Tan & Le 2019)."
)

# expand_ratio, kernel, stride, input_channels, out_channels, num_layers
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
LAST_CHANNEL = 1280
NUM_CLASSES = 10
IMAGE_SIZE = 64


def conv_bn_act(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.activation = nn.SiLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class MBConv(nn.Module):
    def __init__(self, expand: int, k: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = cin * expand
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers.append(conv_bn_act(hidden, hidden, k, stride, groups=hidden))
        layers.append(SqueezeExcitation(hidden, max(1, cin // 4)))
        layers.append(conv_bn_act(hidden, cout, 1, act=False))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, STAGES[0][3], 3, stride=2)]
        for expand, k, stride, cin, cout, n in STAGES:
            stage = [
                MBConv(expand, k, stride if i == 0 else 1, cin if i == 0 else cout, cout)
                for i in range(n)
            ]
            layers.append(nn.Sequential(*stage))
        layers.append(conv_bn_act(STAGES[-1][4], LAST_CHANNEL, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2, inplace=True), nn.Linear(LAST_CHANNEL, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return EfficientNetB0().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
