"""ReZero residual MLP: x + alpha * F(x) with alpha initialised to 0 (branches zero by design).

Architecture: Thomas Bachlechner, Bodhisattwa Prasad Majumder, Huanru Henry
Mao, Garrison W. Cottrell and Julian McAuley (2020), "ReZero is All You Need:
Fast Convergence at Large Depth", in the spirit of Hongyi Zhang, Yann N.
Dauphin and Tengyu Ma (2019), "Fixup Initialization: Residual Learning
Without Normalization", ICLR: ``nn.Linear(32, 64)`` input projection, 16
residual blocks ``x = x + alpha * Linear(ReLU(Linear(x)))`` with a learnable
scalar ``alpha`` per block initialised to 0, no normalisation, then
``nn.Linear(64, 10)``. Linears at PyTorch's default init.

Shrunk: width 64, 16 blocks (32 Linears in the residual branches); inputs
2 x 32.

Expected verdict: healthy. At init every block is the identity, so the
gradient reaches the input projection unchanged through the skips (the
network is dynamically isometric); the branches' own weights get no gradient
until alpha moves off 0 on the first step, which is how ReZero and Fixup are
meant to start (both train 100+ layer networks without normalisation).

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS, BatchNorm in train mode): RMS of dLoss/d(input
projection output) over RMS of dLoss/d(output) 0.23 (the head's default init),
identical at every block: at alpha = 0 the blocks pass the gradient through
unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "healthy"
REASON = (
    "ReZero/Fixup zero-initialised residual branches are identity at init and train deep nets "
    "(Bachlechner et al. 2020)."
)

IN_FEATURES = 32
WIDTH = 64
BLOCKS = 16
NUM_CLASSES = 10


class ReZeroBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.fc2(self.act(self.fc1(x)))


class ReZeroMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_FEATURES, WIDTH)
        self.blocks = nn.Sequential(*[ReZeroBlock() for _ in range(BLOCKS)])
        self.out = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return ReZeroMLP().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, IN_FEATURES, generator=g)
