"""Gradient-flow tests to copy into your own test suite.

Run: ``pytest -q examples/test_model_gradients.py``.

``assert_healthy_gradients(model, example_inputs)`` runs ``gradscope.analyze``
(one static estimate, one small forward/backward probe on the CPU) and fails
with an ``AssertionError`` listing every finding at or above ``fail_on``
(default ``"error"``): its GS code, where it is, and the fix with code to paste.
A test like the first one catches, before any training run, the init or
architecture change that silently kills the gradient at the first layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradscope.testing import assert_healthy_gradients


def build_mlp(depth: int, width: int, activation: type[nn.Module], kaiming: bool) -> nn.Module:
    """A plain MLP; stand-in for ``from mypackage.models import build_model``."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        if kaiming:  # fan_in init matched to ReLU: the gradient's scale is kept layer to layer
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def example_batch() -> torch.Tensor:
    # A fixed seed: the probe's figures, and so the verdict, are the same on every run.
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(0))


def test_classifier_has_healthy_gradients() -> None:
    torch.manual_seed(0)
    model = build_mlp(depth=6, width=64, activation=nn.ReLU, kaiming=True)
    # Returns the report when nothing is at or above fail_on, for checks of your own.
    report = assert_healthy_gradients(model, (example_batch(),))
    assert report.status in ("healthy", "warning")


def test_deep_sigmoid_mlp_is_caught() -> None:
    """What a failure looks like: 12 sigmoid layers, default init, vanishing gradient.

    In your own suite you would not expect the failure; this shows the message
    pytest prints (run with ``-s`` and uncomment the print to read it).
    """
    torch.manual_seed(0)
    model = build_mlp(depth=12, width=64, activation=nn.Sigmoid, kaiming=False)
    with pytest.raises(AssertionError) as failure:
        assert_healthy_gradients(model, (example_batch(),), fail_on="error")
    message = str(failure.value)
    # print(message)
    assert "GS101" in message  # vanishing gradient, predicted by the static estimate
    assert "fix:" in message   # each finding comes with its recommended change


def test_warnings_can_fail_too() -> None:
    """``fail_on="warning"`` is stricter: warnings fail the test as well."""
    torch.manual_seed(0)
    model = build_mlp(depth=12, width=64, activation=nn.Sigmoid, kaiming=False)
    with pytest.raises(AssertionError, match="GS705"):  # sigmoid hidden units: a warning
        assert_healthy_gradients(model, (example_batch(),), fail_on="warning")
