"""Gate-level pieces of the recurrent estimate: Gaussian moments of the gate nonlinearities,
gate weight blocks, and per-unit moment vectors.

Everything here is vectorised over units, because the recurrent estimate
(``gradscope.estimate.recurrent``) steps every gate of every unit at every time
step. Weight blocks are either resolved (the actual matrices, or draws from
PyTorch's default init for meta tensors) or summarised by one (mean, second
moment) per gate block when a module is too large to resolve; both answer the
same ``forward``/``backward``/``gain`` questions so the cell maths
(``gradscope.estimate.rnn_cell``) does not care which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

Vec = npt.NDArray[np.float64]

#: Ceilings for exploding signals: moments stop at 1e200 (as in activations.py), so squared
#: norms stay finite and nothing turns into NaN.
_SECOND_MAX = 1e200
_MEAN_MAX = 1e100


# --------------------------------------------------------------------------------------------
# Gaussian moments of the gate nonlinearities, vectorised over units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateMoments:
    """``E[phi]``, ``E[phi^2]``, ``E[phi']``, ``E[phi'^2]`` for ``z ~ N(mean, var)``, per unit.

    ``E[phi']`` is not in ``activations.Moments``; it is needed here because the coherent part
    of the step Jacobian is made of the gates' means, derivatives included.
    """

    m1: Vec
    m2: Vec
    d1: Vec
    d2: Vec

    def part(self, j: int, size: int) -> GateMoments:
        """The ``j``-th block of ``size`` units (gates integrated together, used apart)."""
        s = slice(j * size, (j + 1) * size)
        return GateMoments(self.m1[s], self.m2[s], self.d1[s], self.d2[s])


def _legendre_grid(lo: float, hi: float, width: float, nodes: int) -> tuple[Vec, Vec]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    starts = np.arange(lo, hi, width)
    z = (starts[:, None] + 0.5 * width * (x[None, :] + 1.0)).ravel()
    return z, np.tile(0.5 * width * w, starts.shape[0])


_HERMITE = np.polynomial.hermite.hermgauss(64)
_GH_U: Vec = np.sqrt(2.0) * _HERMITE[0]
_GH_W: Vec = _HERMITE[1] / np.sqrt(np.pi)
#: sigmoid and tanh are constant to ~1e-17 relative beyond |z| = 20; the tails are added in
#: closed form. Composite 8-point Gauss-Legendre on pieces of width 2: 4.7e-7 worst relative
#: error against activation_moments for sd >= 1 (measured; tested).
_SAT = 20.0
_Z, _ZW = _legendre_grid(-_SAT, _SAT, 2.0, 8)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _ndtr(x: Vec) -> Vec:
    out: Vec = torch.special.ndtr(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return out


def _sig(z: Vec) -> tuple[Vec, Vec]:
    t = np.tanh(0.5 * z)  # overflow-free sigmoid: (1 + tanh(z/2)) / 2
    return 0.5 * (1.0 + t), 0.25 * (1.0 - t * t)


def _tanh(z: Vec) -> tuple[Vec, Vec]:
    t = np.tanh(z)
    return t, 1.0 - t * t


_PHI_Z = {"sigmoid": _sig(_Z), "tanh": _tanh(_Z)}
_LIMITS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def gate_moments(name: str, mean: npt.ArrayLike, var: npt.ArrayLike) -> GateMoments:
    """Moments of ``sigmoid``, ``tanh`` or ``relu`` at ``N(mean, var)``, elementwise.

    Why not :func:`activations.activation_moments_array`: the recursion needs every gate of
    every unit at every step, and that function's adaptive rules cost ~10 ms per 64 units.
    Gauss-Hermite (64 nodes) serves standard deviations up to 1 (error < 3e-7 for these
    functions); wider Gaussians are integrated in the activation's own variable on a fixed
    composite Gauss-Legendre grid, which loses nothing when the Gaussian is wide. ReLU is in
    closed form. Tests check every moment against :func:`activations.activation_moments`.
    """
    m = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    v = np.maximum(np.atleast_1d(np.asarray(var, dtype=np.float64)), 0.0)
    m, v = np.broadcast_arrays(m, v)
    s = np.sqrt(v)
    if name == "relu":
        pos = s > 0.0
        a = m / np.where(pos, s, 1.0)
        # var -> 0 on the kink: the limit 1/2, as activation_moments takes it.
        cdf = np.where(pos, _ndtr(a), np.where(m == 0.0, 0.5, (m > 0.0).astype(np.float64)))
        pdf = np.where(pos, np.exp(-0.5 * a * a) * _INV_SQRT_2PI, 0.0)
        m1 = m * cdf + s * pdf
        m2 = (m * m + v) * cdf + m * s * pdf
        return GateMoments(m1, np.maximum(m2, 0.0), cdf, cdf.copy())
    if name not in _PHI_Z:
        raise ValueError(f"gate nonlinearity must be sigmoid, tanh or relu, got {name!r}")
    fn = _sig if name == "sigmoid" else _tanh
    lo, hi = _LIMITS[name]
    out = np.empty((4, *m.shape))
    narrow = s <= 1.0
    if narrow.any():
        phi, dphi = fn(m[narrow, None] + s[narrow, None] * _GH_U)
        out[:, narrow] = np.stack([phi @ _GH_W, (phi * phi) @ _GH_W, dphi @ _GH_W,
                                   (dphi * dphi) @ _GH_W])
    wide = ~narrow
    if wide.any():
        mw, sw = m[wide], s[wide]
        u = (_Z - mw[:, None]) / sw[:, None]
        w = _ZW * np.exp(-0.5 * u * u) * (_INV_SQRT_2PI / sw[:, None])
        phi, dphi = _PHI_Z[name]
        below, above = _ndtr((-_SAT - mw) / sw), _ndtr((mw - _SAT) / sw)
        out[:, wide] = np.stack([w @ phi + lo * below + hi * above,
                                 w @ (phi * phi) + lo * lo * below + hi * hi * above,
                                 w @ dphi, w @ (dphi * dphi)])
    return GateMoments(out[0], np.maximum(out[1], 0.0), out[2], np.maximum(out[3], 0.0))


# --------------------------------------------------------------------------------------------
# Weight blocks
# --------------------------------------------------------------------------------------------


def values_of(t: torch.Tensor | None) -> Vec | None:
    if t is None or t.is_meta or t.numel() == 0:
        return None
    out: Vec = t.detach().to("cpu", torch.float64).numpy()
    return out


@dataclass(frozen=True)
class GateWeights:
    """``y = W x`` for ``blocks`` stacked gate blocks of ``n_out`` units each.

    Per unit when ``w`` is known, else one (mean, second moment) per block, and then every
    unit of a block is alike and arrays carry one entry per block. ``forward``: the input's
    per-unit (mean, second moment) to the outputs' means and variances. ``backward``:
    per-element expected squared gradients at the outputs to those at the input
    (``sum_i W_ik^2 s_i``: independent paths add). ``gain``: the per-element squared gain of
    block ``j``'s ``W^T diag(p)``.
    """

    blocks: int
    n_out: int
    n_in: int
    w_mean: Vec
    w_second: Vec
    w: Vec | None = field(default=None, repr=False)
    w2: Vec | None = field(default=None, repr=False)
    row2: Vec | None = field(default=None, repr=False)

    @staticmethod
    def per_unit(w: Vec, blocks: int, n_out: int, n_in: int) -> GateWeights:
        """Resolved: from the weight's values (actual, or drawn for a meta tensor)."""
        w2 = w * w
        w_mean = w.reshape(blocks, -1).mean(axis=1)
        w_second = w2.reshape(blocks, -1).mean(axis=1)
        return GateWeights(blocks, n_out, n_in, w_mean, w_second, w, w2, w2.sum(axis=1))

    @staticmethod
    def block_stats(t: torch.Tensor, blocks: int, n_out: int, n_in: int,
                    default_var: float) -> GateWeights:
        """Summarised: each block's mean and second moment, the default init's for meta.

        Block by block in float64, so a module too large to resolve is never copied whole.
        """
        if t.is_meta:
            return GateWeights(blocks, n_out, n_in, np.zeros(blocks), np.full(blocks, default_var))
        means, seconds = np.zeros(blocks), np.zeros(blocks)
        with torch.no_grad():
            for j in range(blocks):
                part = t.detach()[j * n_out : (j + 1) * n_out].to("cpu", torch.float64)
                means[j], seconds[j] = float(part.mean()), float((part * part).mean())
        return GateWeights(blocks, n_out, n_in, means, seconds)

    def summary(self) -> GateWeights:
        """The same block, by its statistics only."""
        return GateWeights(self.blocks, self.n_out, self.n_in, self.w_mean, self.w_second)

    def forward(self, mean: Vec, second: Vec) -> tuple[Vec, Vec]:
        if self.w is None or self.w2 is None:
            mm, qq = float(np.mean(mean)), float(np.mean(second))
            out_var = self.n_in * (self.w_second * qq - (self.w_mean * mm) ** 2)
            return self.n_in * self.w_mean * mm, np.maximum(out_var, 0.0)
        m = np.broadcast_to(mean, (self.n_in,))
        var = np.broadcast_to(np.maximum(second - mean * mean, 0.0), (self.n_in,))
        return self.w @ m, self.w2 @ var

    def backward(self, s: Vec) -> Vec:
        """``s``: per-element squared gradients, one array per block, concatenated."""
        if self.w2 is None:
            return np.array([self.n_out * float(self.w_second @ s)])
        out: Vec = s @ self.w2
        return out

    def gain(self, j: int = 0, p2: Vec | float = 1.0) -> float:
        if self.row2 is None:
            return self.n_out * float(self.w_second[j]) * float(np.mean(p2))
        rows = self.row2[j * self.n_out : (j + 1) * self.n_out]
        return float(np.broadcast_to(p2, (self.n_out,)) @ rows) / self.n_in


@dataclass(frozen=True)
class GateBias:
    """Stacked gate biases: per-unit values (variance 0) or per-block mean and spread."""

    mean: Vec
    var: Vec


def gate_bias(parts: list[Vec | None], blocks: int, default_var: float, per_unit: bool) -> GateBias:
    """Sum of stacked bias vectors (``b_ih + b_hh``); ``None`` (meta) adds the default spread."""
    if not parts:
        return GateBias(np.zeros(1), np.zeros(1))
    known = [v for v in parts if v is not None]
    unknown = len(parts) - len(known)
    if not known:
        return GateBias(np.zeros(blocks), np.full(blocks, unknown * default_var))
    total: Vec = np.sum(known, axis=0)
    if per_unit and unknown == 0:
        return GateBias(total, np.zeros_like(total))
    per_block = total.reshape(blocks, -1)
    return GateBias(per_block.mean(axis=1), per_block.var(axis=1) + unknown * default_var)


@dataclass(frozen=True)
class UnitMoments:
    """Per-unit (or block) mean and second moment."""

    mean: Vec
    second: Vec

    @staticmethod
    def scalar(mean: float, second: float) -> UnitMoments:
        return UnitMoments(np.array([float(mean)]), np.array([float(second)]))

    def clamped(self) -> UnitMoments:
        """Exploding states stop at 1e200 (like ``activations.VAR_MAX``): no inf or NaN."""
        mean = np.clip(np.nan_to_num(self.mean, nan=0.0), -_MEAN_MAX, _MEAN_MAX)
        second = np.clip(np.nan_to_num(self.second, nan=_SECOND_MAX), 0.0, _SECOND_MAX)
        return UnitMoments(mean, np.maximum(second, mean * mean))

    def close(self, other: UnitMoments, rtol: float) -> bool:
        scale = max(float(np.max(np.abs(self.second))), 1e-300)
        return bool(np.allclose(self.mean, other.mean, rtol=rtol, atol=rtol * math.sqrt(scale))
                    and np.allclose(self.second, other.second, rtol=rtol, atol=rtol * scale))


ZERO = UnitMoments.scalar(0.0, 0.0)
