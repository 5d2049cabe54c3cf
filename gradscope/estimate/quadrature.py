"""Gaussian expectations of torch functions: E[phi(z)], E[phi(z)^2], E[phi'(z)^2] for
z ~ N(m, s^2), by closed form or quadrature, with phi and phi' as torch computes them.

This is the numerical machinery under ``gradscope.estimate.activations`` (which
knows the activations, their parameters and the cache); it knows only a bound
function (:class:`BoundActivation`: phi, its kinks, its transition scale).

Why torch's own functions rather than textbook formulas: the estimate has to match what the
traced model actually computes (GELU's tanh form, hardswish's breakpoints, softplus's linear
switch-over at ``threshold``, SELU's constants, the derivative torch uses at a kink), so every
integrand is evaluated with ``torch.nn.functional`` in float64 and differentiated with
``torch.autograd``. Closed forms are used only where they are exact and cheaper (identity,
ReLU, leaky ReLU / PReLU, hardtanh / ReLU6, hardsigmoid); the tests check them against the
quadrature.

Why two quadrature rules: Gauss-Hermite is fast and spectrally accurate when the integrand is
smooth on the scale of the Gaussian, which covers the common case (smooth activation,
``var <= 1``). It converges slowly across a kink (ReLU-like functions) and fails outright when
the Gaussian is much wider than the activation's own transition region (``tanh`` at
``var = 1e6`` looks like a step to 96 nodes). Those cases use composite Gauss-Legendre in the
standardised variable, split at every kink and on a geometric grid around the activation's
transition region, so that each piece is smooth on its own length scale.

Why it is fast enough: closed forms skip torch, and single-op activations call their autograd
backward node directly (verified against the engine), which leaves a torch forward and backward
of ~100-300 nodes per new (mean, var); :func:`moments_array` does one torch call for many
(mean, var) pairs at once.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]
TorchFn = Callable[[torch.Tensor], torch.Tensor]

@dataclass(frozen=True)
class Moments:
    """Moments of ``phi(z)`` for ``z ~ N(mean, var)``.

    ``second`` is a second moment, not a variance: with zero-mean weights the next layer's
    pre-activation variance is ``sigma_w^2 * second``, whatever ``mean`` is.
    """

    mean: float  # E[phi(z)]
    second: float  # E[phi(z)^2]
    grad_second: float  # E[phi'(z)^2]

    @property
    def variance(self) -> float:
        """Var[phi(z)], clipped at 0 because rounding can push it a hair below."""
        return max(self.second - self.mean * self.mean, 0.0)


# --------------------------------------------------------------------------------------------
# Numerical constants
# --------------------------------------------------------------------------------------------

# Half-width, in standard deviations, of the region integrated by the composite rule. The mass
# beyond 10 sigma is 1.5e-23, far below float64 resolution of any moment.
_U = 10.0
# Gauss-Hermite is used only when the Gaussian is at most this wide relative to the activation's
# transition scale. Measured at sigma = scale with 96 nodes: <= 1.3e-15 relative for every
# smooth activation here (tanh and tanhshrink get scale 0.5: their poles sit at i*pi/2), while
# tanh at sigma = 1 would already be off by 1e-9.
_GH_MAX_SIGMA = 1.0
_GH_NODES = 96
_LEG_NODES = 16


def _gauss_hermite() -> tuple[FloatArray, FloatArray]:
    t, w = np.polynomial.hermite.hermgauss(_GH_NODES)
    # Probabilists' form: E[f(u)] for u ~ N(0, 1) is sum(w_i f(u_i)).
    return np.sqrt(2.0) * t, w / np.sqrt(np.pi)


def _gauss_legendre() -> tuple[FloatArray, FloatArray]:
    x, w = np.polynomial.legendre.leggauss(_LEG_NODES)
    return x, w


_GH_U, _GH_W = _gauss_hermite()
_LEG_X, _LEG_W = _gauss_legendre()
_LEG_W_NORM = _LEG_W / math.sqrt(2.0 * math.pi)  # Legendre weights times the N(0,1) constant
# Coarse standardised grid: pieces of two sigma keep the Gaussian factor resolved to ~1e-15.
_GAUSS_GRID = np.arange(-_U, _U + 1.0, 2.0)
_GAUSS_GRID_LIST = tuple(_GAUSS_GRID.tolist())
# Geometric grid (times the activation's scale) around its transition region. A ratio of 2
# keeps exponentially decaying tails such as tanh'(z)^2 ~ 16 exp(-4z) resolved; beyond
# 2**40 every supported activation is linear or constant to float64 precision.
_GEO = 2.0 ** np.arange(-2.0, 41.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# Closed forms (exact, for the piecewise-linear activations)
# --------------------------------------------------------------------------------------------


def _cdf(x: float) -> float:
    # erfc keeps full relative precision in the lower tail, where 1 + erf(x) would cancel.
    return 0.5 * math.erfc(-x / _SQRT2)


def _pdf(x: float) -> float:
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x) if abs(x) < 40.0 else 0.0


def _mass(a: float, b: float) -> float:
    """P(a < u < b) for a standard normal, in the form that does not cancel."""
    if a >= 0.0:
        return 0.5 * (math.erfc(a / _SQRT2) - math.erfc(b / _SQRT2))
    if b <= 0.0:
        return 0.5 * (math.erfc(-b / _SQRT2) - math.erfc(-a / _SQRT2))
    return 0.5 * (math.erf(b / _SQRT2) - math.erf(a / _SQRT2))


def _interval_moments(lo: float, hi: float, m: float, s: float) -> tuple[float, float, float]:
    """(P, E[z; lo<z<hi], E[z^2; lo<z<hi]) for z ~ N(m, s^2).

    Why not always the textbook formula: when the interval is narrow against s (hardtanh at
    var = 1e6) its terms are ~v * P and cancel to the last digits, so a 16-point Gauss-Legendre
    rule is used there instead; on an interval at most two sigma wide it is exact to rounding and
    every integrand is positive.
    """
    a, b = (lo - m) / s, (hi - m) / s
    if b - a <= 2.0:
        half, mid = 0.5 * (b - a), 0.5 * (a + b)
        u = mid + half * _LEG_X
        w = half * _LEG_W * np.exp(-0.5 * u * u) * _INV_SQRT_2PI
        z = m + s * u
        wz = w * z
        return float(w.sum()), float(wz.sum()), float(wz @ z)
    p_mid = _mass(a, b)
    da, db = _pdf(a), _pdf(b)
    v = s * s
    mid1 = m * p_mid + s * (da - db)
    mid2 = (m * m + v) * p_mid + 2.0 * m * s * (da - db) + v * (a * da - b * db)
    return p_mid, mid1, max(mid2, 0.0)


def leaky_closed(slope: float, m: float, s: float) -> Moments:
    alpha = m / s
    p_pos, p_neg, d = _cdf(alpha), _cdf(-alpha), _pdf(alpha)
    second_raw = m * m + s * s
    pos1 = m * p_pos + s * d
    pos2 = second_raw * p_pos + m * s * d
    neg1 = m * p_neg - s * d
    neg2 = second_raw * p_neg - m * s * d
    return Moments(
        mean=pos1 + slope * neg1,
        second=max(pos2, 0.0) + slope * slope * max(neg2, 0.0),
        grad_second=p_pos + slope * slope * p_neg,
    )


def hardtanh_closed(lo: float, hi: float, m: float, s: float) -> Moments:
    p_lo, p_hi = _cdf((lo - m) / s), _cdf((m - hi) / s)
    p_mid, mid1, mid2 = _interval_moments(lo, hi, m, s)
    return Moments(
        mean=lo * p_lo + hi * p_hi + mid1,
        second=lo * lo * p_lo + hi * hi * p_hi + mid2,
        grad_second=p_mid,
    )


def hardsigmoid_closed(m: float, s: float) -> Moments:
    # torch: hardsigmoid(x) = relu6(x + 3) / 6 = clamp(y, 0, 1) with y = (x + 3) / 6. Working in
    # y rather than rescaling hardtanh(x, -3, 3) avoids cancelling against the +3 offset.
    y = hardtanh_closed(0.0, 1.0, (m + 3.0) / 6.0, s / 6.0)
    return Moments(mean=y.mean, second=y.second, grad_second=y.grad_second / 36.0)


# --------------------------------------------------------------------------------------------
# A bound activation
# --------------------------------------------------------------------------------------------

ClosedForm = Callable[[float, float], Moments]


@dataclass(frozen=True)
class BoundActivation:
    """An activation with its parameters bound, plus what the integrator must know about it.

    ``kinks`` are points where phi or phi' is not smooth: the integral is split there.
    ``scale`` is the width of the transition region of a smooth activation (None when phi is
    polynomial between kinks, so the Gaussian alone sets the resolution).
    """

    name: str
    fn: TorchFn
    kinks: tuple[float, ...]
    scale: float | None
    closed: ClosedForm | None = None
    direct: bool = False  # backward node verified callable, see phi_and_grad
    kink_array: FloatArray = field(init=False, repr=False, compare=False)
    geo_points: tuple[float, ...] = field(init=False, repr=False, compare=False)
    geo_array: FloatArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        geo = (
            np.empty(0) if self.scale is None else self.scale * np.concatenate((-_GEO[::-1], _GEO))
        )
        object.__setattr__(self, "kink_array", np.asarray(self.kinks, dtype=np.float64))
        object.__setattr__(self, "geo_array", geo)
        object.__setattr__(self, "geo_points", tuple(geo.tolist()))


# --------------------------------------------------------------------------------------------
# Quadrature
# --------------------------------------------------------------------------------------------


def _is_degenerate(m: float, s: float) -> bool:
    # Also true when the spread is below one ulp of the mean: the nodes would all collapse onto
    # m anyway, and onto a kink if m is one.
    return s == 0.0 or (m + _U * s == m and m - _U * s == m)


def _degenerate_rule(act: BoundActivation, m: float) -> tuple[FloatArray, FloatArray]:
    if m in act.kinks:
        # On a kink, use the limit var -> 0+: half the mass on each side. Torch's own value at
        # the kink (relu'(0) = 0) would make the moments jump as var reaches 0.
        return np.array([np.nextafter(m, -np.inf), np.nextafter(m, np.inf)]), np.array([0.5, 0.5])
    return np.array([m]), np.array([1.0])


def _pieces_to_rule(
    m: float | FloatArray, s: float | FloatArray, breaks: FloatArray
) -> tuple[FloatArray, FloatArray]:
    # breaks: (..., P) sorted standardised breakpoints -> (..., 16 (P - 1)) nodes in z, weights.
    half = 0.5 * (breaks[..., 1:] - breaks[..., :-1])
    mid = breaks[..., :-1] + half
    lead = breaks.shape[:-1]
    u = (mid[..., None] + half[..., None] * _LEG_X).reshape(*lead, -1)
    w = (half[..., None] * _LEG_W_NORM).reshape(*lead, -1) * np.exp(-0.5 * u * u)
    return m + s * u, w


def _composite_rule(act: BoundActivation, m: float, s: float) -> tuple[FloatArray, FloatArray]:
    """Composite Gauss-Legendre rule for one (m, s).

    Breakpoints, in standard deviations: a 2-sigma grid over +-10 sigma, every kink, and a
    geometric grid (ratio 2) around the activation's transition region, so that each piece is
    smooth on its own length scale whether the Gaussian is much narrower or much wider than
    the activation's features.
    """
    lo, hi = m - _U * s, m + _U * s
    breaks = list(_GAUSS_GRID_LIST)
    breaks.extend((k - m) / s for k in act.kinks if lo < k < hi)
    if act.geo_points:
        geo = act.geo_points  # ascending
        inside = geo[bisect.bisect_right(geo, lo) : bisect.bisect_left(geo, hi)]
        breaks.extend([(p - m) / s for p in inside])
    breaks.sort()
    z, w = _pieces_to_rule(m, s, np.array(breaks))
    return z, w


def _composite_rules(
    act: BoundActivation, m: FloatArray, s: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Row-wise :func:`_composite_rule` with rows of equal length, for one batched torch call.

    Breakpoints a row does not need are parked at +10 sigma, where they only add empty pieces.
    """
    mc, sc = m[:, None], s[:, None]
    parts = [np.broadcast_to(_GAUSS_GRID, (m.shape[0], _GAUSS_GRID.shape[0]))]
    for points in (act.kink_array, act.geo_array):
        if points.shape[0]:
            u = (points - mc) / sc
            inside = np.abs(u) < _U
            keep = inside.any(axis=0)
            parts.append(np.where(inside[:, keep], u[:, keep], _U))
    breaks = np.sort(np.concatenate(parts, axis=1), axis=1)
    return _pieces_to_rule(mc, sc, breaks)


