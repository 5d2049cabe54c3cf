"""ReLU MLP whose every bias before a ReLU is -1: most units dead from the start.

Architecture: 8 ``nn.Linear`` layers (32 -> 64 -> ... -> 64 -> 10) with ReLU
after each hidden layer; weights at PyTorch's default init
(Var W = 1 / (3 fan_in)), every hidden layer's bias set to -1 (the output
layer's bias left at default).

Sizes: width 64, 8 Linears, inputs 2 x 32.

What is wrong: the first layer's pre-activation has std ~ sqrt(32/(3*32)) ~
0.58 for unit inputs, so a bias of -1 keeps ~96% of its units at 0; the next
layer's inputs are then almost all 0, its pre-activation is ~-1 everywhere
and every unit is dead, and so on up: the ReLUs pass no gradient and the
layers below them get none (the dying-ReLU failure, Lu, Shin, Su and
Karniadakis (2020), "Dying ReLU and Initialization: Theory and Numerical
Examples", Communications in Computational Physics). Biases should start at 0.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS): 3.1% of the first layer's units are active on the
two samples and none of the six layers above it, so dLoss/d(first Linear
output) is exactly 0 (ratio to the output's RMS: 0).
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS401", "GS402")
REASON = (
    "A bias of -1 before every ReLU switches (nearly) all units off, so no gradient reaches the"
    " lower layers (Lu et al. 2020)."
)

IN_FEATURES = 32
WIDTH = 64
DEPTH = 8
NUM_CLASSES = 10
BIAS = -1.0


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    cin = IN_FEATURES
    for _ in range(DEPTH - 1):
        lin = nn.Linear(cin, WIDTH)
        nn.init.constant_(lin.bias, BIAS)
        layers += [lin, nn.ReLU()]
        cin = WIDTH
    layers.append(nn.Linear(cin, NUM_CLASSES))
    return nn.Sequential(*layers).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, IN_FEATURES, generator=g)
