"""50-layer plain tanh MLP with weights drawn N(0, 2.0^2): saturated units, exploding gradient.

Architecture: 50 ``nn.Linear`` layers (32 -> 64 -> ... -> 64 -> 10) with
``nn.Tanh`` after each hidden layer, no skips or normalisation; every weight
``normal_(0, 2.0)`` (std 2.0 per entry, not scaled by fan_in) and biases 0.

Sizes: width 64, 50 Linears, inputs 2 x 32.

What is wrong: the pre-activations have std ~ 2.0 * sqrt(64) = 16, so almost
every tanh sits in its flat tails (saturation: |z| > 3 for ~85% of units),
yet the gradient does not vanish: the per-layer backward gain
chi = fan_in * Var W * E[tanh'(z)^2] ~ 64 * 4 * 0.033 ~ 8.5 > 1 (the few
units in the linear band carry a huge weight), so the squared gradient grows
~8x per layer: this is the chaotic phase of Poole et al. (2016),
"Exponential expressivity in deep neural networks through transient chaos",
and Schoenholz, Gilmer, Ganguli and Sohl-Dickstein (2017), "Deep Information
Propagation", ICLR, where gradients explode as chi^L. So the correct
diagnosis is exploding gradient (GS2xx) with saturation as the mechanism
(GS3xx warnings), not vanishing.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS): 84% of the hidden pre-activations have |z| > 2.99
(at least 74% in every layer); RMS of dLoss/d(first Linear output) over RMS of
dLoss/d(output) 7.6e17, over the last hidden Linear's 4.8e17 (about 2.3x per
layer): exploding, by saturation's own mechanism.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS201", "GS202")
REASON = (
    "Weights with std 2.0 put a 50-layer tanh MLP deep in the chaotic phase: saturated units "
    "and a gradient that explodes (Schoenholz et al. 2017)."
)

IN_FEATURES = 32
WIDTH = 64
DEPTH = 50
NUM_CLASSES = 10
INIT_STD = 2.0


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, WIDTH), nn.Tanh()]
    for _ in range(DEPTH - 2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    layers.append(nn.Linear(WIDTH, NUM_CLASSES))
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            nn.init.zeros_(m.bias)
    return model.train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, IN_FEATURES, generator=g)
