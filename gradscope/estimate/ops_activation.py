"""Op rule for elementwise activations (``activation:<name>`` keys).

The moments themselves come from ``gradscope.estimate.activations``; what this
rule adds is reading the activation's parameters off the module or the call, the
spread of the output's unit means (after a layer fed by non-centred inputs each
unit has its own mean; the moments over all units are still the pooled
Gaussian's, see :func:`_act`), and the gain in front of a max pool, which routes
the gradient to each window's largest element (``docs/static-estimate.md``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from gradscope.estimate.activations import (
    activation_grad_sq,
    activation_moments,
    activation_moments_array,
    unit_mean_spread,
)
from gradscope.estimate.fluctuation import weighted_mean_log_stats
from gradscope.estimate.ops_base import Ctx
from gradscope.estimate.ops_reduce import pool_window
from gradscope.estimate.statistics import EPS, Mom, var_of
from gradscope.tracing.graph import node_record

_ACT_PARAMS = ("negative_slope", "alpha", "min_val", "max_val", "beta", "threshold",
               "approximate", "lambd", "scale")
_ACT_POSITIONAL = {"leaky_relu": "negative_slope", "elu": "alpha", "celu": "alpha",
                   "hardtanh": "min_val", "softplus": "beta", "hardshrink": "lambd",
                   "softshrink": "lambd"}


def _plain_attr(module: nn.Module, attr: str) -> Any:
    """``getattr(module, attr, None)``, without asking ``nn.Module.__getattr__`` for names
    that are in neither the instance's nor its classes' dictionaries.

    That fallback only finds parameters, buffers and submodules (never a number or a
    string, all an activation's parameters can be) and raises an AttributeError, built
    with its message, for the rest: nine of them per activation node, in every estimate,
    were a tenth of the sweep over a deep MLP. Modules that override attribute lookup
    are asked as they are.
    """
    cls = type(module)
    if cls.__getattr__ is nn.Module.__getattr__ \
            and cls.__getattribute__ is nn.Module.__getattribute__ \
            and attr not in module.__dict__ \
            and not any(attr in vars(klass) for klass in cls.__mro__):
        return None
    return getattr(module, attr, None)


def _activation_params(ctx: Ctx, name: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if name == "relu6":  # nn.ReLU6 is a Hardtanh(0, 6) whose bounds are part of its name
        return params
    if ctx.module is not None:
        for attr in _ACT_PARAMS:
            value = _plain_attr(ctx.module, attr)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                params[attr] = value
        if name == "prelu" and isinstance(getattr(ctx.module, "weight", None), torch.Tensor):
            params["negative_slope"] = float(ctx.module.weight.detach().float().mean())
        return params
    for attr in _ACT_PARAMS:
        if attr in ctx.kwargs and isinstance(ctx.kwargs[attr], (int, float, str)):
            params[attr] = ctx.kwargs[attr]
    positional = _ACT_POSITIONAL.get(name)
    if positional and len(ctx.args) > 1 and isinstance(ctx.args[1], (int, float)) \
            and not isinstance(ctx.args[1], bool):
        params[positional] = float(ctx.args[1])
    if name == "hardtanh" and len(ctx.args) > 2 and isinstance(ctx.args[2], (int, float)):
        params["max_val"] = float(ctx.args[2])
    if name == "prelu":
        w = ctx.weight("weight", 1)
        if w is not None and not w.is_meta:
            params["negative_slope"] = float(w.detach().float().mean())
    return params


def _act(ctx: Ctx) -> tuple[Any, str | None]:
    """Activation moments of the node's input, and the spread of its output's unit means.

    After a layer fed by non-centred inputs each unit c has its own mean: z ~ N(m_c, v)
    within the unit, m_c ~ N(m, b) across units. That mixture of Gaussians *is*
    N(m, v + b), and E[phi], E[phi^2] and E[phi'^2] are linear in the distribution, so
    they are exactly the pooled Gaussian's (closed form for piecewise-linear phi). An
    earlier version averaged per-unit moments over m_c with a 5-point Gauss-Hermite
    rule: as v -> 0 (deep ReLU stacks, where b approaches the whole variance) the
    integrand is a step and the rule put 53% of the weight on the central node, so a
    ReLU whose mean sat a hair below 0 passed back E[phi'^2] = 0.23 instead of 0.49.

    What does depend on the split is the output's spread: Var_c g(m_c) with
    g(mu) = E[phi(mu + sqrt(v) e)], i.e. E[phi(x1) phi(x2)] - E[phi]^2 for two units'
    draws with correlation b / (v + b) (the correlation map of mean-field theory,
    Poole et al. 2016), which is integrated over m_c here.
    """
    name = ctx.data.key.split(":", 1)[1]
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    if xm is None:
        return None, first
    params = _activation_params(ctx, name)
    var = var_of(xm)
    pooled = activation_moments(name, xm[0], var, **params)
    spread = ctx.est.spread.get(first or "", 0.0)
    if spread <= 1e-3 * max(var, EPS):
        return pooled, first
    within = max(var - spread, 0.0)
    ctx.est.pending_spread = unit_mean_spread(name, xm[0], spread, within, **params)
    return pooled, first


#: Activations that never decrease (for the parameters they are built with), so the
#: largest input of a max-pool window is the largest output: the element the pool
#: routes the gradient to is the window's largest pre-activation.
_MONOTONE = frozenset({"identity", "relu", "relu6", "leaky_relu", "prelu", "elu", "celu",
                       "selu", "hardtanh", "hardsigmoid", "sigmoid", "tanh", "softplus",
                       "softsign", "logsigmoid"})

#: Grid (standardised units) for the density of the maximum of k standard normals,
#: k phi(u) Phi(u)^(k-1): spacing 0.02 keeps a step in the integrand (ReLU with no
#: spread of unit means) to ~0.5% of the gain, the range holds all but ~1e-15 of it.
_MAX_U = np.linspace(-8.0, 9.0, 851)
_MAX_CDF = 0.5 * np.vectorize(math.erfc)(-_MAX_U / math.sqrt(2.0))
_MAX_PDF = np.exp(-0.5 * _MAX_U * _MAX_U) / math.sqrt(2.0 * math.pi)


def _max_pool_window(ctx: Ctx) -> int | None:
    """The window when every consumer of the node is a max pool of one window size, else None."""
    graph = ctx.est.graph
    windows = set()
    for succ in graph.successors(ctx.name):
        if node_record(graph, succ).key != "max_pool":
            return None
        windows.add(pool_window(Ctx(ctx.est, succ)))
    return windows.pop() if len(windows) == 1 else None


def _gain_into_max_pool(ctx: Ctx, name: str, window: int) -> float | None:
    """E[phi'(z*)^2] for z* the largest pre-activation of a max-pool window.

    Max pooling routes the gradient to one element per window, the largest; for a
    monotone phi that is the largest pre-activation, so the activation's gain is
    phi'^2 averaged over that order statistic, not over all z: a ReLU in front of a
    2x2 max pool passes back most of the gradient, since the window's maximum is
    positive unless all four are (measured on VGG16: 0.82-0.91 of the squared norm,
    not 0.5). The window's elements share their unit's mean (one channel), so
    z* = m_c + sqrt(v) M with m_c ~ N(m, b) and M the maximum of ``window``
    standard normals (neighbouring positions taken as independent within the unit).
    """
    if window <= 1 or name not in _MONOTONE:
        return None
    params = _activation_params(ctx, name)
    if float(params.get("negative_slope", 0.0)) < 0.0 or float(params.get("beta", 1.0)) < 0.0:
        return None
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    if xm is None:
        return None
    var = var_of(xm)
    spread = min(ctx.est.spread.get(first or "", 0.0), var)
    within = var - spread
    density = window * _MAX_PDF * _MAX_CDF ** (window - 1)
    weights = density / density.sum()
    grads = activation_moments_array(name, xm[0] + math.sqrt(within) * _MAX_U, spread,
                                     **params)[2]
    return float(weights @ grads)


def activation_log_gain(ctx: Ctx, units: int) -> tuple[float, float]:
    """(Jensen gap, log-variance) of the activation's per-sample gain over ``units`` units.

    See ``gradscope.estimate.fluctuation``: one sample's gain is phi'^2 averaged over
    its units, weighted by the squared entries of the incoming gradient; z is the pooled
    Gaussian N(m, v + b) that the mean gain uses (the mixture over unit means), of which
    the spread b is fixed per unit and shared by all samples. In front
    of a max pool the gain is the order statistic's (:func:`_gain_into_max_pool`), whose
    spread this does not model: (0, 0), the mean alone.
    """
    name = ctx.data.key.split(":", 1)[1]
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    if xm is None or _max_pool_window(ctx) is not None:
        return 0.0, 0.0
    params = _activation_params(ctx, name)
    frozen = tuple(sorted((k, v) for k, v in params.items()))
    spread = ctx.est.spread.get(first or "", 0.0)
    return _log_gain(name, frozen, _round3(xm[0]), _round3(var_of(xm)), _round3(spread), units)


def _round3(x: float) -> float:
    return float(f"{x:.3g}")


@functools.lru_cache(maxsize=4096)
def _log_gain(name: str, frozen: tuple[tuple[str, Any], ...], mean: float, var: float,
              spread: float, units: int) -> tuple[float, float]:
    """Cached on 3 significant digits of (mean, var): a ~0.1% change of q moves d and v
    by about as much, and layers near a fixed point then share one simulation."""
    params = dict(frozen)

    def grad_sq(z: np.ndarray) -> np.ndarray:
        return activation_grad_sq(name, z, **params)

    return weighted_mean_log_stats(grad_sq, mean, var, units, spread)


class ActivationRule:
    """Moments and S-gain of ``activation:<name>`` nodes (dispatched by prefix, not registered)."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        moments, _ = _act(ctx)
        return (moments.mean, moments.second) if moments is not None else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        moments, first = _act(ctx)
        if first is None:
            return {}
        window = _max_pool_window(ctx)
        if moments is not None and window is not None:
            gain = _gain_into_max_pool(ctx, ctx.data.key.split(":", 1)[1], window)
            if gain is not None:
                return {first: gain}
        return {first: moments.grad_second if moments is not None else 1.0}
