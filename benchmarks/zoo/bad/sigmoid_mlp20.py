"""20-layer sigmoid MLP at PyTorch's default init: the textbook vanishing gradient.

Architecture: a plain fully connected stack of 20 ``nn.Linear`` layers
(32 -> 64 -> ... -> 64 -> 10) with ``nn.Sigmoid`` after each hidden layer,
PyTorch's default init (``kaiming_uniform_(a=sqrt(5))``: weight variance
1 / (3 fan_in), bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``).

Sizes: width 64, 20 Linears, inputs 2 x 32.

What is wrong: sigmoid's derivative is at most 1/4 and its output is not
zero-centred; with Var W = 1/(3 fan_in) each layer multiplies the squared
backward signal by about fan_in * Var W * E[sigmoid'^2] ~ 1/3 * 1/16, i.e. the
RMS shrinks ~7x per layer, so 19 layers leave ~1e-16 of the output's gradient
at the first layer. Glorot and Bengio (2010), "Understanding the difficulty of
training deep feedforward neural networks", AISTATS, show sigmoid stacks
stall for this reason even at 4-5 layers; Hochreiter (1991) and Bengio,
Simard and Frasconi (1994) describe the vanishing gradient itself.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS): RMS of dLoss/d(first Linear output) over RMS of
dLoss/d(output) 3.6e-17; over the last hidden Linear's 6.7e-16 (about 0.16x per
layer).
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS101", "GS102")
REASON = (
    "Sigmoid's derivative (<= 1/4) with default init shrinks the gradient several-fold per "
    "layer over 20 layers (Glorot & Bengio 2010)."
)

IN_FEATURES = 32
WIDTH = 64
DEPTH = 20
NUM_CLASSES = 10


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, WIDTH), nn.Sigmoid()]
    for _ in range(DEPTH - 2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Sigmoid()]
    layers.append(nn.Linear(WIDTH, NUM_CLASSES))
    return nn.Sequential(*layers).train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, IN_FEATURES, generator=g)
