"""The typical pooled gradient against brute-force autograd, where one sample's S fluctuates.

In a narrow, deep, chaotic tanh MLP the squared gradient norm of one sample is a product
of one heavy-tailed gain per layer: ln S is close to Gaussian with a variance of tens of
nats, E[S] (the mean field, annealed) is carried by rare samples, and the figure a
training step or the probe computes (S pooled over a few samples) sits decades below it.
``gradscope.estimate.fluctuation`` predicts that typical pooled value; these tests check
it against autograd on the model's own weights over thousands of seeded input draws, and
that the annealed value (what the estimate gave before) is far off, so they fail without
the fix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradscope.estimate.activations import activation_grad_sq
from gradscope.estimate.engine import estimate
from gradscope.estimate.fluctuation import (
    chi2_log_stats,
    log_mean_gain,
    typical_log_shift,
    weighted_mean_log_stats,
)
from gradscope.tracing import trace_model
from gradscope.tracing.graph import node_record

IN = 16
OUT = 10


def _mlp(act: type[nn.Module], width: int, depth: int, std: float, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN, width), act()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, OUT))
    model = nn.Sequential(*layers).double()
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
    return model


def _brute_typical(model: nn.Sequential, pooled: int, groups: int) -> float:
    """E[log10 S] at the first Linear's output, S pooled over ``pooled`` samples as the probe
    pools (sum of squared norms over sum of output ones), over ``groups`` seeded groups."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(groups * pooled, IN, generator=gen, dtype=torch.float64)
    r = torch.randn(groups * pooled, OUT, generator=gen, dtype=torch.float64)
    first = model[0](x)
    first.retain_grad()
    y = model[1:](first)
    (y * r).sum().backward()
    assert first.grad is not None
    num = first.grad.square().sum(1).reshape(groups, pooled).sum(1)
    den = r.square().sum(1).reshape(groups, pooled).sum(1)
    return float(torch.log10(num / den).mean())


def _static(model: nn.Sequential, batch: int, batches: int) -> tuple[float, float]:
    """log10 of the estimate's (typical, annealed) S at the first Linear's output."""
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traced = trace_model(model, (x,))
    est = estimate(traced, (x,), batches=batches)
    first = next(n for n in traced.order() if node_record(traced.graph, n).role == "compute")
    return math.log10(est.sq_norm[first]), math.log10(est.sq_norm_mean[first])


@pytest.mark.parametrize(("width", "depth", "std", "batch", "batches", "gap"), [
    (16, 12, 2.0, 2, 3, 2.0),   # deep in the chaotic phase: typical 4.4, annealed 7.1 decades
    (32, 20, 1.0, 2, 3, 1.0),   # chaotic, wider: 8.6 vs 9.8
    (32, 20, 1.0, 16, 1, 0.6),  # the same net pooled over 16 samples: closer to the mean
    (16, 12, 2.0, 1, 1, 4.0),   # one sample: E[log10 S] itself (quenched), 1.3 vs 7.1
    (32, 20, 1.0, 1, 1, 2.0),   # 7.1 vs 9.8
])
def test_typical_pooled_gradient_of_a_chaotic_tanh_mlp(width: int, depth: int, std: float,
                                                       batch: int, batches: int,
                                                       gap: float) -> None:
    model = _mlp(nn.Tanh, width, depth, std)
    measured = _brute_typical(model, batch * batches, groups=3000)
    typical, annealed = _static(model, batch, batches)
    assert abs(typical - measured) < 0.35, (typical, measured)
    assert annealed - measured > gap, (annealed, measured)  # the mean field alone is far off


def test_wide_network_is_unchanged() -> None:
    # Width 512, Kaiming ReLU: d and v are O(1/width) per layer, the shift negligible.
    model = _mlp(nn.ReLU, 512, 8, math.sqrt(2.0 / 512))
    typical, annealed = _static(model, 4, 3)
    assert abs(typical - annealed) < 0.02


def test_chi2_log_stats_match_simulation() -> None:
    rng = np.random.default_rng(0)
    for dof in (4, 64):
        x = rng.chisquare(dof, 400_000) / dof
        d, v = chi2_log_stats(dof)
        assert d == pytest.approx(math.log(x.mean()) - np.log(x).mean(), rel=0.03)
        assert v == pytest.approx(np.log(x).var(), rel=0.03)


def test_log_mean_gain_limits() -> None:
    assert log_mean_gain(5.0, 1) == 0.0  # one sample: the quenched value
    assert log_mean_gain(0.01, 4096) == pytest.approx(0.005, rel=0.05)  # many: V / 2
    # Large V: the largest of N samples dominates, ~ sqrt(V) E[max of N normals] - ln N.
    assert log_mean_gain(400.0, 6) == pytest.approx(20.0 * 1.267 - math.log(6.0), abs=0.5)
    assert typical_log_shift(0.0, 0.0, 6) == 0.0
    assert typical_log_shift(3.0, 2.0, 6) < 0.0
    assert typical_log_shift(0.1, 50.0, 6) == 0.0  # never above the mean (Jensen)


def test_tanh_gain_fluctuation_and_shared_unit_means() -> None:
    def tanh(z: np.ndarray) -> np.ndarray:
        return activation_grad_sq("tanh", z)

    def relu(z: np.ndarray) -> np.ndarray:
        return activation_grad_sq("relu", z)

    # tanh at q = 243 over 64 units (the zoo's chaotic MLP): measured 0.53 and 1.51 with
    # autograd on that network, less the dense layer's chi^2_64 share.
    d, v = weighted_mean_log_stats(tanh, 0.0, 243.0, 64)
    assert d == pytest.approx(0.53, abs=0.05)
    assert v == pytest.approx(1.51, abs=0.15)
    # Units whose means are fixed by the weights switch on for every sample alike: the
    # sample-to-sample variance drops, the overall gap does not.
    d0, v0 = weighted_mean_log_stats(relu, 0.0, 1.0, 32)
    d1, v1 = weighted_mean_log_stats(relu, 0.0, 1.0, 32, spread=0.9)
    assert v1 < 0.8 * v0
    assert d1 == pytest.approx(d0, rel=0.25)


def test_log_mean_gain_interpolation_matches_the_monte_carlo_it_stands_for() -> None:
    """h_N(V) between grid points is within the Monte Carlo's own noise of a direct run."""
    from gradscope.estimate.fluctuation import _log_mean_gain, log_mean_gain

    rng = np.random.default_rng(0)
    for v in np.exp(rng.uniform(math.log(1e-4), math.log(1e3), 40)):
        for n in (2, 8, 512):
            direct = _log_mean_gain(float(v), n)
            assert log_mean_gain(float(v), n) == pytest.approx(direct, rel=2e-3, abs=1e-9)
    assert log_mean_gain(0.0, 8) == 0.0 and log_mean_gain(2.0, 1) == 0.0


@pytest.mark.parametrize("samples", [2, 16, 128])
def test_log_mean_gain_grid_point_is_the_plain_log_sum_exp(samples: int) -> None:
    """The in-place grid point computes the textbook formula over the same pooled normals."""
    from gradscope.estimate import fluctuation

    z = fluctuation._pooled_normals(samples)
    for var in (1e-3, 0.5, 3.0, 40.0):
        fluctuation._log_mean_gain.cache_clear()
        got = fluctuation._log_mean_gain(var, samples)
        s = math.sqrt(var)
        top = z.max(axis=1)
        want = float((s * top + np.log(np.exp(s * (z - top[:, None])).mean(axis=1))).mean())
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
