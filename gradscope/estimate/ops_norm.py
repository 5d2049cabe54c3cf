"""Op rules for normalisation: BatchNorm (train and eval), LayerNorm, GroupNorm, InstanceNorm,
RMSNorm, ``F.normalize``; and recognising a hand-written normaliser's statistic.

A normalisation divides the signal, and so the gradient, by the input's
standard deviation. In a hand-written ``x * rsqrt(mean(x**2) + eps)`` the path
through the statistic only removes the radial part of the gradient, so the
arithmetic rules ask :func:`is_norm_statistic` before they count that path.
"""

from __future__ import annotations

import math

import torch

from gradscope.estimate.ops_base import Ctx, pass_forward, rule
from gradscope.estimate.statistics import EPS, Mom, var_of, weight_stats
from gradscope.tracing.graph import node_record


def _norm_affine(ctx: Ctx) -> tuple[Mom, Mom]:
    gamma = ctx.param_by_suffix("weight")
    beta = ctx.param_by_suffix("bias")
    return weight_stats(gamma, (1.0, 1.0)), weight_stats(beta, (0.0, 0.0))


def _bn_training(ctx: Ctx) -> bool:
    if ctx.module is not None:
        running = getattr(ctx.module, "running_var", None)
        return bool(ctx.module.training or running is None)
    op = ctx.data.op
    if op in ("_native_batch_norm_legit_no_training", "_batch_norm_no_update"):
        return False
    flag = ctx.arg(5, "training")
    return flag if isinstance(flag, bool) else True


def _bn_eval(ctx: Ctx, xm: Mom, eps: float) -> tuple[float, Mom]:
    """BatchNorm with running statistics: a fixed per-channel affine map.

    Averaged per channel, not with channel-averaged statistics: 1/mean(rv) is
    far from mean(1/rv) when running variances differ between channels.
    """
    rv = ctx.param_by_suffix("running_var")
    rm = ctx.param_by_suffix("running_mean")
    gamma = ctx.param_by_suffix("weight")
    beta = ctx.param_by_suffix("bias")
    known = [t for t in (rv, rm, gamma, beta) if t is not None]
    if rv is None or any(t.is_meta for t in known):
        (_, g2), (bm, b2) = _norm_affine(ctx)
        ratio = g2 / (1.0 + eps)
        return ratio, (bm, ratio * xm[1] + b2)
    with torch.no_grad():
        var_c = rv.detach().double() + eps
        mean_c = rm.detach().double() if rm is not None else torch.zeros_like(var_c)
        g = gamma.detach().double() if gamma is not None else torch.ones_like(var_c)
        b = beta.detach().double() if beta is not None else torch.zeros_like(var_c)
        scale2 = g * g / var_c
        shift = g * (xm[0] - mean_c) / var_c.sqrt() + b
        q_out = float((shift * shift + scale2 * var_of(xm)).mean())
        return float(scale2.mean()), (float(shift.mean()), q_out)


@rule("batch_norm", "layer_norm", "group_norm", "instance_norm")
class _Norm:
    """Normalisation divides the signal, and so the gradient, by the input's std."""

    @staticmethod
    def _gain(ctx: Ctx) -> tuple[float, Mom] | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        (_, g2), (bm, b2) = _norm_affine(ctx)
        eps = 1e-5
        if ctx.data.key == "batch_norm" and not _bn_training(ctx):
            return _bn_eval(ctx, xm, eps)
        var = var_of(xm)
        if ctx.data.key == "batch_norm":
            # BatchNorm normalises each channel by its own variance: the spread of
            # channel means is removed first, and does not divide the gradient.
            var = max(var - ctx.est.spread.get(ctx.first() or "", 0.0), 0.0)
        return g2 / (var + eps), (bm, g2 + b2)

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        got = _Norm._gain(ctx)
        return got[1] if got else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        got = _Norm._gain(ctx)
        first = ctx.first()
        return {first: got[0] if got else 1.0} if first else {}


@rule("rms_norm")
class _RMSNorm:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        (gm, g2), _ = _norm_affine(ctx)
        return gm * xm[0] / math.sqrt(xm[1] + EPS), g2

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = pass_forward(ctx)
        (_, g2), _ = _norm_affine(ctx)
        first = ctx.first()
        return {first: g2 / (xm[1] + 1e-6) if xm else 1.0} if first else {}



@rule("l2_normalize")
class _L2Normalize:
    @staticmethod
    def _size(ctx: Ctx) -> int:
        first = ctx.first()
        shape = ctx.shape(first) if first else None
        dim = ctx.arg(2, "dim", 1)
        if not shape or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
            return 1
        return int(shape[dim])

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        return 0.0, 1.0 / _L2Normalize._size(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = pass_forward(ctx)
        first = ctx.first()
        n = _L2Normalize._size(ctx)
        return {first: 1.0 / (n * max(xm[1], EPS)) if xm else 1.0} if first else {}


_STAT_PASS = frozenset({"add", "view", "clamp", "sqrt", "rsqrt", "reciprocal", "pow"})


def is_norm_statistic(ctx: Ctx, ref: str, depth: int = 5) -> bool:
    """Whether ``ref`` is a normaliser's statistic: mean of squares (+eps, sqrt ...).

    In a hand-written RMSNorm/LayerNorm, ``x * rsqrt(mean(x**2) + eps)``, the
    gradient through the statistic only removes the radial component of the
    direct path's gradient (it is anti-correlated with it); adding its squared
    norm as an independent path would overestimate the gradient at ``x``.
    """
    graph = ctx.est.graph
    node = ref
    for _ in range(depth):
        data = node_record(graph, node)
        if data.key in ("mean", "sum") or data.op in ("var", "std", "var_mean"):
            preds = [p for p in data.inputs if node_record(graph, p).role != "param"]
            if data.op in ("var", "std", "var_mean"):
                return True
            return any(node_record(graph, p).key in ("pow", "square") or
                       (node_record(graph, p).key == "mul" and len(set(
                           node_record(graph, p).inputs)) == 1) for p in preds)
        if data.key not in _STAT_PASS and data.op not in ("var", "std"):
            return False
        preds = [p for p in data.inputs if node_record(graph, p).is_float]
        if not preds:
            return False
        node = preds[0]
    return False
