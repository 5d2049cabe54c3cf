"""Healthy ReLU MLP with a branch on a tensor's value: untraceable by fx and export.

Model: ``nn.Linear(32, 64)`` + ReLU, then, chosen by ``if x.mean() > 0`` on
the raw input batch, one of two Kaiming-initialised ReLU branches
(``BRANCH_DEPTH`` = 3 Linear(64, 64) layers each), then ``nn.Linear(64, 10)``.
Branching on the *value* of a tensor (rather than its shape) cannot be
captured by a graph tracer: torch.fx's symbolic tracing has no value to
compare (``TraceError: symbolically traced variables cannot be used as
inputs to control flow``), and torch.export
refuses to guard on data-dependent values. A tool must fall back to
eager-mode hooks (or report the trace failure) for this model.

EXPECTED DIAGNOSIS: healthy gradient flow (He init, ReLU: chi ~ 1 per layer;
the per-element delta ratio of the first Linear over the last Linear of the
branch that ran is ~1, measured 1.04), plus a trace note that static graph
capture failed. Which branch runs depends on the batch: the example inputs
have a negative mean, so they take branch ``b`` (``TAKEN_BRANCH``); a batch
with a positive mean takes branch ``a``. Either way only the branch that ran
gets gradients, and a tool that shows the other one as "no gradient" should
say that it did not run, not that it is dead.

Papers: Kaiming He et al. (2015), "Delving Deep into Rectifiers" (the init);
James K. Reed, Zachary DeVito, Horace He, Ansley Ussery and Jason Ansel
(2022), "torch.fx: Practical Program Capture and Transformation for Deep
Learning in Python", MLSys (symbolic tracing cannot follow data-dependent
control flow).
"""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 32
WIDTH = 64
BRANCH_DEPTH = 3
NUM_CLASSES = 10
BATCH_SIZE = 16
TAKEN_BRANCH = "branch_b"


def _branch() -> nn.Sequential:
    """One Kaiming ReLU stack; two copies so either path is healthy."""
    layers: list[nn.Module] = []
    for _ in range(BRANCH_DEPTH):
        linear = nn.Linear(WIDTH, WIDTH)
        nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


class DataDependentMLP(nn.Module):
    """The `if` on a tensor value is the whole point: it defeats graph capture."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_FEATURES, WIDTH)
        nn.init.kaiming_normal_(self.inp.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.inp.bias)
        self.branch_a = _branch()
        self.branch_b = _branch()
        self.head = nn.Linear(WIDTH, NUM_CLASSES)
        nn.init.kaiming_normal_(self.head.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        if x.mean() > 0:  # data-dependent control flow
            h = self.branch_a(h)
        else:
            h = self.branch_b(h)
        return self.head(h)


def build_model() -> nn.Module:
    """Seeded so both branches' weights are reproducible."""
    torch.manual_seed(0)
    return DataDependentMLP()


def example_inputs() -> torch.Tensor:
    """Unit-variance inputs; their mean is negative, so they take ``branch_b``."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH_SIZE, IN_FEATURES, generator=g)
