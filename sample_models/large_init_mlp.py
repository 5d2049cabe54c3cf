"""Deep ReLU MLP initialised twice too large: the backward signal explodes.

Model: ``DEPTH`` = 20 ``nn.Linear(256, 256)`` layers with ReLU between each
pair, weights ``N(0, std = INIT_GAIN * sqrt(2 / fan_in))`` with
``INIT_GAIN`` = 2 (twice He et al.'s std) and zero biases.

EXPECTED DIAGNOSIS: exploding gradient. Each ReLU layer multiplies the squared
backward signal by ``chi = 4 * (2 / fan_in) * fan_in * 1/2 = 4``, i.e. the
per-element RMS doubles per layer, so between the first and the last Linear
(19 steps) the ratio is ~2^19 ~ 5e5 (measured 5.0e5). The forward signal grows
the same way (largest output element 3.5e6), which float32 holds comfortably: no
inf or NaN appears, only gradients far too large for any learning rate tuned
on the later layers. Gradient clipping hides the symptom; the fix is He init.

Papers: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2015), "Delving
Deep into Rectifiers" (chi = 1 needs exactly Var W = 2 / fan_in); Samuel S.
Schoenholz, Justin Gilmer, Surya Ganguli and Jascha Sohl-Dickstein (2017),
"Deep Information Propagation", ICLR (gradients scale as chi^(L - l));
Razvan Pascanu, Tomas Mikolov and Yoshua Bengio (2013), "On the difficulty of
training recurrent neural networks", ICML (exploding gradients, clipping).
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEPTH = 20
WIDTH = 256
INIT_GAIN = 2.0
BATCH_SIZE = 16


def build_model() -> nn.Module:
    """Build a He-style net with the std doubled: a plausible hand-rolled init mistake."""
    torch.manual_seed(0)
    std = INIT_GAIN * math.sqrt(2.0 / WIDTH)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH)
        nn.init.normal_(linear.weight, mean=0.0, std=std)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def example_inputs() -> torch.Tensor:
    """Unit-variance inputs, so all growth comes from the weights."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, WIDTH, generator=g)
