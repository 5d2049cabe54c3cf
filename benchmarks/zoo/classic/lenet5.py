"""LeNet-5: tanh convolutions, average pooling, tanh fully connected layers.

Architecture: Yann LeCun, Leon Bottou, Yoshua Bengio and Patrick Haffner (1998),
"Gradient-Based Learning Applied to Document Recognition", Proc. IEEE, as it is
usually written in PyTorch: Conv(1, 6, 5, padding 2) - tanh - AvgPool(2) -
Conv(6, 16, 5) - tanh - AvgPool(2) - Linear(400, 120) - tanh - Linear(120, 84) -
tanh - Linear(84, 10). PyTorch's default initialisation.

Shrunk: nothing (28 x 28 inputs, as on MNIST); inputs 2 x 1 x 28 x 28.

Expected verdict: healthy. Five weight layers with tanh at PyTorch's default init
(variance 1/(3 fan_in)) shrink the signal per layer, but over five layers the
gradient loses about one decade, far from vanishing; LeNet-5 trains on MNIST
from this init in one epoch.

Measured with plain autograd (loss <output, direction drawn from a torch.Generator
seeded 0>): the norm of dLoss/d(first convolution's output) is 0.020 of the norm at
the output; gradscope's probe, which discounts the two average poolings, reads 0.078.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "LeNet-5 (tanh, average pooling) trains on MNIST from PyTorch's default init (LeCun et "
    "al. 1998)."
)


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.Tanh(),
        nn.Linear(120, 84), nn.Tanh(),
        nn.Linear(84, 10),
    ).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 28, 28, generator=g)
