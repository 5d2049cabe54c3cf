"""Op rules for arithmetic: add/sub, mul, div, matmul, powers and roots, exp, log, clamp, where.

Sums add variances (independent branches, as in ``x + f(x)``) and pass each
input the full gradient; products scale each factor's gradient by the other
factor's second moment; the smooth elementwise functions use the delta method
or exact Gaussian moments where they exist.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope.estimate.activations import activation_moments
from gradscope.estimate.ops_base import Ctx, pass_backward, pass_forward, rule
from gradscope.estimate.ops_norm import is_norm_statistic
from gradscope.estimate.statistics import EPS, Mom, var_of
from gradscope.tracing.graph import Ref


def _binary(ctx: Ctx) -> tuple[Any, Any]:
    return ctx.arg(0, "input"), ctx.arg(1, "other")


@rule("add", "sub", "rsub")
class _Add:
    """Variances add (independent branches, as in x + f(x)); each input gets the full gradient."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        a, b = _binary(ctx)
        ma, mb = ctx.mom(a), ctx.mom(b)
        alpha = ctx.kwargs.get("alpha", 1.0)
        alpha = float(alpha) if isinstance(alpha, (int, float)) else 1.0
        sign = -1.0 if ctx.data.key in ("sub", "rsub") else 1.0
        if ma is None and mb is None:
            return None
        ma = ma or (0.0, 0.0)
        mb = mb or (0.0, 0.0)
        mean = ma[0] + sign * alpha * mb[0]
        var = var_of(ma) + alpha * alpha * var_of(mb)
        return mean, var + mean * mean

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b = _binary(ctx)
        alpha = ctx.kwargs.get("alpha", 1.0)
        alpha = float(alpha) if isinstance(alpha, (int, float)) else 1.0
        gains: dict[str, float] = {}
        for ref, g in ((a, 1.0), (b, alpha * alpha)):
            if isinstance(ref, Ref) and ref.name in ctx.activations_in():
                gains[ref.name] = gains.get(ref.name, 0.0) + g
        return gains


@rule("mul")
class _Mul:
    """Gates: each factor's gradient is scaled by the other factor's second moment."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        ma, mb = (ctx.mom(v) for v in _binary(ctx))
        if ma is None or mb is None:
            return None
        return ma[0] * mb[0], ma[1] * mb[1]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b = _binary(ctx)
        ma, mb = ctx.mom(a), ctx.mom(b)
        gains: dict[str, float] = {}
        for ref, other in ((a, mb), (b, ma)):
            if isinstance(ref, Ref) and ref.name in ctx.activations_in():
                gains[ref.name] = gains.get(ref.name, 0.0) + (other[1] if other else 1.0)
        return gains


@rule("div")
class _Div:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        ma, mb = (ctx.mom(v) for v in _binary(ctx))
        if ma is None or mb is None or mb[1] <= 0:
            return ma
        return ma[0] / (mb[0] if abs(mb[0]) > EPS else math.sqrt(mb[1])), ma[1] / mb[1]

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b = _binary(ctx)
        ma, mb = ctx.mom(a), ctx.mom(b)
        gains: dict[str, float] = {}
        if mb is None or mb[1] <= 0:
            return pass_backward(ctx)
        if isinstance(a, Ref) and a.name in ctx.activations_in():
            gains[a.name] = 1.0 / mb[1]
        if isinstance(b, Ref) and b.name in ctx.activations_in() and ma is not None \
                and not is_norm_statistic(ctx, b.name):
            gains[b.name] = gains.get(b.name, 0.0) + ma[1] / (mb[1] * mb[1])
        return gains



@rule("matmul")
class _Matmul:
    @staticmethod
    def _parts(ctx: Ctx) -> tuple[str | None, str | None, Mom | None, Mom | None, int]:
        refs = [r for r in ctx.tensor_refs()]
        a = refs[0] if refs else None
        b = refs[1] if len(refs) > 1 else None
        if ctx.data.op == "baddbmm":
            a, b = (refs[1] if len(refs) > 1 else None), (refs[2] if len(refs) > 2 else None)
        ma = ctx.est.moments.get(a) if a else None
        mb = ctx.est.moments.get(b) if b else None
        shape = ctx.shape(a) if a else None
        k = int(shape[-1]) if shape else 1
        return a, b, ma, mb, k

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        _, _, ma, mb, k = _Matmul._parts(ctx)
        if ma is None or mb is None:
            return ma
        mean = k * ma[0] * mb[0]
        var = k * max(ma[1] * mb[1] - (ma[0] * mb[0]) ** 2, 0.0)
        return mean, var + mean * mean

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        a, b, ma, mb, k = _Matmul._parts(ctx)
        gains: dict[str, float] = {}
        if a and mb is not None:
            gains[a] = k * mb[1]
        if b and ma is not None:
            gains[b] = gains.get(b, 0.0) + k * ma[1]
        return gains


def _power(ctx: Ctx) -> float:
    key = ctx.data.key
    if key == "square":
        return 2.0
    if key == "sqrt":
        return 0.5
    if key == "rsqrt":
        return -0.5
    if key == "reciprocal":
        return -1.0
    exponent = ctx.arg(1, "exponent", 2.0)
    return float(exponent) if isinstance(exponent, (int, float)) else 2.0



@rule("pow", "square", "sqrt", "rsqrt", "reciprocal")
class _Pow:
    """x**e by the delta method around |x| = sqrt(q); exact second moment for e = 2."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        e = _power(ctx)
        if e == 2.0:
            m, v = xm[0], var_of(xm)
            return xm[1], m ** 4 + 6 * m * m * v + 3 * v * v
        q = max(xm[1], EPS)
        return (q ** (e / 2.0)) * (1.0 if xm[0] >= 0 else -1.0), q ** e

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = pass_forward(ctx)
        first = ctx.first()
        if first is None or xm is None:
            return pass_backward(ctx)
        e = _power(ctx)
        if e < 0 and is_norm_statistic(ctx, first):
            return {first: 0.0}
        return {first: e * e * max(xm[1], EPS) ** (e - 1.0)}


