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

from gradscope.estimate.activations import activation_moments
from gradscope.estimate.ops_activation import ActivationRule, _activation_params
from gradscope.estimate.ops_base import BACKWARD, Backward, Ctx, pass_backward, pass_forward, rule
from gradscope.estimate.statistics import EPS, Mom, numel, var_of, weight_stats
from gradscope.tracing.graph import node_record
from gradscope.tracing.ops import AVERAGING_KEYS


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


def _bn_samples(ctx: Ctx) -> tuple[int, int] | None:
    """(N, M): the batch size and the values one channel's batch statistics are taken over."""
    first = ctx.first()
    shape = ctx.shape(first) if first else None
    if not shape or len(shape) < 2 or not shape[1] or not shape[0]:
        return None
    return int(shape[0]), math.prod(int(d) for d in shape) // int(shape[1])


def _bn_batch_factor(ctx: Ctx) -> float:
    """Expected train-mode BatchNorm S-gain over ``gamma^2 / sigma^2``, from its batch statistics.

    Per channel, ``grad_x = gamma / s * P g`` with s^2 the *batch* variance of the
    channel's M values and P the projection ``g - mean_B(g) - xhat mean_B(g xhat)``.

    Batch variance: for Gaussian inputs s^2 = sigma^2 chi2_{M-1} / M (biased), so
    E[1/s^2] = M / ((M - 3) sigma^2), as E[1/chi2_k] = 1/(k - 2); the direction
    xhat is independent of s. At M = 3 the expectation diverges (chi2 with two
    degrees of freedom) and the projection alone is kept.

    Projection: it takes out ||g||^2 times the share of g in the batch mean, plus
    1/M for the component along xhat. For a gradient uncorrelated over the M
    values the batch mean holds 1/M of it, and the factor is
    (M - 2) / (M - 3): 1.2 at M = 8 (two images of 2x2 maps). The part of g that
    is uniform over each sample's positions (after a global average pool), share
    c, has 1/N of it in the batch mean instead, and of its projection on xhat
    (:func:`_coherent_share` gives c and the share r of P's reach in it):
    1 - r/N - (1 - c)/M - 1/M is kept, about half of the uniform part at N = 2.
    M = 2 keeps nothing (each output is +-1).
    """
    sizes = _bn_samples(ctx)
    if sizes is None:
        return 1.0
    n, m = sizes
    if m <= 2:
        return 0.0
    uniform, removable = _coherent_share(ctx) if m > n else (0.0, 0.0)
    kept = max(1.0 - removable / max(n, 1) - (1.0 - uniform) / m - 1.0 / m, 0.0)
    return kept * (m / (m - 3) if m > 3 else 1.0)


#: Ops through which a gradient uniform over each sample's positions stays uniform, and
#: how much of that uniform part an op passes back (see :func:`_coherent_gain`).
_COHERENT_LINEAR = frozenset({"add", "sub", "rsub", "neg", "dropout", "contiguous", "clone"})


def _backward_rule(key: str) -> Backward:
    """A node's backward rule, as ``catalogue.backward_rule`` gives it (the catalogue imports
    this module, so it cannot be imported here)."""
    found = BACKWARD.get(key)
    if found is not None:
        return found
    return ActivationRule.backward if key.startswith("activation:") else pass_backward