def _use_hermite(act: BoundActivation, m: float, s: float) -> bool:
    # Gauss-Hermite only when nothing non-smooth lies within the Gaussian's reach and the
    # Gaussian is no wider than the activation's transition region.
    if act.scale is not None and s > _GH_MAX_SIGMA * act.scale:
        return False
    return not any(abs(k - m) < _U * s for k in act.kinks)


def _rule(
    act: BoundActivation, m: float, s: float, *, force_composite: bool = False
) -> tuple[FloatArray, FloatArray]:
    """Nodes in z and weights (summing to ~1) for E[f(z)], z ~ N(m, s^2)."""
    if _is_degenerate(m, s):
        return _degenerate_rule(act, m)
    if not force_composite and _use_hermite(act, m, s):
        return m + s * _GH_U, _GH_W
    return _composite_rule(act, m, s)


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    # The estimator may well be called under torch.no_grad() or inference_mode(); the
    # derivative still has to come from autograd.
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _call_node(node: Any, grad_output: torch.Tensor) -> Any:
    # Node.__call__ exists at runtime (it runs the node's backward) but is not in torch's stubs.
    return node(grad_output)


def phi_and_grad(act: BoundActivation, z: FloatArray) -> tuple[FloatArray, FloatArray]:
    """phi(z) and phi'(z) from torch, so the derivative at kinks is the one backprop uses.

    Why call the backward node directly when :attr:`BoundActivation.direct` is set: for a single-op
    activation ``y.grad_fn`` is exactly the function the autograd engine would run, and calling
    it skips ~70 us of engine set-up per call, most of the cost of a moment evaluation. It is
    only used where :func:`direct_backward_matches` has checked it bit-for-bit against
    ``torch.autograd.grad``.
    """
    with _autograd_on():
        x = torch.from_numpy(z).requires_grad_(True)
        y = act.fn(x)
        ones = torch.ones_like(y)
        if act.direct and y.grad_fn is not None:
            with torch.no_grad():
                out = _call_node(y.grad_fn, ones)
            grad = out[0] if isinstance(out, tuple) else out
        else:
            # d(sum y)/dx: the same as grad_outputs=ones, without importing torch's
            # symbolic-shapes module (0.5 s, sympy) that a grad_outputs check pulls in.
            (grad,) = torch.autograd.grad(y.sum(), x)
    return y.detach().numpy(), grad.numpy()


