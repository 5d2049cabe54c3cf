"""LSTM classifier over 100 steps with PyTorch's default forget-gate bias of 0.

Model: ``nn.LSTM(input_size=16, hidden_size=64, num_layers=1,
batch_first=True)`` over sequences of ``SEQ_LEN`` = 100 steps (inputs
``BATCH_SIZE`` x 100 x 16), PyTorch's default init (every weight and bias
``U(-1/sqrt(64), 1/sqrt(64))``, so the forget-gate bias is ~0), and an
``nn.Linear(64, 10)`` head on the LAST time step's output only.

EXPECTED DIAGNOSIS: vanishing gradient through time. With the forget gate at
sigmoid(~0) ~ 0.5, the cell state keeps about half of itself per step, so the
gradient reaching the input at step 0 from a loss on step 99 is ~1e-21 of the
gradient at step 99 (the per-element RMS of dLoss/dx[:, 0] over
dLoss/dx[:, -1]: measured 4.7e-21, a factor ~0.62 per step or ~100x per 10
steps; docs/static-estimate.md gives 5.4e-22 for the same setup). The LSTM
cannot learn dependencies more than a few dozen steps long at this init.
Fix: forget-gate bias 1 (measured here 1.4e-8; the reference figure is 5e-9)
or, for 100+ steps, 3 (measured here 0.75; reference 1.6).

Papers: Sepp Hochreiter and Juergen Schmidhuber (1997), "Long Short-Term
Memory", Neural Computation; Razvan Pascanu, Tomas Mikolov and Yoshua Bengio
(2013), "On the difficulty of training recurrent neural networks", ICML
(vanishing and exploding gradients through time); Rafal Jozefowicz, Wojciech
Zaremba and Ilya Sutskever (2015), "An Empirical Exploration of Recurrent
Network Architectures", ICML (forget-gate bias 1).
docs/static-estimate.md (reference behaviour): "An LSTM with PyTorch's default forget-gate bias (0)
vanishes nearly as fast (5.4e-22); forget bias 1: 5e-9; bias 3: 1.6".
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 16
HIDDEN_SIZE = 64
NUM_LAYERS = 1
SEQ_LEN = 100
NUM_CLASSES = 10
BATCH_SIZE = 8


class LastStepLSTM(nn.Module):
    """Reads only the last step, so everything earlier must travel back through time."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN_SIZE, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def build_model() -> nn.Module:
    """PyTorch's default LSTM init is kept on purpose: it is the diagnosis."""
    torch.manual_seed(0)
    return LastStepLSTM()


def example_inputs() -> torch.Tensor:
    """Unit-variance sequences, long enough for the decay to be unmistakable."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, SEQ_LEN, INPUT_SIZE, generator=g)
