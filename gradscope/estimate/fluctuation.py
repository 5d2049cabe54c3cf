"""Sample-to-sample fluctuation of the gradient: from the mean S to the typical one.

The sweeps (``gradscope.estimate.engine``) propagate S, the *expected* squared
gradient norm relative to the output's: an average over weights and inputs
(the annealed value, ln E[S]). What a training step, or the probe, computes is
the squared norm pooled over a handful of samples, and in a narrow, deep,
chaotic network that figure is nowhere near its expectation: per sample, S is
a product of one random gain per layer, so ln S is a *sum* of independent
terms and is close to Gaussian (central limit theorem over the depth), while
E[S] is carried by rare samples in the far upper tail.

Measured on ``benchmarks/zoo/bad/tanh_mlp50_std2.py`` (tanh, width 64,
weights N(0, 2^2), 50 layers; 6000 input draws with its own weights): at the
first layer E[log10 S] = 34.7 with a standard deviation of 3.8 decades, log10
of the mean over 2000 draws 45.5 (and still climbing with more draws), the
mean-field estimate 46.2; the per-layer ln-gains are uncorrelated (0.006
between neighbours) and their variances add up to that of ln S (76 vs 75).
So the mean-field gain E[G] = 8.7 per layer is right; what the probe reports
(the squared norm pooled over its 6 samples, 3 batches of 2) is the typical
value of a 6-sample mean, log10 38.7, seven decades below.

The model (all logs natural):

* Per sample, a gain G of an op has a Jensen gap d = ln E[G] - E[ln G] >= 0
  and a log-variance v = Var[ln G]. Only ops whose gain is a sum over a
  sample's units fluctuate: a dense layer, whose per-sample gain is
  ||W^T g||^2 / ||g||^2 = sigma_w^2 chi^2_n / n for n input units
  (:func:`chi2_log_stats`), and an elementwise activation, whose per-sample
  gain is sum_j phi'(z_j)^2 xi_j^2 / sum_j xi_j^2 over its n units, xi the
  incoming gradient's Gaussian entries (:func:`weighted_mean_log_stats`).
  Both are per sample; the direction and the norm of a Gaussian vector are
  independent, so the two factors of one layer are independent and their d
  and v add.
* Along the backward sweep d and v add from op to op (independent layers; a
  node fed by several consumers takes the S-weighted average), giving per
  node D and V: ln S_i ~ N(ln E[S] - D, V) for one sample i.
* The pooled figure over N samples, M = (1/N) sum_i S_i, has typical value
  E[ln M] = ln E[S] - D + h_N(V), h_N(V) = E[ln (1/N) sum_i exp(sqrt(V) Z_i)]
  (:func:`log_mean_gain`): h_1 = 0 (one sample: the quenched value), h_N(V)
  -> V/2 as N -> infinity (the annealed value when ln S is Gaussian). By
  Jensen E[ln M] <= ln E[M] = ln E[S], so the shift is capped at 0.

For wide networks d and v are O(1/width) per layer and the shift vanishes:
the estimate is unchanged wherever the mean field was already right.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch

FloatArray = npt.NDArray[np.float64]

#: Largest unit count simulated directly; beyond it v and d are scaled as 1/n, the
#: central-limit rate (at n = 512 even tanh at q = 243, 20x over-dispersed, has v ~ 0.1).
UNITS_MAX = 512
#: Points per simulation (draws x units): ~1e5 evaluations of phi' per activation node.
_BUDGET = 1 << 17
#: Fewest positive simulated gains to read the log statistics from; below that the
#: gain is almost always exactly 0 and only the mean is meaningful.
_MIN_POSITIVE = 64
_SEED = 0
#: Samples per simulated set of unit means (weights): enough for an unbiased variance.
_PER_ROW = 8
#: Normals behind h_N: its Monte Carlo error is ~sqrt(V / draws), 0.02 nats at V = 76, N = 6.
_POOL_BUDGET = 1 << 18


@functools.lru_cache(maxsize=4096)
def chi2_log_stats(dof: float) -> tuple[float, float]:
    """(d, v) of ln(chi^2_n / n): the per-sample gain of a dense layer with n input units.

    For x = chi^2_n, E[ln x] = psi(n/2) + ln 2 and Var[ln x] = psi'(n/2) (digamma,
    trigamma), and E[x / n] = 1, so d = ln(n/2) - psi(n/2) ~ 1/n and v ~ 2/n.
    Cached: every dense layer of a stack asks for the same few ``n``, in every estimate.
    """
    if not math.isfinite(dof) or dof <= 0:
        return 0.0, 0.0
    half = torch.tensor(dof / 2.0, dtype=torch.float64)
    d = math.log(dof / 2.0) - float(torch.special.digamma(half))
    v = float(torch.special.polygamma(1, half))
    return max(d, 0.0), max(v, 0.0)


@functools.lru_cache(maxsize=64)
def _normals(draws: int, units: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Fixed normals (seeded: reproducible): per-unit means, shared by the ``_PER_ROW``
    samples of a row; per-sample deviations; the gradient's squared entries."""
    rng = np.random.default_rng(_SEED)
    rows = draws // _PER_ROW
    eta = np.repeat(rng.standard_normal((rows, units)), _PER_ROW, axis=0)
    return eta, rng.standard_normal((draws, units)), rng.standard_normal((draws, units)) ** 2


