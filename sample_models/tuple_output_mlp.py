"""Healthy MLP loaded by class, returning a tuple: exercises the loader's class rule.

Model: ``TupleOutputMLP``, ``DEPTH`` = 6 ``nn.Linear`` layers (``IN_FEATURES``
= 32 -> 128 -> ... -> 128 -> ``NUM_CLASSES`` = 10) with ReLU between them,
Kaiming init (fan_in, ReLU) and zero biases. ``forward`` returns the tuple
``(logits, hidden)``, where ``hidden`` is the last hidden activation.

This file deliberately has NO ``build_model()`` and no module-level ``model``:
it defines exactly one ``nn.Module`` subclass, constructible with no
arguments, which is the loader's third rule (docs/contract.md section 1). Inputs come
from ``example_inputs()``. The class draws its init from a private
``torch.Generator`` seeded with ``INIT_SEED``, so every instance has the same
weights without the constructor touching the global RNG's result.

EXPECTED DIAGNOSIS: healthy. chi = 2 * 1/2 = 1 per hidden layer, so the
per-element RMS of dLoss/d(output) of the first Linear is ~1x that of the last
hidden Linear (measured 0.88). A tool
has to build its loss from a tuple output (the first element, or every float
element).

Paper: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2015), "Delving
Deep into Rectifiers: Surpassing Human-Level Performance on ImageNet
Classification", ICCV.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

DEPTH = 6
IN_FEATURES = 32
WIDTH = 128
NUM_CLASSES = 10
BATCH_SIZE = 16
INIT_SEED = 0


class TupleOutputMLP(nn.Module):
    """The one nn.Module subclass in this file, so a loader can pick it without a name."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(INIT_SEED)
        dims = [IN_FEATURES] + [WIDTH] * (DEPTH - 1) + [NUM_CLASSES]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        for linear in self.layers:
            # Re-drawn from the private generator: nn.Linear's own init used the global RNG.
            nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="relu", generator=g)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for linear in self.layers[:-1]:
            h = torch.relu(linear(h))
        return self.layers[-1](h), h


def example_inputs() -> torch.Tensor:
    """Unit-variance inputs: the fixed point Kaiming init preserves."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, IN_FEATURES, generator=g)