def _global_average(ctx: Ctx, src: str) -> bool:
    """Whether the node averages ``src`` over all its positions (global average pooling)."""
    if ctx.data.key not in AVERAGING_KEYS:
        return False
    shape_in, shape_out = ctx.shape(src), ctx.shape()
    if not shape_in or len(shape_in) < 3 or shape_out is None:
        return False
    n_in, n_out = numel(shape_in), numel(shape_out)
    return bool(n_in and n_out and n_in // n_out == math.prod(int(d) for d in shape_in[2:]))


def _slopes(ctx: Ctx, src: str) -> tuple[float, float] | None:
    """(E[f'(z)], E[f'(z) (z - m) / sd]) of an activation node, for its input's moments.

    Differentiating the Gaussian expectation in its mean gives E[f'] = dE[f]/dm
    and, by Stein's lemma, E[f'(z)(z - m)] = var E[f''] = var d^2E[f]/dm^2,
    from the same activation moments the forward rule uses.
    """
    name = ctx.data.key.split(":", 1)[1]
    zm = ctx.est.moments.get(src)
    if zm is None or var_of(zm) <= EPS:
        return None
    var = var_of(zm)
    sd = math.sqrt(var)
    step = 1e-2 * sd
    try:
        params = _activation_params(ctx, name)
        hi, mid, lo = (activation_moments(name, zm[0] + d, var, **params).mean
                       for d in (step, 0.0, -step))
    except (ValueError, TypeError):
        return None
    return (hi - lo) / (2 * step), sd * (hi - 2 * mid + lo) / (step * step)


def _coherent_gain(ctx: Ctx, src: str, gain: float) -> float:
    """How much of the uniform part of the gradient at the node reaches ``src``.

    Linear routing (add, dropout...): the whole S-gain. An activation multiplies
    the gradient by f'(z): the uniform part u becomes E[f'] u plus a part that
    varies with z, so E[f']^2 of it stays uniform (against E[f'^2], the S-gain).
    A product with a factor broadcast over the positions (squeeze-excitation)
    keeps it uniform. Any other op: none is counted.
    """
    key = ctx.data.key
    if key in _COHERENT_LINEAR:
        return gain
    if key.startswith("activation:"):
        slopes = _slopes(ctx, src)
        return min(slopes[0] ** 2, gain) if slopes is not None else 0.0
    if key == "mul":
        others = [r for r in ctx.activations_in() if r != src]
        shape = ctx.shape(others[0]) if len(others) == 1 else None
        if shape is not None and len(shape) >= 3 and math.prod(int(d) for d in shape[2:]) == 1:
            return gain
    return 0.0


def _coherent_sq(ctx: Ctx, node: str, depth: int, skip_activations: bool = False) -> float:
    """The part of S at ``node`` uniform over each (sample, channel)'s positions.

    It comes from a global average pool downstream (which sends back the same
    value to every position), through ops that keep it uniform.
    """
    sq = ctx.est.backward_sq
    total = 0.0
    for succ in ctx.est.graph.successors(node):
        s_succ = sq.get(succ, 0.0)
        data = node_record(ctx.est.graph, succ)
        if s_succ <= 0.0 or data.role != "compute" or \
                (skip_activations and data.key.startswith("activation:")):
            continue
        succ_ctx = Ctx(ctx.est, succ)
        try:
            gain = _backward_rule(data.key)(succ_ctx).get(node, 0.0)
        except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
            continue
        if _global_average(succ_ctx, node):
            total += s_succ * gain
        elif depth > 0:
            share = _coherent_gain(succ_ctx, node, gain)
            if share > 0.0:
                total += share * _coherent_sq(succ_ctx, succ, depth - 1)
    return total


def _coherent_share(ctx: Ctx) -> tuple[float, float]:
    """Shares of S at a BatchNorm's output in its uniform part, and in what P can take of it.

    The first is the part uniform over each sample's positions
    (:func:`_coherent_sq`). P removes the batch mean and the component along
    xhat; when an activation reads the BatchNorm's output directly, its
    derivative is correlated with xhat (ReLU passes the gradient where xhat > 0),
    so of the uniform part u f'(y) the projection can take E[f']^2 (the mean)
    and E[f' yhat]^2 (along xhat) against E[f'^2]: the second share.
    """
    total = ctx.est.backward_sq.get(ctx.name, 0.0)
    if total <= 0.0:
        return 0.0, 0.0
    uniform = removable = 0.0
    for succ in ctx.est.graph.successors(ctx.name):
        data = node_record(ctx.est.graph, succ)
        succ_ctx = Ctx(ctx.est, succ)
        if not data.key.startswith("activation:") or succ_ctx.first() != ctx.name:
            continue
        slopes = _slopes(succ_ctx, ctx.name)
        try:
            gain = _backward_rule(data.key)(succ_ctx).get(ctx.name, 0.0)
        except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
            continue
        if slopes is None or gain <= 0.0:
            continue
        part = _coherent_sq(succ_ctx, succ, depth=5)
        uniform += part * min(slopes[0] ** 2, gain)
        removable += part * min(slopes[0] ** 2 + slopes[1] ** 2, gain)
    rest = _coherent_sq(ctx, ctx.name, depth=6, skip_activations=True)
    return min((uniform + rest) / total, 1.0), min((removable + rest) / total, 1.0)


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
        if not first:
            return {}
        gain = got[0] if got else 1.0
        if got and ctx.data.key == "batch_norm" and _bn_training(ctx):
            gain *= _bn_batch_factor(ctx)
        return {first: gain}


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