# Quarter steps hit every default kink exactly (0, +-0.5, +-1, +-3, 6), where backward formulas
# are most likely to differ; the far points check the saturated tails.
_PROBE = np.concatenate((np.linspace(-7.0, 7.0, 57), [-30.0, 25.0]))


def direct_backward_matches(fn: TorchFn) -> bool:
    """Whether ``y.grad_fn(ones)`` gives exactly torch.autograd.grad's answer for ``fn``.

    True only for single-node graphs fed directly by the input (not, say, softsign, which
    torch builds from abs/add/div), and only if the results agree bit for bit; anything
    unexpected, including a torch version whose nodes are not callable, falls back to the
    engine.
    """
    try:
        with _autograd_on():
            x = torch.from_numpy(_PROBE.copy()).requires_grad_(True)
            y = fn(x)
            node = y.grad_fn
            if node is None:
                return False
            feeds = [f for f, _ in node.next_functions if f is not None]
            if len(feeds) != 1 or getattr(feeds[0], "variable", None) is not x:
                return False
            ones = torch.ones_like(y)
            (expected,) = torch.autograd.grad(y.sum(), x, retain_graph=True)  # see above
            with torch.no_grad():
                out = _call_node(node, ones)
            got = out[0] if isinstance(out, tuple) else out
            return isinstance(got, torch.Tensor) and torch.equal(got, expected)
    except Exception:  # noqa: BLE001 - any failure means: use the documented autograd path
        return False


