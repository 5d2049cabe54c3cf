"""Gaussian moments of elementwise activations, the inputs of the mean-field recursion.

The estimator propagates a pre-activation ``z ~ N(mean, var)`` through each activation and
needs three numbers: ``E[phi(z)]`` and ``E[phi(z)^2]`` for the forward pass (the next layer's
second moment) and ``E[phi'(z)^2]`` for the backward gain ``chi``
(see ``docs/static-estimate.md``).

This module is the activation table: which activations exist, their parameters with torch's
names and defaults (read off modules and calls as well), how each binds to a torch function,
and the cached public entry points. The integration itself is
``gradscope.estimate.quadrature``.

Unknown names: :func:`canonical_activation` returns ``None``; :func:`activation_moments` raises
``ValueError``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from gradscope.estimate.quadrature import (
    BoundActivation,
    FloatArray,
    Moments,
    TorchFn,
    compute_moments,
    direct_backward_matches,
    hardsigmoid_closed,
    hardtanh_closed,
    leaky_closed,
    moments_array,
    phi_and_grad,
)
from gradscope.tracing.ops import canonical_activation, is_activation

__all__ = [
    "KNOWN_ACTIVATIONS",
    "Moments",
    "activation_defaults",
    "activation_grad_sq",
    "activation_moments",
    "activation_moments_array",
    "canonical_activation",
    "is_activation",
    "params_from_call",
    "params_from_module",
]

ParamValue = float | str
FrozenParams = tuple[tuple[str, ParamValue], ...]

# Clamp for the inputs. A variance of 1e200 is ~160 orders of magnitude past float32 overflow,
# so any network that produces it has already blown up; clamping keeps every intermediate
# (x**3 inside GELU's tanh form, phi**2) finite in float64, so no NaN can appear.
VAR_MAX = 1e200
MEAN_MAX = 1e100
# Rounding of (mean, var) for the cache key: 12 significant digits moves results by ~1e-12
# relative (up to ~1e-9 for values deep in a Gaussian tail, ~1e-100 in size), far below anything
# the estimator can resolve, and lets repeated layers share an entry.
_KEY_DIGITS = 12


# --------------------------------------------------------------------------------------------
# Activation table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    defaults: tuple[tuple[str, ParamValue], ...]
    bind: Callable[[Mapping[str, ParamValue]], BoundActivation]
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


def _bind_identity(p: Mapping[str, ParamValue]) -> BoundActivation:
    def closed(m: float, s: float) -> Moments:
        return Moments(m, m * m + s * s, 1.0)

    return BoundActivation("identity", _identity, (), None, closed)


def _bind_relu(p: Mapping[str, ParamValue]) -> BoundActivation:
    return BoundActivation("relu", F.relu, (0.0,), None, functools.partial(leaky_closed, 0.0))


def _bind_leaky(p: Mapping[str, ParamValue]) -> BoundActivation:
    slope = _f(p, "negative_slope")
    return BoundActivation(
        "leaky_relu",
        functools.partial(F.leaky_relu, negative_slope=slope),
        (0.0,),
        None,
        functools.partial(leaky_closed, slope),
    )


def _bind_prelu(p: Mapping[str, ParamValue]) -> BoundActivation:
    slope = _f(p, "negative_slope")
    weight = torch.tensor([slope], dtype=torch.float64)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, weight)

    return BoundActivation("prelu", fn, (0.0,), None, functools.partial(leaky_closed, slope))


def _bind_hardtanh(p: Mapping[str, ParamValue]) -> BoundActivation:
    lo, hi = _f(p, "min_val"), _f(p, "max_val")
    if lo > hi:
        raise ValueError(f"hardtanh needs min_val <= max_val, got {lo} > {hi}")
    return BoundActivation(
        "hardtanh",
        functools.partial(F.hardtanh, min_val=lo, max_val=hi),
        (lo, hi),
        None,
        functools.partial(hardtanh_closed, lo, hi),
    )


def _bind_relu6(p: Mapping[str, ParamValue]) -> BoundActivation:
    closed = functools.partial(hardtanh_closed, 0.0, 6.0)
    return BoundActivation("relu6", F.relu6, (0.0, 6.0), None, closed)


def _bind_hardsigmoid(p: Mapping[str, ParamValue]) -> BoundActivation:
    return BoundActivation("hardsigmoid", F.hardsigmoid, (-3.0, 3.0), None, hardsigmoid_closed)


def _bind_hardswish(p: Mapping[str, ParamValue]) -> BoundActivation:
    return BoundActivation("hardswish", F.hardswish, (-3.0, 3.0), None)


def _bind_elu(p: Mapping[str, ParamValue]) -> BoundActivation:
    alpha, scale, input_scale = _f(p, "alpha"), _f(p, "scale"), _f(p, "input_scale")
    fn: TorchFn
    if scale == 1.0 and input_scale == 1.0:
        fn = functools.partial(F.elu, alpha=alpha)
    else:
        # aten.elu carries SELU's and CELU's constants; traced graphs show it that way.
        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.elu.default(x, alpha, scale, input_scale)

    width = 1.0 / abs(input_scale) if input_scale != 0.0 else None
    return BoundActivation("elu", fn, (0.0,), width)


def _bind_celu(p: Mapping[str, ParamValue]) -> BoundActivation:
    alpha = _f(p, "alpha")
    if alpha == 0.0:
        raise ValueError("celu needs alpha != 0")
    return BoundActivation("celu", functools.partial(F.celu, alpha=alpha), (0.0,), abs(alpha))


def _bind_selu(p: Mapping[str, ParamValue]) -> BoundActivation:
    return BoundActivation("selu", F.selu, (0.0,), 1.0)


def _bind_gelu(p: Mapping[str, ParamValue]) -> BoundActivation:
    approximate = p["approximate"]
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return BoundActivation("gelu", functools.partial(F.gelu, approximate=str(approximate)), (), 1.0)


def _bind_softplus(p: Mapping[str, ParamValue]) -> BoundActivation:
    beta, threshold = _f(p, "beta"), _f(p, "threshold")
    if beta == 0.0:
        raise ValueError("softplus needs beta != 0")
    return BoundActivation(
        "softplus",
        functools.partial(F.softplus, beta=beta, threshold=threshold),
        # torch switches to the identity where beta * x > threshold: a (tiny) kink.
        (threshold / beta,),
        1.0 / abs(beta),
    )


def _bind_shrink(kind: str) -> Callable[[Mapping[str, ParamValue]], BoundActivation]:
    def bind(p: Mapping[str, ParamValue]) -> BoundActivation:
        lambd = _f(p, "lambd")
        if kind == "softshrink" and lambd < 0.0:
            raise ValueError(f"softshrink needs lambd >= 0, got {lambd}")
        fn = F.softshrink if kind == "softshrink" else F.hardshrink
        kinks = tuple(sorted({-lambd, lambd}))
        return BoundActivation(kind, functools.partial(fn, lambd=lambd), kinks, None)

    return bind


def _bind_smooth(
    name: str, fn: TorchFn, kinks: tuple[float, ...] = (), scale: float = 1.0
) -> _Spec:
    def bind(p: Mapping[str, ParamValue]) -> BoundActivation:
        return BoundActivation(name, fn, kinks, scale)

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
def _bind(canonical: str, frozen: FrozenParams) -> BoundActivation:
    act = _SPECS[canonical].bind(dict(frozen))
    return dataclasses.replace(act, direct=direct_backward_matches(act.fn))



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
    return compute_moments(_bind(canonical, frozen), m, v)


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
    out = moments_array(act, m, s)
    return out[0].reshape(shape), out[1].reshape(shape), out[2].reshape(shape)


#: Probabilists' Gauss-Hermite rule for the spread of an activation's unit means. The
#: integrand g(mu)^2 (g: phi smoothed by a Gaussian) is smooth wherever units still vary
#: within and only kinked, like phi, when they do not; 24 nodes keep the ReLU worst case
#: (within = 0) to ~1e-3 relative, 5 nodes were ~10% off.
_SPREAD_U, _SPREAD_W = np.polynomial.hermite_e.hermegauss(24)
_SPREAD_W = _SPREAD_W / math.sqrt(2.0 * math.pi)


def unit_mean_spread(name: str, mean: float, spread: float, within: float,
                     **params: ParamValue) -> float:
    """Var over units of g(m_c) = E[phi(m_c + sqrt(within) e)], m_c ~ N(mean, spread).

    The spread of an activation's output unit means (``ops_activation._act``), cached
    like :func:`activation_moments` on rounded inputs: a static estimate asks for it at
    every activation, and each verified fix re-estimates the whole graph with most of
    its activations' inputs unchanged (issue 15: on a 128-layer MLP these quadratures
    were 40% of the analysis).
    """
    canonical = _require(name)
    frozen = _freeze_params(canonical, params)
    m, v = _clean(mean, within)
    return _cached_spread(canonical, _key(m), _key(max(spread, 0.0)), _key(v), frozen)


@functools.lru_cache(maxsize=1 << 16)
def _cached_spread(canonical: str, mean: float, spread: float, within: float,
                   frozen: FrozenParams) -> float:
    act = _bind(canonical, frozen)
    m = mean + math.sqrt(spread) * _SPREAD_U
    unit_means = moments_array(act, m, np.full_like(m, math.sqrt(within)))[0]
    average = float(_SPREAD_W @ unit_means)
    return max(float(_SPREAD_W @ (unit_means * unit_means)) - average * average, 0.0)


def activation_grad_sq(name: str, z: npt.ArrayLike, **params: ParamValue) -> FloatArray:
    """phi'(z)^2 elementwise, with torch's own backward (the derivative backprop uses).

    Why: the per-sample fluctuation of an activation's gain
    (``gradscope.estimate.fluctuation``) needs the distribution of phi'^2, not only
    its mean. Inputs are clamped like :func:`activation_moments_array`'s means.
    """
    canonical = _require(name)
    act = _bind(canonical, _freeze_params(canonical, params))
    x = np.clip(np.asarray(z, dtype=np.float64), -MEAN_MAX, MEAN_MAX)
    _, grad = phi_and_grad(act, np.ascontiguousarray(x.ravel()))
    return np.square(grad).reshape(x.shape)


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
