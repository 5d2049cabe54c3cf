"""ReLU MLP at He init with biases of -0.5: every unit dies within a few layers.

Model: ``DEPTH`` = 8 ``nn.Linear(256, 256)`` layers, ReLU after each of the
first 7 (the hidden layers); hidden weights ``kaiming_normal_(fan_in, relu)``
with every hidden bias set to ``HIDDEN_BIAS`` = -0.5; the last Linear is the
head, He init, zero bias.

EXPECTED DIAGNOSIS: dead units. The constant -0.5 shift pushes more than half
of each layer's pre-activations below 0, so the second moment shrinks layer by
layer until a whole layer is negative for every sample (measured share of
active units per hidden layer: 36%, 30%, 21%, 6.8%, 0.05%, then exactly 0 from
hidden layer 6 on). From there on every
activation is exactly 0, the output is the same for every input, and every
weight gradient in the model is exactly 0 (upstream of the dead layer because
ReLU's derivative is 0 there; downstream because the layer inputs are 0).
Only the head's bias still gets a gradient. Gradient clipping, learning-rate
changes or a better init scale cannot revive it: the bias sign is the bug.

Papers: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2015), "Delving
Deep into Rectifiers"; Lu Lu, Yeonjong Shin, Yanhui Su and George Em
Karniadakis (2020), "Dying ReLU and Initialization: Theory and Numerical
Examples", Communications in Computational Physics.
docs/static-estimate.md (reference behaviour): "A ReLU layer with bias <= -0.5 at He init kills the
net within a few layers: every upstream weight gradient is exactly 0".
"""

from __future__ import annotations

import torch
from torch import nn

DEPTH = 8
WIDTH = 256
HIDDEN_BIAS = -0.5
BATCH_SIZE = 16


def build_model() -> nn.Module:
    """He init is right here; only the negative bias kills the net."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH)
        nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="relu")
        is_hidden = i < DEPTH - 1
        nn.init.constant_(linear.bias, HIDDEN_BIAS if is_hidden else 0.0)
        layers.append(linear)
        if is_hidden:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def example_inputs() -> torch.Tensor:
    """Unit-variance inputs: healthy data, so the death is the model's own doing."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, WIDTH, generator=g)
