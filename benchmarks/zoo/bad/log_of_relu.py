"""Model that takes the log of a ReLU output, which is exactly 0 for half the units: -inf, then NaN.

Architecture: ``nn.Linear(32, 64)`` -> ``ReLU`` -> ``torch.log`` -> ``nn.Linear(64,
10)``, PyTorch's default init. A common slip when a "log-feature" or a
log-likelihood term is applied to a quantity that is non-negative but not
strictly positive (e.g. a ReLU/softplus-free rate, a count, a variance that can
underflow).

Sizes: width 64, inputs 2 x 32.

What is wrong: about half of the ReLU outputs are exactly 0, and log(0) = -inf
(IEEE 754); the next Linear adds -inf terms with weights of both signs, giving
-inf + inf = NaN in the output, and every gradient is NaN. A tool must report
non-finite values in the forward pass at the ``log`` (GS501) and suggest
``torch.log(x.clamp_min(eps))`` or ``log1p``.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS): the output is NaN (every element); dLoss/d(fc1
output) is finite only because ReLU's backward masks the infinite log' at 0, so
no ratio is meaningful.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS501",)
REASON = (
    "log of a ReLU output is -inf wherever the unit is off, and the next Linear turns it into NaN."
)

IN_FEATURES = 32
WIDTH = 64
NUM_CLASSES = 10


class LogOfReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, WIDTH)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.log(self.relu(self.fc1(x)))  # -inf wherever the ReLU is 0
        return self.fc2(h)


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return LogOfReLU().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, IN_FEATURES, generator=g)
