"""Vanilla tanh RNN written as an ``nn.RNNCell`` called in a Python loop over 60 steps.

Architecture: the Elman RNN (Jeffrey L. Elman (1990), "Finding Structure in
Time", Cognitive Science) as users write it step by step:
``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` with ``nn.RNNCell(16, 64)``
(tanh) applied in a ``for`` loop over 60 steps from h_0 = 0, and
``nn.Linear(64, 10)`` on the last hidden state only. PyTorch's default
initialisation (every weight and bias ``U(-1/8, 1/8)`` for hidden size 64).

Shrunk: input 16 features, hidden 64, 60 steps, batch 2; inputs 2 x 60 x 16.

Expected verdict: unhealthy (vanishing through time). The default
``W_hh`` has entries of std (1/8)/sqrt(3) = 0.072, so its spectral radius is
about 0.072 * sqrt(64) = 0.58, and tanh' <= 1 only lowers the per-step gain:
Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent
neural networks", ICML, show the gradient from step T to step t then decays
like gain^(T - t); Bengio, Simard and Frasconi (1994), "Learning long-term
dependencies with gradient descent is difficult", IEEE TNN, make the same
point for any contracting recurrence. Measured here with autograd: the RMS
of dLoss/dh_1 over dLoss/dh_60 is 1.1e-15 (per-step factor 0.56; W_hh's
spectral radius here is 0.63, its largest singular value 1.10; dLoss/dh_1
over dLoss/d(output) is 2.7e-16),
so nothing the loss needs from the first steps of the sequence can be learnt
at this init; the last ~10 steps train normally. The diagnosis a tool should
give is vanishing gradient (through time, GS103, or as measured depth,
GS102); the code listed in ``EXPECT_RULES`` is the measured one, which holds
however the loop is traced.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS102",)
REASON = (
    "A default-init tanh RNN contracts ~0.5x per step, so over 60 steps the first state's "
    "gradient is ~1e-15 of the last's (Pascanu et al. 2013)."
)

INPUT_SIZE = 16
HIDDEN = 64
STEPS = 60
NUM_CLASSES = 10


class LoopRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(INPUT_SIZE, HIDDEN, nonlinearity="tanh")
        self.head = nn.Linear(HIDDEN, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], HIDDEN, dtype=x.dtype, device=x.device)
        for t in range(STEPS):
            h = self.cell(x[:, t], h)
        return self.head(h)


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return LoopRNN().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, STEPS, INPUT_SIZE, generator=g)
