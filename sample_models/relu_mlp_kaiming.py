"""Deep ReLU MLP with Kaiming init: the healthy control for the sigmoid sample.

Model: ``DEPTH`` = 20 ``nn.Linear(256, 256)`` layers with ReLU between each
pair, weights ``kaiming_normal_(mode="fan_in", nonlinearity="relu")``
(``Var W = 2 / fan_in``) and zero biases.

EXPECTED DIAGNOSIS: healthy. The per-element RMS of dLoss/d(output) of the
first Linear is ~1x that of the last (measured 0.95 with these seeds; the
published figure for the same net is 1.04). ReLU halves the second moment and
the factor 2 in the init gives it back, so ``chi = 2 * 1/2 = 1`` per layer.
The same net with PyTorch's default init vanishes (3.6e-8, chi = 1/6): it is
the init, not the depth, that matters.

Paper: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2015), "Delving
Deep into Rectifiers: Surpassing Human-Level Performance on ImageNet
Classification", ICCV.
docs/static-estimate.md (reference behaviour): "ReLU + Kaiming is stable (He et al.
2015): 20 layers, ratio 1.04".
"""

from __future__ import annotations

import torch
from torch import nn

DEPTH = 20
WIDTH = 256
BATCH_SIZE = 16


def build_model() -> nn.Module:
    """Build the stack and re-initialise it the way He et al. prescribe for ReLU."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH)
        nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def example_inputs() -> torch.Tensor:
    """Unit-variance inputs: the fixed point Kaiming init preserves."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, WIDTH, generator=g)