def weighted_mean_log_stats(grad_sq: Callable[[FloatArray], FloatArray], mean: float,
                            var: float, units: int,
                            spread: float = 0.0) -> tuple[float, float]:
    """(d, v) of G = sum_j a_j xi_j^2 / sum_j xi_j^2, a_j = grad_sq(z_j), z_j ~ N(mean, var).

    The per-sample gain of an elementwise activation over its ``units`` units: each unit
    passes phi'(z_j)^2 of its own gradient entry, whose square xi_j^2 (chi^2_1 up to the
    common scale) weights it. E[G] = E[phi'^2] is the mean-field gain; its spread matters
    when phi'^2 is heavy-tailed and the units few (tanh at q = 243: E[phi'^4] / E[phi'^2]^2
    = 20, so with 64 units about three carry the gradient, d = 0.53 per layer, v = 1.5;
    measured on that network, with the dense layer's chi^2_64: 0.55 and 1.57).

    ``spread`` is the part of ``var`` that is each unit's own mean (``SweepState.spread``):
    z_j = m_j + e_j with m_j ~ N(mean, spread) fixed by the weights, shared by every
    sample, and e_j ~ N(0, var - spread) the sample's own. Which units pass the gradient
    then varies less from sample to sample (a deep ReLU net, whose samples become
    correlated, switches the same units on for every input: the share of active units
    varies 4x less across inputs than a binomial draw), and only that variation averages
    out when samples are pooled. So d is over weights and samples together (the gap
    between ln E[G] and E[ln G], whatever its source) and v is the variance across
    samples at fixed unit means, E_m Var_e[ln G] (rows of ``_PER_ROW`` samples share the
    m_j; the within-row variance with ddof 1 is unbiased for it).

    Seeded Monte Carlo over ``_BUDGET`` points; gains that are exactly 0 (every unit dead)
    are left to the mean, which already counts them: d and v are of ln G given G > 0.
    """
    if units <= 0 or not (math.isfinite(mean) and math.isfinite(var)) or var < 0:
        return 0.0, 0.0
    shared = min(max(spread, 0.0), var) if math.isfinite(spread) else 0.0
    sim = min(units, UNITS_MAX)
    draws = max(_BUDGET // sim, 256) // _PER_ROW * _PER_ROW
    eta, eps, xi2 = _normals(draws, sim)
    z = mean + math.sqrt(shared) * eta + math.sqrt(var - shared) * eps
    a = np.asarray(grad_sq(z), dtype=np.float64)
    if not np.isfinite(a).all():
        return 0.0, 0.0
    gain = ((a * xi2).sum(axis=1) / xi2.sum(axis=1)).reshape(-1, _PER_ROW)
    rows = (gain > 0).all(axis=1)
    if int(rows.sum()) * _PER_ROW < _MIN_POSITIVE:
        return 0.0, 0.0
    positive = gain[rows]
    logs = np.log(positive)
    d = math.log(float(positive.mean())) - float(logs.mean())
    v = float(logs.var(axis=1, ddof=1).mean())
    scale = sim / units  # central-limit rate beyond the simulated width
    return max(d, 0.0) * scale, max(v, 0.0) * scale


@functools.lru_cache(maxsize=16)
def _pooled_normals(samples: int) -> FloatArray:
    """Fixed standard normals, draws x samples, ~2.6e5 in all (seeded: reproducible)."""
    draws = max(_POOL_BUDGET // samples, 512)
    return np.random.default_rng(_SEED).standard_normal((draws, samples))


@functools.lru_cache(maxsize=16)
def _pooled_below_max(samples: int) -> tuple[FloatArray, FloatArray]:
    """Each row's largest normal, and the row less it (<= 0), for the log-sum-exp below:
    sqrt(V) > 0 keeps the largest sample the largest, so these do not depend on V."""
    z = _pooled_normals(samples)
    top = z.max(axis=1, keepdims=True)
    return top[:, 0], z - top


@functools.lru_cache(maxsize=4096)
def _log_mean_gain(var: float, samples: int) -> float:
    top, below = _pooled_below_max(samples)
    scale = math.sqrt(var)
    # log-sum-exp around each row's largest sample: exp(sqrt(V) Z) overflows for V ~ 1e4.
    # One temporary, worked in place: each fresh 2 MB array is new pages, which made the
    # three temporaries of ``np.log(np.exp(scale * below).mean(axis=1))`` cost 4x the
    # arithmetic (the same values; issue 15, a first call's grid of ~50 points).
    scaled = np.multiply(below, scale)
    np.exp(scaled, out=scaled)
    logs = scaled.mean(axis=1)
    np.log(logs, out=logs)
    logs += scale * top
    return float(logs.mean())


def log_mean_gain(var: float, samples: int) -> float:
    """h_N(V) = E[ln (1/N) sum_i exp(sqrt(V) Z_i)], Z_i iid N(0, 1).

    The typical log of the mean of N lognormal samples above their common median:
    0 for N = 1, tending to V/2 for N -> infinity, close to sqrt(2 V ln N) - ln N
    once V >> ln N (the largest sample dominates the sum). Seeded Monte Carlo with
    about 2.6e5 normals at grid points of ln V, interpolated between them.
    """
    if samples <= 1 or not math.isfinite(var) or var <= 0:
        return 0.0
    # Interpolated linearly in ln V between grid points 0.05 apart (each one Monte Carlo
    # run, cached): a static estimate asks at hundreds of distinct V (958 on a 128-layer
    # MLP, 1.5 s of its analysis; issue 15) and h is smooth in ln V, so the interpolation
    # is within ~0.03% (Delta^2 / 8 of the curvature), below the Monte Carlo's own noise.
    u = math.log(var) / _LOG_STEP
    k = math.floor(u)
    lo = _log_mean_gain(math.exp(k * _LOG_STEP), int(samples))
    hi = _log_mean_gain(math.exp((k + 1) * _LOG_STEP), int(samples))
    return lo + (u - k) * (hi - lo)


#: Grid spacing in ln V for :func:`log_mean_gain`'s interpolation.
_LOG_STEP = 0.05


def typical_log_shift(gap: float, var: float, samples: int) -> float:
    """ln(typical pooled S / E[S]) = min(0, h_N(V) - D) (module docstring)."""
    if not (math.isfinite(gap) and math.isfinite(var)) or (gap <= 0 and var <= 0):
        return 0.0
    return min(0.0, log_mean_gain(var, samples) - gap)
