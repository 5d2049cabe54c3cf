"""LSTM read over 200 steps with the forget-gate bias at 0: vanishing gradient through time.

Architecture: ``nn.LSTM(16, 64, batch_first=True)`` (Hochreiter &
Schmidhuber 1997) over 200 steps, ``nn.Linear(64, 10)`` on the last step's
output only. PyTorch's default init (weights and biases ``U(-1/8, 1/8)``),
except that the forget-gate slices of both bias vectors (``b_ih`` and
``b_hh``, rows 64:128) are set to exactly 0, the value people mean by
"PyTorch's default forget bias".

Sizes: input 16 features, hidden 64, 200 steps, batch 2; inputs 2 x 200 x 16.

What is wrong: with the forget gate at sigmoid(~0) ~ 0.5 the cell state keeps
about half of itself per step, so the gradient from the last step back to the
first is ~0.6^199, ~1e-40 or below in float terms: nothing the loss needs from
the start of the sequence can be learnt. Felix Gers, Juergen Schmidhuber and
Fred Cummins (2000), "Learning to Forget", and Rafal Jozefowicz, Wojciech
Zaremba and Ilya Sutskever (2015), "An Empirical Exploration of Recurrent
Network Architectures", ICML, recommend forget bias 1 (or more for long
sequences) for this reason; Pascanu, Mikolov and Bengio (2013) analyse the
decay.

Measured with autograd (loss <output, direction drawn from a torch.Generator
seeded 0>, per-element RMS): RMS of dLoss/d(x at step 0) over dLoss/d(x at step
199) 5.0e-43 (a float32 subnormal: the first steps get effectively nothing).
RMS of dLoss/d(LSTM output) over dLoss/d(logits) 0.017, but that is the whole
sequence output, of which only the last step feeds the head.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0
EXPECT = "unhealthy"
EXPECT_RULES = ("GS103",)
REASON = (
    "With forget bias 0 an LSTM halves its cell state's gradient per step, so 200 steps back it"
    " is gone (Jozefowicz et al. 2015)."
)

INPUT_SIZE = 16
HIDDEN = 64
STEPS = 200
NUM_CLASSES = 10


class LastStepLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(INPUT_SIZE, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, NUM_CLASSES)
        with torch.no_grad():
            self.lstm.bias_ih_l0[HIDDEN : 2 * HIDDEN].zero_()
            self.lstm.bias_hh_l0[HIDDEN : 2 * HIDDEN].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return LastStepLSTM().train()


def example_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, STEPS, INPUT_SIZE, generator=g)