def _integrate(act: BoundActivation, z: FloatArray, w: FloatArray) -> Moments:
    phi, grad = phi_and_grad(act, z)
    wphi = w * phi
    return Moments(
        mean=float(wphi.sum()), second=float(wphi @ phi), grad_second=float((w * grad) @ grad)
    )


def compute_moments(act: BoundActivation, m: float, v: float, *,
                    force_composite: bool = False) -> Moments:
    """The moments for z ~ N(m, v): closed form where there is one, else quadrature."""
    s = math.sqrt(v)
    if act.closed is not None and not force_composite and not _is_degenerate(m, s):
        return act.closed(m, s)
    z, w = _rule(act, m, s, force_composite=force_composite)
    return _integrate(act, z, w)


def moments_array(act: BoundActivation, m: FloatArray, s: FloatArray) -> FloatArray:
    """E[phi], E[phi^2], E[phi'^2] (rows of a (3, n) array) for z ~ N(m_i, s_i^2), one torch
    call for all n; degenerate spreads take the var -> 0+ limit, as the scalar path does."""
    out = np.empty((3, m.shape[0]), dtype=np.float64)
    degenerate = (s == 0.0) | ((m + _U * s == m) & (m - _U * s == m))
    groups: list[tuple[IndexArray, FloatArray, FloatArray]] = []  # (rows, nodes, weights)

    if degenerate.any():
        rows = np.flatnonzero(degenerate)
        md = m[rows]
        on_kink = np.isin(md, act.kink_array)
        z = np.stack(
            [
                np.where(on_kink, np.nextafter(md, -np.inf), md),
                np.where(on_kink, np.nextafter(md, np.inf), md),
            ],
            axis=1,
        )
        w = np.stack([np.where(on_kink, 0.5, 1.0), np.where(on_kink, 0.5, 0.0)], axis=1)
        groups.append((rows, z, w))
    rest = ~degenerate
    if act.closed is not None:
        for i in np.flatnonzero(rest):
            closed = act.closed(float(m[i]), float(s[i]))
            out[:, i] = (closed.mean, closed.second, closed.grad_second)
    elif rest.any():
        near_kink = np.zeros_like(rest)
        for k in act.kinks:
            near_kink |= np.abs(k - m) < _U * s
        hermite = rest & ~near_kink
        if act.scale is not None:
            hermite &= s <= _GH_MAX_SIGMA * act.scale
        composite = rest & ~hermite
        if hermite.any():
            rows = np.flatnonzero(hermite)
            z = m[rows, None] + s[rows, None] * _GH_U
            groups.append((rows, z, np.broadcast_to(_GH_W, z.shape)))
        if composite.any():
            todo = np.flatnonzero(composite)
            # Rows sorted by their spread share breakpoints, which keeps the padded width low.
            todo = todo[np.lexsort((m[todo], s[todo]))]
            for chunk in np.array_split(todo, max(1, todo.shape[0] // 256)):
                z, w = _composite_rules(act, m[chunk], s[chunk])
                groups.append((chunk, z, w))

    if groups:
        phi, grad = phi_and_grad(act, np.concatenate([z.ravel() for _, z, _ in groups]))
        start = 0
        for rows, z, w in groups:
            size = z.size
            p = phi[start : start + size].reshape(z.shape)
            g = grad[start : start + size].reshape(z.shape)
            start += size
            wp = w * p
            out[0, rows] = wp.sum(axis=1)
            out[1, rows] = (wp * p).sum(axis=1)
            out[2, rows] = (w * g * g).sum(axis=1)
    return out
