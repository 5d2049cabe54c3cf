"""Gaussian moments of elementwise activations, the inputs of the mean-field recursion.

The estimator propagates a pre-activation ``z ~ N(mean, var)`` through each activation and
needs three numbers: ``E[phi(z)]`` and ``E[phi(z)^2]`` for the forward pass (the next layer's
second moment) and ``E[phi'(z)^2]`` for the backward gain ``chi``
(see ``SIGNAL_PROPAGATION.md``).

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

Why it is fast enough: results are cached, closed forms skip torch, and single-op activations
call their autograd backward node directly (verified against the engine), which leaves a torch
forward and backward of ~100-300 nodes per new (mean, var). For many (mean, var) pairs at once,
:func:`activation_moments_array` does one torch call for all of them.

Unknown names: :func:`canonical_activation` returns ``None``; :func:`activation_moments` raises
``ValueError``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from gradscope.tracing.ops import canonical_activation, is_activation

__all__ = [
    "KNOWN_ACTIVATIONS",
    "Moments",
    "activation_defaults",
    "activation_moments",
    "activation_moments_array",
    "canonical_activation",
    "is_activation",
    "params_from_call",
    "params_from_module",
]

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]
ParamValue = float | str
FrozenParams = tuple[tuple[str, ParamValue], ...]
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
# Clamp for the inputs. A variance of 1e200 is ~160 orders of magnitude past float32 overflow,
# so any network that produces it has already blown up; clamping keeps every intermediate
# (x**3 inside GELU's tanh form, phi**2) finite in float64, so no NaN can appear.
VAR_MAX = 1e200
MEAN_MAX = 1e100
# Gauss-Hermite is used only when the Gaussian is at most this wide relative to the activation's
# transition scale. Measured at sigma = scale with 96 nodes: <= 1.3e-15 relative for every
# smooth activation here (tanh and tanhshrink get scale 0.5: their poles sit at i*pi/2), while
# tanh at sigma = 1 would already be off by 1e-9.
_GH_MAX_SIGMA = 1.0
_GH_NODES = 96
_LEG_NODES = 16
# Rounding of (mean, var) for the cache key: 12 significant digits moves results by ~1e-12
# relative (up to ~1e-9 for values deep in a Gaussian tail, ~1e-100 in size), far below anything
# the estimator can resolve, and lets repeated layers share an entry.
_KEY_DIGITS = 12


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


def _leaky_closed(slope: float, m: float, s: float) -> Moments:
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


def _hardtanh_closed(lo: float, hi: float, m: float, s: float) -> Moments:
    p_lo, p_hi = _cdf((lo - m) / s), _cdf((m - hi) / s)
    p_mid, mid1, mid2 = _interval_moments(lo, hi, m, s)
    return Moments(
        mean=lo * p_lo + hi * p_hi + mid1,
        second=lo * lo * p_lo + hi * hi * p_hi + mid2,
        grad_second=p_mid,
    )


def _hardsigmoid_closed(m: float, s: float) -> Moments:
    # torch: hardsigmoid(x) = relu6(x + 3) / 6 = clamp(y, 0, 1) with y = (x + 3) / 6. Working in
    # y rather than rescaling hardtanh(x, -3, 3) avoids cancelling against the +3 offset.
    y = _hardtanh_closed(0.0, 1.0, (m + 3.0) / 6.0, s / 6.0)
    return Moments(mean=y.mean, second=y.second, grad_second=y.grad_second / 36.0)


# --------------------------------------------------------------------------------------------
# Activation registry
# --------------------------------------------------------------------------------------------

ClosedForm = Callable[[float, float], Moments]


@dataclass(frozen=True)
class _Activation:
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
    direct: bool = False  # backward node verified callable, see _phi_and_grad
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


@dataclass(frozen=True)
class _Spec:
    defaults: tuple[tuple[str, ParamValue], ...]
    bind: Callable[[Mapping[str, ParamValue]], _Activation]
    aliases: tuple[str, ...] = ()


def _f(p: Mapping[str, ParamValue], key: str) -> float:
    value = p[key]
    if isinstance(value, str):
        raise ValueError(f"parameter {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"parameter {key!r} must be finite, got {value!r}")
    return value


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _bind_identity(p: Mapping[str, ParamValue]) -> _Activation:
    def closed(m: float, s: float) -> Moments:
        return Moments(m, m * m + s * s, 1.0)

    return _Activation("identity", _identity, (), None, closed)


def _bind_relu(p: Mapping[str, ParamValue]) -> _Activation:
    return _Activation("relu", F.relu, (0.0,), None, functools.partial(_leaky_closed, 0.0))


def _bind_leaky(p: Mapping[str, ParamValue]) -> _Activation:
    slope = _f(p, "negative_slope")
    return _Activation(
        "leaky_relu",
        functools.partial(F.leaky_relu, negative_slope=slope),
        (0.0,),
        None,
        functools.partial(_leaky_closed, slope),
    )


def _bind_prelu(p: Mapping[str, ParamValue]) -> _Activation:
    slope = _f(p, "negative_slope")
    weight = torch.tensor([slope], dtype=torch.float64)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, weight)

    return _Activation("prelu", fn, (0.0,), None, functools.partial(_leaky_closed, slope))


def _bind_hardtanh(p: Mapping[str, ParamValue]) -> _Activation:
    lo, hi = _f(p, "min_val"), _f(p, "max_val")
    if lo > hi:
        raise ValueError(f"hardtanh needs min_val <= max_val, got {lo} > {hi}")
    return _Activation(
        "hardtanh",
        functools.partial(F.hardtanh, min_val=lo, max_val=hi),
        (lo, hi),
        None,
        functools.partial(_hardtanh_closed, lo, hi),
    )


def _bind_relu6(p: Mapping[str, ParamValue]) -> _Activation:
    closed = functools.partial(_hardtanh_closed, 0.0, 6.0)
    return _Activation("relu6", F.relu6, (0.0, 6.0), None, closed)


def _bind_hardsigmoid(p: Mapping[str, ParamValue]) -> _Activation:
    return _Activation("hardsigmoid", F.hardsigmoid, (-3.0, 3.0), None, _hardsigmoid_closed)


def _bind_hardswish(p: Mapping[str, ParamValue]) -> _Activation:
    return _Activation("hardswish", F.hardswish, (-3.0, 3.0), None)


def _bind_elu(p: Mapping[str, ParamValue]) -> _Activation:
    alpha, scale, input_scale = _f(p, "alpha"), _f(p, "scale"), _f(p, "input_scale")
    fn: TorchFn
    if scale == 1.0 and input_scale == 1.0:
        fn = functools.partial(F.elu, alpha=alpha)
    else:
        # aten.elu carries SELU's and CELU's constants; traced graphs show it that way.
        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.elu.default(x, alpha, scale, input_scale)

    width = 1.0 / abs(input_scale) if input_scale != 0.0 else None
    return _Activation("elu", fn, (0.0,), width)


def _bind_celu(p: Mapping[str, ParamValue]) -> _Activation:
    alpha = _f(p, "alpha")
    if alpha == 0.0:
        raise ValueError("celu needs alpha != 0")
    return _Activation("celu", functools.partial(F.celu, alpha=alpha), (0.0,), abs(alpha))


def _bind_selu(p: Mapping[str, ParamValue]) -> _Activation:
    return _Activation("selu", F.selu, (0.0,), 1.0)


def _bind_gelu(p: Mapping[str, ParamValue]) -> _Activation:
    approximate = p["approximate"]
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _Activation("gelu", functools.partial(F.gelu, approximate=str(approximate)), (), 1.0)


def _bind_softplus(p: Mapping[str, ParamValue]) -> _Activation:
    beta, threshold = _f(p, "beta"), _f(p, "threshold")
    if beta == 0.0:
        raise ValueError("softplus needs beta != 0")
    return _Activation(
        "softplus",
        functools.partial(F.softplus, beta=beta, threshold=threshold),
        # torch switches to the identity where beta * x > threshold: a (tiny) kink.
        (threshold / beta,),
        1.0 / abs(beta),
    )


def _bind_shrink(kind: str) -> Callable[[Mapping[str, ParamValue]], _Activation]:
    def bind(p: Mapping[str, ParamValue]) -> _Activation:
        lambd = _f(p, "lambd")
        if kind == "softshrink" and lambd < 0.0:
            raise ValueError(f"softshrink needs lambd >= 0, got {lambd}")
        fn = F.softshrink if kind == "softshrink" else F.hardshrink
        kinks = tuple(sorted({-lambd, lambd}))
        return _Activation(kind, functools.partial(fn, lambd=lambd), kinks, None)

    return bind


def _bind_smooth(
    name: str, fn: TorchFn, kinks: tuple[float, ...] = (), scale: float = 1.0
) -> _Spec:
    def bind(p: Mapping[str, ParamValue]) -> _Activation:
        return _Activation(name, fn, kinks, scale)

    return _Spec((), bind)


_SPECS: dict[str, _Spec] = {
    "identity": _Spec((), _bind_identity),
    "relu": _Spec((), _bind_relu),
    "relu6": _Spec((), _bind_relu6),
    "leaky_relu": _Spec((("negative_slope", 0.01),), _bind_leaky),
    # nn.PReLU initialises its weight to 0.25; a per-channel weight is summarised by
    # params_from_module.
    "prelu": _Spec((("negative_slope", 0.25),), _bind_prelu, ("weight",)),
    "elu": _Spec((("alpha", 1.0), ("scale", 1.0), ("input_scale", 1.0)), _bind_elu),
    "celu": _Spec((("alpha", 1.0),), _bind_celu),
    "selu": _Spec((), _bind_selu),
    "gelu": _Spec((("approximate", "none"),), _bind_gelu),
    "silu": _bind_smooth("silu", F.silu),
    "mish": _bind_smooth("mish", F.mish),
    # tanh(x) = 2 sigmoid(2x) - 1: its poles sit at i*pi/2, half as far as sigmoid's, so it
    # needs half the Gaussian width before Gauss-Hermite loses accuracy.
    "tanh": _bind_smooth("tanh", torch.tanh, scale=0.5),
    "sigmoid": _bind_smooth("sigmoid", torch.sigmoid),
    "hardsigmoid": _Spec((), _bind_hardsigmoid),
    "hardswish": _Spec((), _bind_hardswish),
    "hardtanh": _Spec((("min_val", -1.0), ("max_val", 1.0)), _bind_hardtanh),
    "softplus": _Spec((("beta", 1.0), ("threshold", 20.0)), _bind_softplus),
    # softsign = x / (1 + |x|): phi' = (1 + |x|)^-2 has a kink at 0.
    "softsign": _bind_smooth("softsign", F.softsign, (0.0,)),
    "logsigmoid": _bind_smooth("logsigmoid", F.logsigmoid),
    "tanhshrink": _bind_smooth("tanhshrink", F.tanhshrink, scale=0.5),
    "hardshrink": _Spec((("lambd", 0.5),), _bind_shrink("hardshrink")),
    "softshrink": _Spec((("lambd", 0.5),), _bind_shrink("softshrink")),
}

KNOWN_ACTIVATIONS: frozenset[str] = frozenset(_SPECS)
# Sorted, so that passing a default explicitly hits the same cache entry as omitting it.
_FROZEN_DEFAULTS = {name: tuple(sorted(spec.defaults)) for name, spec in _SPECS.items()}

# Parameters that callers may pass through from a module or call but that do not change phi.
_IGNORED_PARAMS = frozenset({"inplace"})

def activation_defaults(name: str) -> dict[str, ParamValue]:
    """Torch's default parameters of an activation, by any alias; ValueError when unknown."""
    return dict(_SPECS[_require(name)].defaults)


