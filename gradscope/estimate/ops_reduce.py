"""Op rules for pooling and reductions: average pooling and ``mean``, ``sum``, max pooling.

Averaging over ``n`` elements divides the gradient's squared norm by ``n`` by
design (the engine counts it as *structural*, not as decay); max pooling
routes the gradient to one element of each window, keeping its norm, while its
output is an order statistic of the window.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from gradscope.estimate.ops_base import Ctx, pass_forward, rule
from gradscope.estimate.statistics import Mom, numel, var_of
from gradscope.tracing.graph import node_record
from gradscope.tracing.ops import AVERAGING_KEYS


def _reduction_factor(ctx: Ctx) -> float:
    """How many input elements each output element averages or sums over."""
    first = ctx.first()
    n_in = numel(ctx.shape(first)) if first else None
    n_out = numel(ctx.shape())
    if not n_in or not n_out:
        return 1.0
    return max(n_in / n_out, 1.0)


@rule(*AVERAGING_KEYS)
class _Average:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        n = _reduction_factor(ctx)
        # Averaging keeps each unit's own mean: only the within-unit variance shrinks.
        spread = ctx.est.spread.get(ctx.first() or "", 0.0) if ctx.data.key == "avg_pool" \
            else 0.0
        return xm[0], xm[0] ** 2 + spread + (var_of(xm) - spread) / n

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        n = _reduction_factor(ctx)
        return {r: 1.0 / n for r in ctx.activations_in()[:1]}


@rule("sum")
class _Sum:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        n = _reduction_factor(ctx)
        return n * xm[0], (n * xm[0]) ** 2 + n * var_of(xm)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        n = _reduction_factor(ctx)
        return {r: n for r in ctx.activations_in()[:1]}



@functools.lru_cache(maxsize=256)
def _max_draws(k: int) -> torch.Tensor:
    """Draws of the maximum of k standard normals (seeded Monte Carlo, cached)."""
    generator = torch.Generator().manual_seed(k)
    draws = torch.randn(max(2048, 262144 // k), k, generator=generator, dtype=torch.float64)
    return draws.max(dim=-1).values


@functools.lru_cache(maxsize=256)
def _max_order_stats(k: int) -> tuple[float, float]:
    """(E[M], E[M^2]) of the maximum of k standard normals (seeded Monte Carlo, cached)."""
    if k <= 1:
        return 0.0, 1.0
    top = _max_draws(k)
    return float(top.mean()), float((top * top).mean())


@functools.lru_cache(maxsize=1)
def _unit_draws() -> torch.Tensor:
    """Standard normal draws for the unit means, independent of :func:`_max_draws` (seeded)."""
    return torch.randn(262144, generator=torch.Generator().manual_seed(7919),
                       dtype=torch.float64)


#: Monotone non-decreasing activations whose maximum over a window is the activation
#: of the window's maximum; values are the activation itself, applied to draws.
_MONOTONE: dict[str, Any] = {
    "activation:relu": lambda t: t.clamp_min(0.0),
    "activation:relu6": lambda t: t.clamp(0.0, 6.0),
}


def _max_of_monotone(ctx: Ctx, k: int) -> Mom | None:
    """Moments of max-pooling ``f(z)`` for a monotone ``f``: ``max_i f(z_i) = f(max_i z_i)``.

    The Gaussian order statistic applies to the pre-activation z, not to f(z):
    ReLU outputs are far from Gaussian (a point mass at 0), and treating them as
    N(m, v) put the variance of ReLU -> MaxPool(2) outputs at 0.12 where it is
    0.39 (resnet18's stem; the max of 4 ReLU'd N(0, 1) values has variance 0.47).
    Each unit c has its own pre-activation mean m_c ~ N(m, spread) and the window
    shares it, so z_max = m_c + sqrt(v_within) M_k with M_k the maximum of k
    standard normals; the moments are averages over draws of both.
    """
    first = ctx.first()
    f = _MONOTONE.get(node_record(ctx.est.graph, first).key) if first else None
    if f is None or first is None:
        return None
    pre = Ctx(ctx.est, first).first()
    zm = ctx.est.moments.get(pre) if pre else None
    if zm is None or pre is None:
        return None
    spread = min(ctx.est.spread.get(pre, 0.0), var_of(zm))
    top = _max_draws(k)
    units = _unit_draws()[: top.numel()]
    y = f(zm[0] + math.sqrt(spread) * units + math.sqrt(var_of(zm) - spread) * top)
    return float(y.mean()), float((y * y).mean())


def pool_window(ctx: Ctx) -> int:
    """Values each max-pool output is the maximum of."""
    kernel: Any = None
    if ctx.module is not None:
        kernel = getattr(ctx.module, "kernel_size", None)
    elif "adaptive" not in ctx.data.op:
        kernel = ctx.arg(1, "kernel_size")
    first = ctx.first()
    shape = ctx.shape(first) if first else None
    n = len(shape) - 2 if shape and len(shape) > 2 else 1
    if isinstance(kernel, int):
        return kernel ** n
    if isinstance(kernel, (list, tuple)) and kernel and all(isinstance(k, int) for k in kernel):
        return math.prod(kernel) if len(kernel) > 1 else kernel[0] ** n
    return max(round(_reduction_factor(ctx)), 1)


@rule("max_pool")
class _MaxPool:
    """Max pooling: the output is an order statistic; the gradient is routed, norm kept."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        k = pool_window(ctx)
        if k > 1:
            through = _max_of_monotone(ctx, k)
            if through is not None:
                return through
        e1, e2 = _max_order_stats(k)
        sd = math.sqrt(var_of(xm))
        mean = xm[0] + sd * e1
        return mean, xm[0] ** 2 + 2 * xm[0] * sd * e1 + var_of(xm) * e2

    backward = staticmethod(lambda ctx: {r: 1.0 for r in ctx.activations_in()[:1]})