@rule("exp")
class _Exp:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        m, v = xm[0], var_of(xm)
        return math.exp(min(m + v / 2, 700.0)), math.exp(min(2 * m + 2 * v, 700.0))

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        out = _Exp.forward(ctx)
        first = ctx.first()
        return {first: out[1] if out else 1.0} if first else {}


@rule("log")
class _Log:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        xm = pass_forward(ctx)
        if xm is None:
            return None
        mid = math.log(max(math.sqrt(xm[1]), EPS))
        return mid, mid * mid

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        xm = pass_forward(ctx)
        first = ctx.first()
        return {first: 1.0 / max(xm[1], EPS) if xm else 1.0} if first else {}


@rule("clamp")
class _Clamp:
    @staticmethod
    def _moments(ctx: Ctx) -> Any:
        xm = pass_forward(ctx)
        lo = ctx.arg(1, "min")
        hi = ctx.arg(2, "max")
        if ctx.data.op == "clamp_max":
            lo, hi = None, ctx.arg(1, "max")
        if xm is None:
            return None
        lo = float(lo) if isinstance(lo, (int, float)) else None
        hi = float(hi) if isinstance(hi, (int, float)) else None
        if lo is not None and hi is not None:
            return activation_moments("hardtanh", xm[0], var_of(xm), min_val=lo, max_val=hi)
        if lo is not None:
            mom = activation_moments("relu", xm[0] - lo, var_of(xm))
            return type(mom)(mom.mean + lo, mom.second + 2 * lo * mom.mean + lo * lo,
                             mom.grad_second)
        if hi is not None:
            mom = activation_moments("relu", hi - xm[0], var_of(xm))
            return type(mom)(hi - mom.mean, hi * hi - 2 * hi * mom.mean + mom.second,
                             mom.grad_second)
        return None

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        mom = _Clamp._moments(ctx)
        return (mom.mean, mom.second) if mom is not None else pass_forward(ctx)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        mom = _Clamp._moments(ctx)
        first = ctx.first()
        return {first: mom.grad_second if mom is not None else 1.0} if first else {}


@rule("where")
class _Where:
    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        moms = [ctx.mom(ctx.arg(i)) for i in (1, 2)]
        known = [m for m in moms if m is not None]
        if not known:
            return None
        return sum(m[0] for m in known) / len(known), sum(m[1] for m in known) / len(known)

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        return {r: 0.5 for r in ctx.activations_in()}