def _require(name: str) -> str:
    canonical = canonical_activation(name)
    if canonical is None:
        raise ValueError(
            f"unknown activation {name!r}; known: {', '.join(sorted(KNOWN_ACTIVATIONS))}"
        )
    return canonical


def _freeze_params(canonical: str, params: Mapping[str, Any]) -> FrozenParams:
    spec = _SPECS[canonical]
    if not params:
        return _FROZEN_DEFAULTS[canonical]
    merged = dict(spec.defaults)
    for key, value in params.items():
        if key in _IGNORED_PARAMS:
            continue
        if key in spec.aliases:
            key = spec.defaults[0][0]
        if key not in merged:
            allowed = ", ".join(k for k, _ in spec.defaults) or "none"
            raise ValueError(f"{canonical} takes no parameter {key!r} (parameters: {allowed})")
        default = merged[key]
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"parameter {key!r} of {canonical} must be a string")
            merged[key] = value
        else:
            if isinstance(value, (str, bool)):
                raise ValueError(f"parameter {key!r} of {canonical} must be a number")
            merged[key] = float(value)
    return tuple(sorted(merged.items()))


@functools.lru_cache(maxsize=1024)
def _bind(canonical: str, frozen: FrozenParams) -> _Activation:
    act = _SPECS[canonical].bind(dict(frozen))
    return dataclasses.replace(act, direct=_direct_backward_matches(act.fn))


