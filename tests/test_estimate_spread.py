"""The spread of unit means against brute-force autograd: the activation gain it must not bend.

When each unit (channel) has its own mean, ``z ~ N(m_c, v)`` within unit c and
``m_c ~ N(m, b)`` across units, the activation's E[phi], E[phi^2] and E[phi'^2] over all
units are those of the mixture, which is exactly ``N(m, v + b)``; only the spread of the
*output* unit means depends on the split. These tests build inputs and stacks where the
spread is (nearly) the whole variance, the regime of deep plain ReLU networks, and check
the estimate's backward gains against autograd. The rule they guard once averaged
per-unit moments over m_c with 5 Gauss-Hermite nodes, which for a step-like integrand
put 53% of the weight on one unit mean: a ReLU whose mean sat just below 0 passed back
E[phi'^2] ~ 0.23 instead of ~0.48, 0.3 decades per ReLU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradscope.estimate.engine import _Estimator, estimate
from gradscope.tracing import trace_model
from gradscope.tracing.graph import node_record

SEEDS = 4


def _sq_norms(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Static S (squared gradient norm relative to the output's) of every compute node."""
    traced = trace_model(model, (x,))
    est = estimate(traced, (x,))
    return {n: est.sq_norm[n] for n in traced.order()
            if node_record(traced.graph, n).role in ("compute", "input")}


def _measured_sq_norms(model: nn.Module, x: torch.Tensor,
                       names: list[str]) -> dict[str, float]:
    """Autograd: ||dL/d(module output)||^2 / ||dL/d output||^2, summed over random directions.

    ``names`` are the model's leaf modules (``"0"``, ``"1"``, ...) plus ``"x"`` for the input.
    """
    total = dict.fromkeys(names, 0.0)
    out_total = 0.0
    kept: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def keep(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
            o.retain_grad()
            kept[name] = o
        return keep

    hooks = [module.register_forward_hook(keeper(name))
             for name, module in model.named_modules() if name in names]
    for seed in range(SEEDS):
        kept.clear()
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        r = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + seed),
                        dtype=y.dtype)
        (y * r).sum().backward()
        out_total += float(r.square().sum())
        for name in names:
            grad = xi.grad if name == "x" else kept[name].grad
            assert grad is not None
            total[name] += float(grad.double().square().sum())
    for h in hooks:
        h.remove()
    return {n: v / out_total for n, v in total.items()}


def test_relu_gain_when_units_differ_only_by_their_means() -> None:
    # 2048 units, each nearly constant over the batch (within-unit sd 0.02) with means
    # N(-0.1, 1): the mixture is N(-0.1, 1), so E[relu'^2] = P(z > 0) = 0.46.
    gen = torch.Generator().manual_seed(0)
    means = -0.1 + torch.randn(1, 2048, generator=gen, dtype=torch.float64)
    x = means + 0.02 * torch.randn(256, 2048, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), nn.Linear(2048, 64)).double()
    static = _sq_norms(model, x)
    measured = _measured_sq_norms(model, x, ["x", "0"])
    static_gain = static["input_1"] / static["_0"]
    measured_gain = measured["x"] / measured["0"]
    assert measured_gain == pytest.approx(0.46, abs=0.03)
    assert abs(math.log10(static_gain / measured_gain)) <= 0.03



def _plain_relu_cnn(depth: int, channels: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers).double()


def test_channel_mean_share_of_a_zero_padded_relu_cnn() -> None:
    # A channel's mean averages over positions, and on 8x8 maps a 3x3 tap reads zero padding
    # on 1/8 of them per border dim: the channel means' share of the variance settles near
    # 0.5 (the ReLU correlation map against the padding's dilution) instead of running to 1,
    # which counting all 9 taps for every position predicted (1.0 by the 5th conv).
    # 128 channels: the measured share of 32 channel means is itself ~25% noise.
    model = _plain_relu_cnn(10, 128)
    x = torch.randn(4, 128, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traced = trace_model(model, (x,))
    est = _Estimator(traced, (x,))
    est.run()
    convs = [n for n in traced.order() if node_record(traced.graph, n).key == "conv"]
    measured: list[float] = []
    h = x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.Conv2d):
                means = h.mean(dim=(0, 2, 3))
                measured.append(float(means.var(unbiased=False) / h.var(unbiased=False)))
    for name, share in list(zip(convs, measured, strict=True))[4:]:
        mom = est.moments[name]
        assert mom is not None
        predicted = est.spread[name] / (mom[1] - mom[0] ** 2)
        assert abs(predicted - share) <= 0.1, (name, predicted, share)


def test_relu_gain_in_front_of_a_max_pool() -> None:
    # Max pooling routes the gradient to each window's largest element, which a ReLU
    # passes unless the whole window is negative: the ReLU's gain is P(max of the window's
    # pre-activations > 0) (~0.9 here, with each channel's own mean), not P(z > 0) = 0.5.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(64 * 8 * 8, 32)).double()
    x = torch.randn(8, 16, 16, 16, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    static = _sq_norms(model, x)
    measured = _measured_sq_norms(model, x, ["0", "1"])
    static_gain = static["_0"] / static["_1"]
    measured_gain = measured["0"] / measured["1"]
    assert measured_gain > 0.75
    assert abs(math.log10(static_gain / measured_gain)) <= 0.05, (static_gain, measured_gain)
