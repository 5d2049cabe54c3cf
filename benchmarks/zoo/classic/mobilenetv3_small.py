"""MobileNetV3-Small (hardswish, squeeze-excitation with hardsigmoid), torchvision layout and init.

Architecture: Andrew Howard et al. (2019), "Searching for MobileNetV3", ICCV;
written after torchvision's ``mobilenet_v3_small``: 3x3 stride-2 stem conv + BN
+ hardswish, the paper's 11 bneck blocks (1x1 expand + BN + act, kxk depthwise
+ BN + act, optional squeeze-excitation: avg-pool, 1x1 conv, ReLU, 1x1 conv,
hardsigmoid, multiply; 1x1 linear projection + BN; identity skip when stride 1
and channels match; act is ReLU or hardswish per the table), 1x1 conv to 576 +
BN + hardswish, global average pooling, Linear(576, 1024) + hardswish +
Dropout(0.2) + Linear. BN eps 0.001, momentum 0.01 as in torchvision.
Initialisation as torchvision's ``MobileNetV3.__init__``: convs
``kaiming_normal_(mode="fan_out")``, conv biases 0, BN weight 1 bias 0, Linears
``normal_(0, 0.01)`` bias 0.

Shrunk: nothing in the network (width multiplier 1.0); 10 classes; inputs
2 x 3 x 64 x 64 (stride 32 leaves 2 x 2).

Expected verdict: healthy. MobileNetV3-Small trains from this init
(torchvision's reference recipe).

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(stem conv
output) over RMS of dLoss/d(output) 3.0e-3; over the first classifier Linear's
output 0.18. Nearly all of the 3e-3 is the classifier: two normal(0, 0.01)
Linears (1024 -> 10: x0.03; 576 -> 1024: x0.3) and the 2 x 2 global pool; the
convolutional body is within ~5x.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "MobileNetV3-Small with BN, SE and torchvision's init is a standard trainable model (Howard"
    " et al. 2019)."
)

# input, kernel, expanded, output, use_se, activation, stride
BNECK = (
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)
LAST_CHANNEL = 1024
NUM_CLASSES = 10
IMAGE_SIZE = 64


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_act(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = make_divisible(channels // 4, 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidual(nn.Module):
    def __init__(
        self, cin: int, k: int, exp: int, cout: int, use_se: bool, act_name: str, stride: int
    ) -> None:
        super().__init__()
        act = nn.Hardswish if act_name == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn_act(cin, exp, 1, act=act))
        layers.append(conv_bn_act(exp, exp, k, stride, groups=exp, act=act))
        if use_se:
            layers.append(SqueezeExcitation(exp))
        layers.append(conv_bn_act(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, BNECK[0][0], 3, stride=2, act=nn.Hardswish)]
        for cfg in BNECK:
            layers.append(InvertedResidual(*cfg))
        last_conv = 6 * BNECK[-1][3]
        layers.append(conv_bn_act(BNECK[-1][3], last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, LAST_CHANNEL),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2, inplace=True),
            nn.Linear(LAST_CHANNEL, num_classes),
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
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return MobileNetV3Small().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