# --------------------------------------------------------------------------------------------
# Quadrature
# --------------------------------------------------------------------------------------------


def _is_degenerate(m: float, s: float) -> bool:
    # Also true when the spread is below one ulp of the mean: the nodes would all collapse onto
    # m anyway, and onto a kink if m is one.
    return s == 0.0 or (m + _U * s == m and m - _U * s == m)


def _degenerate_rule(act: _Activation, m: float) -> tuple[FloatArray, FloatArray]:
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


def _composite_rule(act: _Activation, m: float, s: float) -> tuple[FloatArray, FloatArray]:
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
    act: _Activation, m: FloatArray, s: FloatArray
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


def _use_hermite(act: _Activation, m: float, s: float) -> bool:
    # Gauss-Hermite only when nothing non-smooth lies within the Gaussian's reach and the
    # Gaussian is no wider than the activation's transition region.
    if act.scale is not None and s > _GH_MAX_SIGMA * act.scale:
        return False
    return not any(abs(k - m) < _U * s for k in act.kinks)


def _rule(
    act: _Activation, m: float, s: float, *, force_composite: bool = False
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


def _phi_and_grad(act: _Activation, z: FloatArray) -> tuple[FloatArray, FloatArray]:
    """phi(z) and phi'(z) from torch, so the derivative at kinks is the one backprop uses.

    Why call the backward node directly when :attr:`_Activation.direct` is set: for a single-op
    activation ``y.grad_fn`` is exactly the function the autograd engine would run, and calling
    it skips ~70 us of engine set-up per call, most of the cost of a moment evaluation. It is
    only used where :func:`_direct_backward_matches` has checked it bit-for-bit against
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
            (grad,) = torch.autograd.grad(y, x, grad_outputs=ones)
    return y.detach().numpy(), grad.numpy()


# Quarter steps hit every default kink exactly (0, +-0.5, +-1, +-3, 6), where backward formulas
# are most likely to differ; the far points check the saturated tails.
_PROBE = np.concatenate((np.linspace(-7.0, 7.0, 57), [-30.0, 25.0]))


def _direct_backward_matches(fn: TorchFn) -> bool:
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
            (expected,) = torch.autograd.grad(y, x, grad_outputs=ones, retain_graph=True)
            with torch.no_grad():
                out = _call_node(node, ones)
            got = out[0] if isinstance(out, tuple) else out
            return isinstance(got, torch.Tensor) and torch.equal(got, expected)
    except Exception:  # noqa: BLE001 - any failure means: use the documented autograd path
        return False


def _integrate(act: _Activation, z: FloatArray, w: FloatArray) -> Moments:
    phi, grad = _phi_and_grad(act, z)
    wphi = w * phi
    return Moments(
        mean=float(wphi.sum()), second=float(wphi @ phi), grad_second=float((w * grad) @ grad)
    )


def _compute(act: _Activation, m: float, v: float, *, force_composite: bool = False) -> Moments:
    s = math.sqrt(v)
    if act.closed is not None and not force_composite and not _is_degenerate(m, s):
        return act.closed(m, s)
    z, w = _rule(act, m, s, force_composite=force_composite)
    return _integrate(act, z, w)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _clean(mean: float, var: float) -> tuple[float, float]:
    m, v = float(mean), float(var)
    if math.isnan(m) or math.isnan(v):
        raise ValueError(f"mean and var must not be NaN, got mean={mean!r}, var={var!r}")
    m = min(max(m, -MEAN_MAX), MEAN_MAX)
    if v < 0.0:
        # E[x^2] - E[x]^2 can come out a rounding error below zero; anything larger is a bug.
        if v < -1e-12 * max(1.0, m * m):
            raise ValueError(f"var must be >= 0, got {var!r}")
        v = 0.0
    return m, min(v, VAR_MAX)


def _key(x: float) -> float:
    return float(f"{x:.{_KEY_DIGITS}g}")


@functools.lru_cache(maxsize=1 << 16)
def _cached_moments(canonical: str, m: float, v: float, frozen: FrozenParams) -> Moments:
    return _compute(_bind(canonical, frozen), m, v)


def activation_moments(
    name: str, mean: float = 0.0, var: float = 1.0, **params: ParamValue
) -> Moments:
    """Moments of ``phi(z)`` for ``z ~ N(mean, var)``, with phi as torch computes it.

    ``name`` is a canonical name or any alias :func:`canonical_activation` accepts; unknown
    names and parameters raise ``ValueError``. ``params`` take torch's names and defaults
    (``negative_slope``, ``alpha``, ``scale``/``input_scale`` (aten.elu), ``min_val``/``max_val``,
    ``beta``/``threshold``, ``lambd``, ``approximate``; PReLU's slope is ``negative_slope`` or
    ``weight``); ``inplace`` is accepted and ignored.

    ``var = 0`` evaluates phi at the mean, taking the var -> 0+ limit on a kink. Inputs are
    clamped to ``|mean| <= 1e100`` and ``var <= 1e200`` so that no NaN can come out. Results are
    cached on (name, mean and var rounded to 12 significant digits, parameters).
    """
    canonical = _require(name)
    frozen = _freeze_params(canonical, params)
    m, v = _clean(mean, var)
    return _cached_moments(canonical, _key(m), _key(v), frozen)


def _clean_arrays(mean: npt.ArrayLike, var: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    m, v = np.broadcast_arrays(
        np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    )
    if np.isnan(m).any() or np.isnan(v).any():
        raise ValueError("mean and var must not contain NaN")
    m = np.clip(m, -MEAN_MAX, MEAN_MAX)
    if (v < -1e-12 * np.maximum(1.0, m * m)).any():
        raise ValueError("var must be >= 0")
    return m, np.clip(v, 0.0, VAR_MAX)


def activation_moments_array(
    name: str,
    mean: npt.ArrayLike = 0.0,
    var: npt.ArrayLike = 1.0,
    **params: ParamValue,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Vectorised :func:`activation_moments`: arrays of E[phi], E[phi^2], E[phi'^2].

    Why it exists: per-sample moments (one (mean, var) per example) predict deep GELU/SiLU
    stacks better than one batch-averaged q, and one torch call over all quadrature nodes costs
    far less than one call per element. ``mean`` and ``var`` broadcast; results are neither
    cached nor rounded, and agree with the scalar function to ~1e-15.
    """
    canonical = _require(name)
    act = _bind(canonical, _freeze_params(canonical, params))
    m_in, v_in = _clean_arrays(mean, var)
    shape = m_in.shape
    m, s = m_in.ravel(), np.sqrt(v_in.ravel())
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
        phi, grad = _phi_and_grad(act, np.concatenate([z.ravel() for _, z, _ in groups]))
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
    return out[0].reshape(shape), out[1].reshape(shape), out[2].reshape(shape)


# --------------------------------------------------------------------------------------------
# Parameters from modules and calls
# --------------------------------------------------------------------------------------------

# Positional parameters after the input, in aten's order (F.* has the same order; its extra
# ``inplace`` flag is a bool and is skipped).
_POSITIONAL: dict[str, tuple[str, ...]] = {
    "leaky_relu": ("negative_slope",),
    "prelu": ("negative_slope",),
    "elu": ("alpha", "scale", "input_scale"),
    "celu": ("alpha",),
    "hardtanh": ("min_val", "max_val"),
    "softplus": ("beta", "threshold"),
    "hardshrink": ("lambd",),
    "softshrink": ("lambd",),
}


def _slope_summary(weight: Any) -> float:
    # Per-channel PReLU slopes enter E[phi^2] and E[phi'^2] through slope^2, so the
    # root-mean-square slope makes those two exact (E[phi] then only approximately).
    values = torch.as_tensor(weight).detach().to("cpu", torch.float64).reshape(-1)
    if values.numel() == 0 or values.is_meta:
        return 0.25
    return float(values.square().mean().sqrt())


def _param_value(canonical: str, key: str, value: Any) -> ParamValue:
    if canonical == "prelu" and key == "negative_slope" and isinstance(value, torch.Tensor):
        return _slope_summary(value)
    if isinstance(value, str):
        return value
    return float(value)


def params_from_module(module: torch.nn.Module) -> dict[str, ParamValue]:
    """Parameters of an activation module (``nn.LeakyReLU(0.2)`` -> ``negative_slope=0.2``).

    Returns only what :func:`activation_moments` accepts for that class, so ``ReLU6`` (a
    Hardtanh subclass) does not leak ``min_val``. ValueError when the class is not an
    activation.
    """
    canonical = _require(type(module).__name__)
    out: dict[str, ParamValue] = {}
    if canonical == "prelu":
        weight = getattr(module, "weight", None)
        if weight is not None:
            out["negative_slope"] = _slope_summary(weight)
        return out
    for key, _default in _SPECS[canonical].defaults:
        if hasattr(module, key):
            out[key] = _param_value(canonical, key, getattr(module, key))
    return out


def params_from_call(
    name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> dict[str, ParamValue]:
    """Parameters of a functional or aten call, given the arguments after the input tensor.

    ``params_from_call("aten.elu.default", (1.67, 1.05, 1))`` gives SELU's constants as elu
    parameters, which is how a traced ``F.selu`` appears.
    """
    canonical = _require(name)
    names = _POSITIONAL.get(canonical, ())
    out: dict[str, ParamValue] = {}
    positional = [a for a in args if not isinstance(a, bool)]
    for key, value in zip(names, positional, strict=False):
        out[key] = _param_value(canonical, key, value)
    accepted = {k for k, _ in _SPECS[canonical].defaults} | set(_SPECS[canonical].aliases)
    for key, value in (kwargs or {}).items():
        if key in accepted:
            target = _SPECS[canonical].defaults[0][0] if key in _SPECS[canonical].aliases else key
            out[target] = _param_value(canonical, target, value)
    return out
