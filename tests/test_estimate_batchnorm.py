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

from gradscope.estimate.catalogue import backward_rule
from gradscope.estimate.engine import _Estimator, estimate
from gradscope.estimate.ops_base import Ctx
from gradscope.estimate.statistics import statistics_scope
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


def _population_input(shape: tuple[int, ...]) -> torch.Tensor:
    """An input whose moments are exactly the population's the loops draw from (variance 4,
    no spread of channel means): the estimate reads moments off this one tensor."""
    x0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dims = [d for d in range(x0.dim()) if d != 1]
    x0 = x0 - x0.mean(dim=dims, keepdim=True)
    return (2.0 * x0 / x0.pow(2).mean().sqrt()).float()


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


class BNHead(nn.Module):
    """BatchNorm -> linear head: the gradient reaching the BatchNorm is isotropic."""

    def __init__(self, bn: nn.Module, features: int) -> None:
        super().__init__()
        self.bn = bn
        self.head = nn.Linear(features, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x).flatten(1))


@pytest.mark.parametrize("shape", [(2, 64, 2, 2), (8, 64), (2, 64, 4, 4)])
def test_bn_gain_with_few_values_per_channel(shape: tuple[int, ...]) -> None:
    """The batch statistics of M values per channel: gain (M-2)/(M-3) / sigma^2, not 1/sigma^2.

    Train-mode BatchNorm divides by the *batch* std (E[1/s^2] = M / ((M-3) sigma^2)
    for Gaussian inputs) and projects out the batch mean and xhat (keeping
    (M-2)/M of an isotropic gradient). At M = 8 (two images of 2x2 maps, or a
    batch of 8 vectors) that is 1.2 times 1/sigma^2; measured over fresh inputs
    per seed, since the factor is an expectation over the batch. Tolerance 0.04
    in log10 of the squared gain (the factor is 0.08).
    """
    features = math.prod(shape[1:])
    bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    model = _seeded(lambda: BNHead(bn, features))
    # The estimate reads the input's moments off one tensor: give it exactly the population's
    # (variance 4, no spread of channel means), so that only the BatchNorm rule is tested.
    x0 = _population_input(shape)
    static = _static_gains(model, x0, [("x", "bn")])[("x", "bn")]
    caught: list[torch.Tensor] = []
    handle = model.bn.register_forward_hook(
        lambda mod, args, out: (out.retain_grad(), caught.append(out))[0])
    num = den = 0.0
    try:
        for seed in range(400):
            caught.clear()
            gen = torch.Generator().manual_seed(1000 + seed)
            x = (2.0 * torch.randn(*shape, generator=gen)).requires_grad_(True)
            out = model(x)
            r = torch.randn(out.shape, generator=gen)
            (out * r).sum().backward()
            assert x.grad is not None and caught[0].grad is not None
            num += float(x.grad.double().pow(2).sum())
            den += float(caught[0].grad.double().pow(2).sum())
    finally:
        handle.remove()
    err = math.log10(static / (num / den))
    assert abs(err) <= 0.04, f"estimate {static:.4g} vs measured {num / den:.4g} ({err:+.3f})"


class CatBN(nn.Module):
    """cat([x + 3, x], channels) -> BatchNorm -> head: the parts' means differ by 3."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2 * channels)
        self.head = nn.Linear(2 * channels * size * size, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(torch.cat([x + 3.0, x], 1)).flatten(1))


def test_bn_after_concatenation_of_parts_with_different_means() -> None:
    """The spread of a channel concatenation counts the difference of its parts' means.

    BatchNorm removes each channel's mean, so the 3 between the parts' means
    does not divide the gradient: within-channel variance 1, not 1 + 1.5^2
    (the first part's spread alone made the gain 3.25x too small).
    """
    model = _seeded(lambda: CatBN(8, 4))
    x = torch.randn(8, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    _check(model, x, [("x", "bn")])


class PoolBN(nn.Module):
    """ReLU -> MaxPool(2) -> BatchNorm -> head."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * (size // 2) ** 2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.pool(self.relu(x))).flatten(1))


def test_bn_after_relu_maxpool() -> None:
    """Max-pooled ReLU outputs: the maximum of f(z) is f(max z) for a monotone f.

    Their variance is 0.47 for N(0, 1) pre-activations (windows of 4); the
    Gaussian order statistic of the ReLU outputs' own moments gave 0.17, and
    BatchNorm, which divides by it, a gain 2.8x too large.
    """
    model = _seeded(lambda: PoolBN(16, 16))
    x = torch.randn(8, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    _check(model, x, [("pool", "bn")])


def _bn_rule_gain(model: nn.Module, x: torch.Tensor) -> float:
    """The BatchNorm rule's own S-gain, with the backward sweep's S downstream of it."""
    traced = trace_model(model, (x,), allow_run=False)
    with statistics_scope():
        sweep = _Estimator(traced, (x,))
        sweep.run()
        bn = next(r.name for r in traced.records() if r.module == "bn")
        ctx = Ctx(sweep, bn)
        assert ctx.first() is not None
        return backward_rule("batch_norm")(ctx)[ctx.first() or ""]


class BNPoolHead(nn.Module):
    """BatchNorm -> ReLU -> global average pool -> head, on 2x2 maps."""

    def __init__(self, channels: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.head = nn.Linear(channels, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        y = self.relu(y + x if self.residual else y)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("residual", [False, True])
def test_bn_gain_before_global_average_pool(residual: bool) -> None:
    """A gradient uniform over each image's positions loses 1/N of itself to the batch mean.

    After a global average pool every position of an image gets the same
    gradient; through ReLU, E[f']^2 / E[f'^2] = 1/2 of it stays uniform, and
    BatchNorm's projection takes the batch mean of that (half of it for N = 2)
    and its component along xhat, with which ReLU's mask is correlated. Two
    images of 2x2 maps (M = 8): measured 0.57 / sigma^2 where the uncorrelated
    formula (M - 2)/(M - 3) gives 1.2 / sigma^2. The residual case (BN -> add ->
    ReLU -> pool, as in ResNet's last block) has the BN's xhat only partly in the
    ReLU's input.
    """
    shape = (2, 64, 2, 2)
    model = _seeded(lambda: BNPoolHead(64, residual))
    x0 = _population_input(shape)
    static = _bn_rule_gain(model, x0)
    caught: list[torch.Tensor] = []
    handle = model.bn.register_forward_hook(
        lambda mod, args, out: (out.retain_grad(), caught.append(out))[0])
    num = den = 0.0
    try:
        for seed in range(400):
            caught.clear()
            gen = torch.Generator().manual_seed(1000 + seed)
            x = (2.0 * torch.randn(*shape, generator=gen)).requires_grad_(True)
            out = model(x)
            r = torch.randn(out.shape, generator=gen)
            # the gain through the BatchNorm alone: d/dx of <bn(x), g>, g the gradient at its output
            g = torch.autograd.grad((out * r).sum(), caught[0], retain_graph=True)[0]
            gx = torch.autograd.grad((caught[0] * g).sum(), x)[0]
            num += float(gx.double().pow(2).sum())
            den += float(g.double().pow(2).sum())
    finally:
        handle.remove()
    measured = num / den
    err = math.log10(static / measured)
    assert abs(err) <= 0.08, f"estimate {static:.4g} vs measured {measured:.4g} ({err:+.3f})"
