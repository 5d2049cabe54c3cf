"""Deep sigmoid MLP at PyTorch's default init: the textbook vanishing gradient.

Model: ``DEPTH`` = 10 ``nn.Linear(256, 256)`` layers with a sigmoid between
each pair (no activation after the last), PyTorch's default init
(``Var W = 1 / (3 fan_in)``). There is deliberately no narrow classifier head:
a 256 -> 10 head would change the last step's per-element gain and blur the
comparison with the published figure.

EXPECTED DIAGNOSIS: vanishing gradient. The per-element RMS of dLoss/d(output)
of the first Linear is ~2e-8 of that of the last Linear (measured 2.1e-8;
theory 2.15e-8). Each sigmoid step multiplies the squared backward signal by
``chi = (1/3) * E[sigmoid'(z)^2] ~ 0.02``: sigmoid's slope is at most 1/4, and
the default init shrinks it further. Sigmoid units also sit off-centre
(mean 0.5), which is why the paper recommends against them as hidden units.

Paper: Xavier Glorot and Yoshua Bengio (2010), "Understanding the difficulty
of training deep feedforward neural networks", AISTATS.
docs/static-estimate.md (reference behaviour): "10 layers, width 256, default init: first/last delta
ratio 2.1e-8 (theory 2.15e-8)".
"""

from __future__ import annotations

import torch
from torch import nn

DEPTH = 10
WIDTH = 256
BATCH_SIZE = 16


def build_model() -> nn.Module:
    """Build the stack with PyTorch's default init, which is the point of the sample."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if i < DEPTH - 1:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def example_inputs() -> torch.Tensor:
    """Unit-variance inputs, so the first layer sees the regime the theory assumes."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, WIDTH, generator=g)
