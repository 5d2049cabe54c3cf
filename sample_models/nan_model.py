"""Small MLP whose forward takes the log of a signed tensor: NaN from torch.log.

Model: ``nn.Linear(16, 32)`` -> ``torch.log`` -> ``nn.Linear(32, 4)``. The
log is applied straight to the first layer's pre-activations, about half of
which are negative, so ``torch.log`` returns NaN for them; the second Linear
then mixes a NaN into every output element. The op is on its own line in
``NaNLogModel.forward`` (marked ``NaN source``) and appears in a torch.fx
graph as the node ``log``.

EXPECTED DIAGNOSIS: non-finite values. The first non-finite tensor in the
forward pass is the output of ``torch.log`` (the input and the first Linear's
output are finite); the model output is all NaN and so is every gradient.
A report should point at ``torch.log`` in ``forward`` and suggest guarding
its argument (e.g. ``torch.log(x.clamp_min(eps))`` or a softplus), not a
smaller learning rate. ``NAN_OP`` names the op for tests.

Paper: none; this is the everyday bug that non-finite checks (e.g.
``torch.autograd.detect_anomaly``) exist to find. IEEE 754-2019 defines
log of a negative number as NaN.
"""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 16
HIDDEN = 32
OUT_FEATURES = 4
BATCH_SIZE = 8
NAN_OP = "log"


class NaNLogModel(nn.Module):
    """Kept fx-traceable so a tool can name the exact graph node that makes the NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = torch.log(h)  # NaN source: about half of h is negative.
        return self.fc2(h)


def build_model() -> nn.Module:
    """Default init: zero-mean pre-activations guarantee negative entries."""
    torch.manual_seed(0)
    return NaNLogModel()


def example_inputs() -> torch.Tensor:
    """Ordinary finite inputs: the NaN is created inside the model, not fed in."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, IN_FEATURES, generator=g)
