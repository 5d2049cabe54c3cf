"""Op rule for elementwise activations (``activation:<name>`` keys).

The moments themselves come from ``gradscope.estimate.activations``; what this
rule adds is reading the activation's parameters off the module or the call,
and averaging over the spread of unit means: after a layer fed by non-centred
inputs each unit has its own mean, and a nonlinearity must be averaged unit by
unit, not applied to one pooled Gaussian (``docs/static-estimate.md``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradscope.estimate.activations import activation_moments
from gradscope.estimate.ops_base import Ctx
from gradscope.estimate.statistics import EPS, Mom, var_of

_ACT_PARAMS = ("negative_slope", "alpha", "min_val", "max_val", "beta", "threshold",
               "approximate", "lambd", "scale")
_ACT_POSITIONAL = {"leaky_relu": "negative_slope", "elu": "alpha", "celu": "alpha",
                   "hardtanh": "min_val", "softplus": "beta", "hardshrink": "lambd",
                   "softshrink": "lambd"}


def _activation_params(ctx: Ctx, name: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if name == "relu6":  # nn.ReLU6 is a Hardtanh(0, 6) whose bounds are part of its name
        return params
    if ctx.module is not None:
        for attr in _ACT_PARAMS:
            value = getattr(ctx.module, attr, None)
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


#: Gauss-Hermite nodes (probabilists') for averaging over the spread of unit means.
_SPREAD_NODES = [(-2.8569700138728056, 0.011257411327720691),
                 (-1.3556261799742657, 0.2220759220056126),
                 (0.0, 0.5333333333333333),
                 (1.3556261799742657, 0.2220759220056126),
                 (2.8569700138728056, 0.011257411327720691)]


def _act(ctx: Ctx) -> tuple[Any, str | None]:
    """Activation moments, averaged over units whose means differ (the spread).

    After a layer fed by non-centred inputs (ReLU outputs), each unit has its
    own mean: z_c ~ N(m_c, v) with m_c ~ N(m, b). Treating all units as one
    N(m, v + b) is wrong for a nonlinearity; averaging the per-unit moments over
    m_c is right.
    """
    name = ctx.data.key.split(":", 1)[1]
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    if xm is None:
        return None, first
    params = _activation_params(ctx, name)
    spread = ctx.est.spread.get(first or "", 0.0)
    within = max(var_of(xm) - spread, 0.0)
    if spread <= 1e-3 * max(var_of(xm), EPS):
        return activation_moments(name, xm[0], var_of(xm), **params), first
    sd = math.sqrt(spread)
    mean = second = grad = centre = 0.0
    for node, weight in _SPREAD_NODES:
        mom = activation_moments(name, xm[0] + sd * node, within, **params)
        mean += weight * mom.mean
        second += weight * mom.second
        grad += weight * mom.grad_second
        centre += weight * mom.mean * mom.mean
    result = type(mom)(mean, second, grad)
    ctx.est.pending_spread = max(centre - mean * mean, 0.0)
    return result, first


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
        return {first: moments.grad_second if moments is not None else 1.0}

