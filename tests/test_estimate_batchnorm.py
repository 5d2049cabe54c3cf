"""Train-mode BatchNorm in the static estimate against a brute-force autograd measurement.

Each case is a small synthetic model ``x -> ... -> BatchNorm -> ... -> head``. The
static figure is the estimator's squared-norm gain between two nodes
(``estimate(...).sq_norm``); the measured one is the same ratio of summed squared
gradient norms from eager autograd, with the loss ``<output, r>`` for Gaussian
directions ``r`` over a few seeds (intermediate tensors caught by forward hooks and
kept with ``retain_grad``), independent of gradscope's probe.

Tolerance: ``|log10(estimate / measured)| <= 0.3`` on the squared gain, as in
``tests/test_estimate_ops.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradscope.estimate.engine import estimate
from gradscope.tracing import trace_model

TOL = 0.3
SEEDS = 8


def _measured_gains(model: nn.Module, x: torch.Tensor,
                    pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """E||dL/d a||^2 / E||dL/d b||^2 for each (a, b), a and b submodule outputs (or "x")."""
    caught: dict[str, torch.Tensor] = {}
    names = {n for pair in pairs for n in pair} - {"x"}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            def keep(mod: nn.Module, args: object, out: torch.Tensor, name: str = name) -> None:
                out.retain_grad()
                caught[name] = out
            handles.append(module.register_forward_hook(keep))
    sums = dict.fromkeys([*names, "x"], 0.0)
    try:
        for seed in range(SEEDS):
            xs = x.detach().clone().requires_grad_(True)
            out = model(xs)
            r = torch.randn(out.shape, generator=torch.Generator().manual_seed(200 + seed))
            (out * r).sum().backward()
            assert xs.grad is not None
            sums["x"] += float(xs.grad.double().pow(2).sum())
            for name in names:
                grad = caught[name].grad
                assert grad is not None
                sums[name] += float(grad.double().pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
    return {(a, b): sums[a] / sums[b] for a, b in pairs}


def _static_gains(model: nn.Module, x: torch.Tensor,
                  pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    traced = trace_model(model, (x,), allow_run=False)
    est = estimate(traced, (x,))
    node = {r.module: r.name for r in traced.records() if r.module}
    node["x"] = "x"
    return {(a, b): est.sq_norm[node[a]] / est.sq_norm[node[b]] for a, b in pairs}


def _check(model: nn.Module, x: torch.Tensor, pairs: list[tuple[str, str]]) -> None:
    static = _static_gains(model, x, pairs)
    true = _measured_gains(model, x, pairs)
    for pair in pairs:
        err = math.log10(static[pair] / true[pair])
        assert abs(err) <= TOL, f"gain {pair[1]} -> {pair[0]}: estimate {static[pair]:.4g} " \
                                f"vs measured {true[pair]:.4g} (log10 ratio {err:+.2f})"


class ConvBN(nn.Module):
    """conv (zero padding) -> BatchNorm -> linear head, on a small feature map."""

    def __init__(self, channels: int, size: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * size * size, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).flatten(1))


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make().train()


@pytest.mark.parametrize(("size", "kernel"), [(4, 3), (8, 3), (4, 5), (16, 3)])
def test_bn_after_padded_conv_on_small_map(size: int, kernel: int) -> None:
    """BatchNorm divides the gradient by the within-channel std of its input.

    Fed non-centred inputs (mean 1, as after ReLU + max-pool), a conv's channel
    means spread across channels; the spread is what BatchNorm removes. Zero
    padding shrinks that spread (``sum f_tap^2`` taps) more than the variance
    (``sum f_tap``): counting every tap made the spread exceed the variance on
    4x4 and 8x8 maps and the BatchNorm gain 1/eps (1e5 against 9 measured).
    """
    model = _seeded(lambda: ConvBN(16, size, kernel))
    x = 1.0 + 0.5 * torch.randn(8, 16, size, size, generator=torch.Generator().manual_seed(1))
    _check(model, x, [("conv", "bn"), ("x", "bn")])
