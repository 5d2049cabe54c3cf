"""Mean-field estimate of gradient flow through recurrent layers (LSTM, GRU, RNN) and cells.

A recurrent layer is one op in the traced graph but a deep network in time: the gradient that
enters at the last step reaches step ``t`` only after ``T - 1 - t`` applications of the step
Jacobian. This module unrolls that recursion on moments, with the bookkeeping of
``propagate.py`` (SIGNAL_PROPAGATION.md).

Forward (mean field). Each gate's pre-activation is ``W_ih x_t + W_hh h_{t-1} + b``: mean from
the bias (and the inputs' means), variance ``sum_k W_ik^2 Var x_k + sum_k W_hh,ik^2 Var h_k``.
Gate moments are Gaussian integrals; the state moments are stepped from ``h_0 = c_0 = 0`` as
PyTorch starts them, so short sequences see the transient and long ones the fixed point.

Why per unit, with the actual weight matrices, when the weights have values: PyTorch draws the
biases per unit and they are fixed in time, so each unit's gates and cell state carry a mean of
their own, which the cell state integrates (``c_i ~ i_i g_i / (1 - f_i)``). Averaging the units
first underestimated an LSTM's output second moment 3x at forget bias 3 (measured). Meta
tensors have no values: they are drawn (fixed seed) from PyTorch's declared default init,
``U(-1/sqrt(H), 1/sqrt(H))`` for every weight and bias (mean 0, variance ``1/(3H)``), so a meta
module is estimated as a typical freshly initialised one. Modules too large to resolve
(``_PER_UNIT_BUDGET``) are summarised per gate block instead: one (mean, second moment) per
block, the bias spread counted as pre-activation variance (the default init's on meta).

Backward. The per-step Jacobian is ``J_t = M + N_t``: ``M`` built from the gates' per-unit
means and the (tied) recurrent weights, ``N_t`` the gates' fluctuations, independent from step
to step. Plain mean field ("gradient independence": squared norms of all paths add, step by
step) treats ``W_hh`` as redrawn at every step. That is wrong in a way that matters here: the
step Jacobian of a GRU or LSTM is ``diag(a) + W^T diag(p)`` (``a`` = update or forget gate),
and with a tied ``W`` the gradient aligns with the directions where the two terms add
coherently, so the squared norm decays as ``(a + b)^2`` per step rather than ``a^2 + b^2``
(``b`` the circular-law radius of ``W^T diag(p)``). Measured on a default-init LSTM (H=64):
independent-step mean field 0.27 per step, brute force 0.39. Temporally correlated gradients
coming down from an upper layer add up coherently the same way (a two-layer LSTM's input
gradient came out 2x low, 60x at forget bias 3, under plain mean field).

So the backward pass is a *surrogate simulation*: a few probe gradients are propagated through
the actual recurrent matrices (sampled from the default init on the meta device), with every
gate replaced by its mean-field mean plus independent Gaussian noise of its mean-field variance.
It is linear, deterministic (fixed seed), and costs ``O(T * gates * H^2 * probes)``; beyond a
budget it falls back to the step-by-step mean field, noted as such. ``step_gain`` is analytic:
the spectral radius of ``M`` from the circular law, with the fluctuations added through the
resolvent (see :meth:`_Cell.step_gain`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = [
    "GateMoments",
    "RecurrentEstimate",
    "estimate_cell",
    "estimate_recurrent",
    "gate_moments",
    "input_gradient_profile",
]

Vec = npt.NDArray[np.float64]
Entry = Literal["last", "uniform"]

#: A state this close (relative) to the fixed point is taken as stationary: the remaining
#: steps reuse the fixed point's step, so a 10 000-step sequence costs no more than its
#: transient. 1e-5 is far below anything the estimate resolves.
_STATIONARY_RTOL = 1e-5
_FIXED_POINT_RTOL = 1e-10
_MAX_FIXED_POINT_ITER = 200
_ANDERSON_MEMORY = 20
_MAX_PLAIN_STEPS = 500
#: Per-unit forward moments cost a Gaussian integral per gate unit and two matrix-vector products
#: per step; beyond this many multiply-adds (over the transient, at most 500 steps, and all
#: layers and directions) block statistics (one number per gate block) are used instead.
_PER_UNIT_BUDGET = 2e9
#: Surrogate backward: probe count and the multiply-add budget for one call (~1-5 s).
_PROBES_MAX = 64
_PROBES_MIN = 4
_PROBE_TARGET = 512  # probes x input features: ~6% noise on input_gain
_SIM_BUDGET = 2e10
_SIM_MEMORY = 5e8  # bytes
_SEED = 20240917
#: Ceilings for exploding signals: moments stop at 1e200 (as in activations.py), simulated
#: gradients at 1e100 per element, so squared norms stay finite and nothing turns into NaN.
_SECOND_MAX = 1e200
_MEAN_MAX = 1e100
_GRAD_MAX = 1e100
#: Gradients below this are flushed to zero: they underflow in any real backward pass, and
#: denormal arithmetic would slow the simulation down 100x.
_FLUSH = 1e-280


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


def _values(t: torch.Tensor | None) -> Vec | None:
    if t is None or t.is_meta or t.numel() == 0:
        return None
    out: Vec = t.detach().to("cpu", torch.float64).numpy()
    return out


@dataclass(frozen=True)
class _Dense:
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
    def per_unit(w: Vec, blocks: int, n_out: int, n_in: int) -> _Dense:
        """Resolved: from the weight's values (actual, or drawn for a meta tensor)."""
        w2 = w * w
        w_mean = w.reshape(blocks, -1).mean(axis=1)
        w_second = w2.reshape(blocks, -1).mean(axis=1)
        return _Dense(blocks, n_out, n_in, w_mean, w_second, w, w2, w2.sum(axis=1))

    @staticmethod
    def block_stats(t: torch.Tensor, blocks: int, n_out: int, n_in: int,
                    default_var: float) -> _Dense:
        """Summarised: each block's mean and second moment, the default init's for meta.

        Block by block in float64, so a module too large to resolve is never copied whole.
        """
        if t.is_meta:
            return _Dense(blocks, n_out, n_in, np.zeros(blocks), np.full(blocks, default_var))
        means, seconds = np.zeros(blocks), np.zeros(blocks)
        with torch.no_grad():
            for j in range(blocks):
                part = t.detach()[j * n_out : (j + 1) * n_out].to("cpu", torch.float64)
                means[j], seconds[j] = float(part.mean()), float((part * part).mean())
        return _Dense(blocks, n_out, n_in, means, seconds)

    def summary(self) -> _Dense:
        """The same block, by its statistics only."""
        return _Dense(self.blocks, self.n_out, self.n_in, self.w_mean, self.w_second)

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
class _Bias:
    """Stacked gate biases: per-unit values (variance 0) or per-block mean and spread."""

    mean: Vec
    var: Vec


def _bias(parts: list[Vec | None], blocks: int, default_var: float, per_unit: bool) -> _Bias:
    """Sum of stacked bias vectors (``b_ih + b_hh``); ``None`` (meta) adds the default spread."""
    if not parts:
        return _Bias(np.zeros(1), np.zeros(1))
    known = [v for v in parts if v is not None]
    unknown = len(parts) - len(known)
    if not known:
        return _Bias(np.zeros(blocks), np.full(blocks, unknown * default_var))
    total: Vec = np.sum(known, axis=0)
    if per_unit and unknown == 0:
        return _Bias(total, np.zeros_like(total))
    per_block = total.reshape(blocks, -1)
    return _Bias(per_block.mean(axis=1), per_block.var(axis=1) + unknown * default_var)


@dataclass(frozen=True)
class _Mom:
    """Per-unit (or block) mean and second moment."""

    mean: Vec
    second: Vec

    @staticmethod
    def scalar(mean: float, second: float) -> _Mom:
        return _Mom(np.array([float(mean)]), np.array([float(second)]))

    def clamped(self) -> _Mom:
        """Exploding states stop at 1e200 (like ``activations.VAR_MAX``): no inf or NaN."""
        mean = np.clip(np.nan_to_num(self.mean, nan=0.0), -_MEAN_MAX, _MEAN_MAX)
        second = np.clip(np.nan_to_num(self.second, nan=_SECOND_MAX), 0.0, _SECOND_MAX)
        return _Mom(mean, np.maximum(second, mean * mean))

    def close(self, other: _Mom, rtol: float) -> bool:
        scale = max(float(np.max(np.abs(self.second))), 1e-300)
        return bool(np.allclose(self.mean, other.mean, rtol=rtol, atol=rtol * math.sqrt(scale))
                    and np.allclose(self.second, other.second, rtol=rtol, atol=rtol * scale))


_ZERO = _Mom.scalar(0.0, 0.0)


# --------------------------------------------------------------------------------------------
# One step of a cell
# --------------------------------------------------------------------------------------------

#: A path coefficient of the step Jacobian: (per-unit mean, per-unit second moment).
Coef = tuple[Vec, Vec]


@dataclass
class _Step:
    """The new state's moments and the step's path coefficients for the backward pass."""

    h: _Mom
    c: _Mom
    coef: dict[str, Coef]


@dataclass(frozen=True)
class _Mats:
    """Full weight matrices for the surrogate backward (sampled where they are meta)."""

    w_ih: Vec  # (gates * H, input)
    w_hh: Vec  # (gates * H, out)
    w_hr: Vec | None  # (out, H), LSTM projection


_N_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@dataclass(frozen=True)
class _Cell:
    """One direction of one layer (or a ``*Cell`` module), gate blocks in PyTorch's order.

    LSTM i, f, g, o; GRU r, z, n; RNN one block. ``bias`` is ``b_ih + b_hh`` per block; the
    GRU keeps ``b_in`` and ``b_hn`` apart because ``b_hn`` sits inside ``r * (W_hn h + b_hn)``.
    ``proj`` is an LSTM's ``weight_hr``. ``unit`` is the length of one block's arrays: the
    hidden size per unit, 1 with block statistics.
    """

    kind: str  # "lstm", "gru", "rnn_tanh", "rnn_relu"
    input_size: int
    hidden: int
    out_size: int
    unit: int
    ih: _Dense
    hh: _Dense
    bias: _Bias
    b_in: _Bias
    b_hn: _Bias
    proj: _Dense | None
    tensors: tuple[torch.Tensor | None, ...] = field(repr=False, compare=False)
    realized: _Mats | None = field(default=None, repr=False, compare=False)

    def summarised(self) -> _Cell:
        """This cell with block statistics (for the O(T) mean-field backward)."""
        proj = self.proj.summary() if self.proj is not None else None
        return dataclasses.replace(self, unit=1, ih=self.ih.summary(), hh=self.hh.summary(),
                                   proj=proj)

    def _blk(self, a: Vec, j: int) -> Vec:
        return a[j * self.unit : (j + 1) * self.unit]

    def _stack(self, *parts: Vec) -> Vec:
        return np.concatenate([np.broadcast_to(p, (self.unit,)) for p in parts])

    # forward -------------------------------------------------------------------------------
    def step(self, x: _Mom, h: _Mom, c: _Mom, settle: bool = False) -> _Step:
        """One step of the moments.

        ``settle``: put the slow state (LSTM ``c``, GRU ``h``) at its stationary value for
        the current gates; the fixed-point search iterates that map, which converges in tens
        of iterations where plain steps need ~1 / (1 - f^2).
        """
        with np.errstate(over="ignore", invalid="ignore"):
            st = self._step(x, h, c, settle)
        return _Step(st.h.clamped(), st.c.clamped(), st.coef)

    def _step(self, x: _Mom, h: _Mom, c: _Mom, settle: bool) -> _Step:
        xm, xv = self.ih.forward(x.mean, x.second)
        hm, hv = self.hh.forward(h.mean, h.second)
        if self.kind == "lstm":
            return self._lstm(xm + hm + self.bias.mean, xv + hv + self.bias.var, c, settle)
        if self.kind == "gru":
            return self._gru(xm, xv, hm, hv, h, settle)
        phi = gate_moments("relu" if self.kind == "rnn_relu" else "tanh",
                           xm + hm + self.bias.mean, xv + hv + self.bias.var)
        return _Step(_Mom(phi.m1, phi.m2), _ZERO, {"p": (phi.d1, phi.d2)})

    def _lstm(self, am: Vec, av: Vec, c: _Mom, settle: bool) -> _Step:
        b = self._blk
        sig = gate_moments("sigmoid", self._stack(b(am, 0), b(am, 1), b(am, 3)),
                           self._stack(b(av, 0), b(av, 1), b(av, 3)))
        i, f, o = sig.part(0, self.unit), sig.part(1, self.unit), sig.part(2, self.unit)
        g = gate_moments("tanh", b(am, 2), b(av, 2))
        ig_mean, ig_second = i.m1 * g.m1, i.m2 * g.m2
        if settle:
            c_mean = ig_mean / np.maximum(1.0 - f.m1, 1e-12)
            c_second = (ig_second + 2.0 * f.m1 * c_mean * ig_mean) / np.maximum(1.0 - f.m2,
                                                                                 1e-12)
        else:
            c_mean = f.m1 * c.mean + ig_mean
            c_second = f.m2 * c.second + ig_second + 2.0 * f.m1 * c.mean * ig_mean
        c_second = np.maximum(c_second, c_mean * c_mean)
        tc = gate_moments("tanh", c_mean, c_second - c_mean * c_mean)
        out = _Mom(o.m1 * tc.m1, o.m2 * tc.m2)
        if self.proj is not None:
            pm, pv = self.proj.forward(out.mean, out.second)
            out = _Mom(pm, pv + pm * pm)
        c_prev = _Mom(c_mean, c_second) if settle else c
        coef = {
            "K": (o.m1 * tc.d1, o.m2 * tc.d2),  # h_t -> c_t within the step
            "F": (f.m1, f.m2),  # c_t -> c_{t-1}
            "i": (g.m1 * i.d1, g.m2 * i.d2),  # c_t -> input-gate pre-activation
            "f": (c_prev.mean * f.d1, c_prev.second * f.d2),
            "g": (i.m1 * g.d1, i.m2 * g.d2),
            "o": (tc.m1 * o.d1, tc.m2 * o.d2),  # h_t -> output-gate pre-activation
        }
        return _Step(out, _Mom(c_mean, c_second), coef)

    def _gru(self, xm: Vec, xv: Vec, hm: Vec, hv: Vec, h: _Mom, settle: bool) -> _Step:
        b = self._blk
        am, av = xm + hm + self.bias.mean, xv + hv + self.bias.var
        sig = gate_moments("sigmoid", self._stack(b(am, 0), b(am, 1)),
                           self._stack(b(av, 0), b(av, 1)))
        r, z = sig.part(0, self.unit), sig.part(1, self.unit)
        um, uv = b(xm, 2) + self.b_in.mean, b(xv, 2) + self.b_in.var
        vm, vv = b(hm, 2) + self.b_hn.mean, b(hv, 2) + self.b_hn.var
        v2 = vv + vm * vm
        an_mean = um + r.m1 * vm
        an_second = uv + um * um + 2.0 * um * r.m1 * vm + r.m2 * v2
        n = gate_moments("tanh", an_mean, an_second - an_mean * an_mean)
        keep, keep2 = 1.0 - z.m1, 1.0 - 2.0 * z.m1 + z.m2  # E[1 - z], E[(1 - z)^2]
        cross = 2.0 * (z.m1 - z.m2) * n.m1  # 2 E[z (1 - z)] E[n], times E[h]
        if settle:
            h_mean = np.broadcast_to(n.m1, keep.shape)
            h_second = (keep2 * n.m2 + cross * h_mean) / np.maximum(1.0 - z.m2, 1e-12)
        else:
            h_mean = keep * n.m1 + z.m1 * h.mean
            h_second = keep2 * n.m2 + z.m2 * h.second + cross * h.mean
        hn2 = np.maximum(h.second + n.m2 - 2.0 * h.mean * n.m1, 0.0)  # E[(h - n)^2]
        coef = {
            "Z": (z.m1, z.m2),  # h' -> h directly
            "n": (keep * n.d1, keep2 * n.d2),  # h' -> n pre-activation
            "hn": (r.m1 * keep * n.d1, r.m2 * keep2 * n.d2),  # h' -> W_hn h + b_hn
            "z": ((h.mean - n.m1) * z.d1, hn2 * z.d2),
            "r": (keep * n.d1 * vm * r.d1, keep2 * n.d2 * v2 * r.d2),
        }
        return _Step(_Mom(h_mean, np.maximum(h_second, h_mean * h_mean)), _ZERO, coef)

    # mean-field backward -------------------------------------------------------------------
    def back(self, sh: Vec, sc: Vec, k: dict[str, Coef],
             which: int = 1) -> tuple[Vec, Vec, Vec]:
        """(s_h, s_c at t-1; s_x at t) per element, from s_h (entry added) and s_c at t.

        Independent-step mean field: ``which=1`` uses the coefficients' second moments,
        ``which=0`` their squared means (the gains of the time-averaged Jacobian).
        """

        def p(name: str) -> Vec:
            return k[name][1] if which else k[name][0] ** 2

        zero = np.zeros(1)
        if self.kind == "lstm":
            s_raw = self.proj.backward(sh) if self.proj is not None else sh
            s_u = sc + p("K") * s_raw
            s_a = self._stack(p("i") * s_u, p("f") * s_u, p("g") * s_u, p("o") * s_raw)
            return self.hh.backward(s_a), p("F") * s_u, self.ih.backward(s_a)
        if self.kind == "gru":
            s_r, s_z = p("r") * sh, p("z") * sh
            s_h = p("Z") * sh + self.hh.backward(self._stack(s_r, s_z, p("hn") * sh))
            return s_h, zero, self.ih.backward(self._stack(s_r, s_z, p("n") * sh))
        s_a = self._stack(p("p") * sh)
        return self.hh.backward(s_a), zero, self.ih.backward(s_a)

    # surrogate backward --------------------------------------------------------------------
    def mats(self, rng: np.random.Generator) -> _Mats:
        """The matrices the forward used, else the actual ones or default-init draws."""
        if self.realized is not None:
            return self.realized
        bound = 1.0 / math.sqrt(self.hidden)
        w_ih_t, w_hh_t, w_hr_t = self.tensors
        w_ih, w_hh, w_hr = (_realize(t, bound, rng) for t in (w_ih_t, w_hh_t, w_hr_t))
        assert w_ih is not None and w_hh is not None
        return _Mats(w_ih, w_hh, w_hr)

    def simulate(self, steps: list[_Step], entry: Vec, rng: np.random.Generator,
                 mats: _Mats) -> Vec:
        """Probe gradients at each ``x_t`` (T, input, probes) from entries at each ``h_t``.

        Each step applies ``J_t^T`` with the actual ``W`` and every gate coefficient drawn as
        mean + sd * N(0, 1) per unit and probe, independently per step: mean field for the
        gates, the weights kept tied.
        """
        n_steps, _, probes = entry.shape
        n = self.hidden
        out = np.zeros((n_steps, self.input_size, probes))
        gh = np.zeros((self.out_size, probes))
        gc = np.zeros((n, probes))
        cache: dict[int, dict[str, tuple[Vec, Vec]]] = {}
        # Contiguous transposes: OpenBLAS took 100x longer on the transposed views (measured).
        w_ih_t, w_hh_t = np.ascontiguousarray(mats.w_ih.T), np.ascontiguousarray(mats.w_hh.T)
        w_hr_t = np.ascontiguousarray(mats.w_hr.T) if mats.w_hr is not None else None
        for t in range(n_steps - 1, -1, -1):
            st = steps[t]
            coef = cache.get(id(st))
            if coef is None:
                coef = {key: (np.broadcast_to(m, (n,))[:, None],
                              np.broadcast_to(np.sqrt(np.maximum(q - m * m, 0.0)), (n,))[:, None])
                        for key, (m, q) in st.coef.items()}
                cache[id(st)] = coef
            draws = iter(rng.standard_normal((len(coef), n, probes)))

            def draw(name: str, _coef: dict[str, tuple[Vec, Vec]] = coef,
                     _draws: Iterator[Vec] = draws) -> Vec:
                mean, sd = _coef[name]
                return mean + sd * next(_draws)

            gh = gh + entry[t]
            if self.kind == "lstm":
                g_raw = w_hr_t @ gh if w_hr_t is not None else gh
                u = gc + draw("K") * g_raw
                da = np.concatenate([draw("i") * u, draw("f") * u, draw("g") * u,
                                     draw("o") * g_raw])
                gc = draw("F") * u
                out[t] = w_ih_t @ da
                gh = w_hh_t @ da
                if not np.abs(gc).max(initial=0.0) > _FLUSH:
                    gc[:] = 0.0
            elif self.kind == "gru":
                da_r, da_z = draw("r") * gh, draw("z") * gh
                out[t] = w_ih_t @ np.concatenate([da_r, da_z, draw("n") * gh])
                gh = draw("Z") * gh + w_hh_t @ np.concatenate([da_r, da_z, draw("hn") * gh])
            else:
                da = draw("p") * gh
                out[t] = w_ih_t @ da
                gh = w_hh_t @ da
            peak = np.abs(gh).max(initial=0.0)
            if not peak > _FLUSH:
                gh[:] = 0.0
            elif peak > _GRAD_MAX or not math.isfinite(peak):
                np.clip(np.nan_to_num(gh, nan=0.0), -_GRAD_MAX, _GRAD_MAX, out=gh)
                np.clip(np.nan_to_num(gc, nan=0.0), -_GRAD_MAX, _GRAD_MAX, out=gc)
                np.clip(np.nan_to_num(out[t], nan=0.0), -_GRAD_MAX, _GRAD_MAX, out=out[t])
        return out

    # chi through time ----------------------------------------------------------------------
    def _gains(self, k: dict[str, Coef], which: int) -> dict[str, float]:
        """Unit-averaged per-step gains for the 2x2 (LSTM) or 1x1 step operator."""

        def p2(name: str) -> Vec:
            return k[name][1] if which else k[name][0] ** 2

        if self.kind == "lstm":
            hr = self.proj.gain() if self.proj is not None else 1.0
            return {
                "igf": sum(self.hh.gain(j, p2(name)) for j, name in enumerate("ifg")),
                "o": self.hh.gain(3, p2("o")) * hr,
                "K": float(np.mean(p2("K"))) * hr,
                "F": float(np.mean(p2("F"))),
            }
        if self.kind == "gru":
            w = self.hh.gain(0, p2("r")) + self.hh.gain(1, p2("z")) + self.hh.gain(2, p2("hn"))
            return {"Z": float(np.mean(p2("Z"))), "W": w}
        return {"Z": 0.0, "W": self.hh.gain(0, p2("p"))}

    def chi(self, k: dict[str, Coef], which: int = 1) -> float:
        """Largest eigenvalue of the independent-step mean-field map (s_h, s_c) -> t-1."""
        g = self._gains(k, which)
        if self.kind != "lstm":
            return g["Z"] + g["W"]
        # (s_h, s_c) -> (o s_h + igf (s_c + K s_h), F (s_c + K s_h))
        a, b = g["o"] + g["igf"] * g["K"], g["igf"]
        c, d = g["F"] * g["K"], g["F"]
        tr, det = a + d, a * d - b * c
        return 0.5 * (tr + math.sqrt(max(tr * tr - 4.0 * det, 0.0)))

    def coherent_radius(self, k: dict[str, Coef]) -> float:
        """Spectral radius of the time-averaged step Jacobian ``M``, by the circular law.

        GRU / RNN: ``diag(a) + U``, ``U`` circular of radius ``b``: ``a + b``. LSTM: folding the
        cell path in, ``lambda dh = U(lambda) dh`` where the paths through ``c`` carry
        ``K lambda / (lambda - F)``; the radius is the largest real ``lambda > F`` with
        ``lambda^2 = radius(U(lambda))^2``.
        """
        g = self._gains(k, 0)
        if self.kind != "lstm":
            return math.sqrt(g["Z"]) + math.sqrt(g["W"])
        f_bar = math.sqrt(g["F"])

        def excess(lam: float) -> float:
            gap = lam - f_bar
            return lam * lam - g["igf"] * g["K"] * lam * lam / (gap * gap) - g["o"]

        lo, hi = f_bar, max(2.0 * f_bar, 1e-3)
        while excess(hi) < 0.0 and hi < 1e150:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            lo, hi = (mid, hi) if excess(mid) < 0.0 else (lo, mid)
        return hi

    def step_gain(self, k: dict[str, Coef]) -> float:
        """Asymptotic per-step gain of the squared gradient norm, weights tied.

        ``M`` (radius ``rho``, mean-field gain ``m``) is matched to ``a I + b U`` with
        ``a + b = rho``, ``a^2 + b^2 = m``; the fluctuations, of gain ``sigma^2`` = mean-field
        chi - ``m``, feed its resolvent: the rate is the ``lambda`` with
        ``sigma^2 G(1/lambda) / lambda = 1``, ``G(x) = sum_k x^k ||(a + bU)^k||^2 / n`` =
        ``1 / sqrt((1 - (a^2 + b^2) x)^2 - 4 a^2 b^2 x^2)``. Pure noise gives the mean-field chi
        back, pure coherence ``rho^2``.
        """
        chi_mf = self.chi(k, 1)
        m = self.chi(k, 0)
        if not (math.isfinite(chi_mf) and math.isfinite(m)):
            return math.inf
        rho = self.coherent_radius(k)
        rho2 = rho * rho
        sigma2 = max(chi_mf - m, 0.0)
        ab = min(max(0.5 * (rho2 - m), 0.0), 0.25 * rho2)
        if sigma2 <= 0.0 or ab <= 0.0:
            return max(rho2, chi_mf)
        s2 = max(m, 2.0 * ab)

        def lhs(lam: float) -> float:
            x = 1.0 / lam
            disc = (1.0 - s2 * x) ** 2 - 4.0 * ab * ab * x * x
            return sigma2 * x / math.sqrt(disc) if disc > 0.0 else math.inf

        lo, hi = rho2, rho2 + sigma2
        while lhs(hi) > 1.0 and hi < 1e300:
            hi *= 2.0
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if not lo < mid < hi:
                break
            lo, hi = (mid, hi) if lhs(mid) > 1.0 else (lo, mid)
        return hi


# --------------------------------------------------------------------------------------------
# Building cells from modules
# --------------------------------------------------------------------------------------------

def _kind(module: nn.Module) -> str:
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        mode = getattr(module, "nonlinearity", "tanh")
        if mode not in ("tanh", "relu"):
            raise NotImplementedError(f"RNN nonlinearity {mode!r} is not modelled")
        return f"rnn_{mode}"
    raise NotImplementedError(f"{type(module).__name__} is not a recurrent module gradscope "
                              "models")


def _int(module: nn.Module, name: str) -> int:
    value = getattr(module, name, 0)
    return int(value or 0) if isinstance(value, (int, bool)) else 0


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _realize(t: torch.Tensor | None, bound: float,
             rng: np.random.Generator | None) -> Vec | None:
    """A parameter's values; for a meta tensor a draw from ``U(-bound, bound)`` when ``rng``
    is given (resolving units), else ``None`` (block statistics use the init's variance)."""
    if t is None:
        return None
    values = _values(t)
    if values is not None or rng is None:
        return values
    out: Vec = rng.uniform(-bound, bound, size=tuple(t.shape))
    return out


def _cell_from(module: nn.Module, kind: str, suffix: str, input_size: int,
               rng: np.random.Generator | None) -> _Cell:
    """The gate blocks of ``weight_ih{suffix}`` etc. in PyTorch's gate order.

    With ``rng`` the cell is resolved per unit, meta tensors drawn from PyTorch's declared
    default init (so a meta module is estimated as a typical freshly initialised one); without,
    each gate block is summarised by its statistics.
    """
    hidden = _int(module, "hidden_size")
    proj_size = _int(module, "proj_size")
    out_size = proj_size or hidden
    bound = 1.0 / math.sqrt(hidden)  # U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias
    default_var = bound * bound / 3.0
    w_ih_t = _param(module, f"weight_ih{suffix}")
    w_hh_t = _param(module, f"weight_hh{suffix}")
    w_hr_t = _param(module, f"weight_hr{suffix}") if proj_size else None
    g = _N_GATES[kind]
    if (w_ih_t is None or w_hh_t is None or tuple(w_ih_t.shape) != (g * hidden, input_size)
            or tuple(w_hh_t.shape) != (g * hidden, out_size)
            or (proj_size and (w_hr_t is None or tuple(w_hr_t.shape) != (out_size, hidden)))):
        raise NotImplementedError(f"{type(module).__name__}: weights{suffix} are missing or "
                                  "not shaped as PyTorch declares them")
    per_unit = rng is not None
    biases = [(_realize(t, bound, rng), t is not None) for t in
              (_param(module, f"bias_ih{suffix}"), _param(module, f"bias_hh{suffix}"))]
    b_ih, b_hh = (v for v, _ in biases)
    present = [v for v, there in biases if there]
    realized = None
    proj = None
    if rng is not None:
        w_ih, w_hh, w_hr = (_realize(t, bound, rng) for t in (w_ih_t, w_hh_t, w_hr_t))
        assert w_ih is not None and w_hh is not None
        realized = _Mats(w_ih, w_hh, w_hr)
        ih = _Dense.per_unit(w_ih, g, hidden, input_size)
        hh = _Dense.per_unit(w_hh, g, hidden, out_size)
        if w_hr is not None:
            proj = _Dense.per_unit(w_hr, 1, out_size, hidden)
    else:
        ih = _Dense.block_stats(w_ih_t, g, hidden, input_size, default_var)
        hh = _Dense.block_stats(w_hh_t, g, hidden, out_size, default_var)
        if w_hr_t is not None:
            proj = _Dense.block_stats(w_hr_t, 1, out_size, hidden, default_var)
    bias = _bias(present, g, default_var, per_unit)
    b_in = b_hn = _Bias(np.zeros(1), np.zeros(1))
    if kind == "gru":  # b_hn sits inside r * (W_hn h + b_hn): kept apart from b_in
        b_in = _bias([None if b_ih is None else b_ih[2 * hidden :]] if biases[0][1] else [], 1,
                     default_var, per_unit)
        b_hn = _bias([None if b_hh is None else b_hh[2 * hidden :]] if biases[1][1] else [], 1,
                     default_var, per_unit)
    return _Cell(kind, input_size, hidden, out_size, hidden if per_unit else 1, ih, hh, bias,
                 b_in, b_hn, proj, (w_ih_t, w_hh_t, w_hr_t), realized)


def _per_unit(module: nn.Module, n_steps: int = 1) -> bool:
    """Whether resolving units stays within budget (meta modules included: they are drawn)."""
    gate_weights = sum(p.numel() for name, p in module.named_parameters()
                       if name.startswith(("weight_ih", "weight_hh")))
    return gate_weights * min(n_steps, 500) <= _PER_UNIT_BUDGET


# --------------------------------------------------------------------------------------------
# Unrolling in time
# --------------------------------------------------------------------------------------------


def _pack(st: _Step) -> Vec:
    return np.concatenate([st.h.mean, st.h.second, st.c.mean, st.c.second])


def _unpack(v: Vec, like: _Step) -> tuple[_Mom, _Mom]:
    sizes = [like.h.mean.size, like.h.second.size, like.c.mean.size, like.c.second.size]
    hm, hq, cm, cq = np.split(v, np.cumsum(sizes)[:-1])
    return _Mom(hm, np.maximum(hq, hm * hm)), _Mom(cm, np.maximum(cq, cm * cm))


def _anderson(cell: _Cell, x: _Mom, start: _Step, settle: bool,
              iters: int) -> tuple[_Step, bool]:
    """Anderson-accelerated fixed-point iteration of ``cell.step`` on the state moments."""
    st = start
    s = _pack(st)
    hist_g: list[Vec] = []
    hist_f: list[Vec] = []
    for _ in range(iters):
        h, c = _unpack(s, st)
        st = cell.step(x, h, c, settle=settle)
        g = _pack(st)
        f = g - s
        if not np.all(np.isfinite(g)):
            return start, False
        if float(np.max(np.abs(f))) <= _FIXED_POINT_RTOL * (float(np.max(np.abs(g))) or 1.0):
            return st, True
        hist_g.append(g)
        hist_f.append(f)
        if len(hist_f) > _ANDERSON_MEMORY + 1:
            hist_g.pop(0)
            hist_f.pop(0)
        s = g
        if len(hist_f) > 1:
            d_f = np.diff(np.stack(hist_f, axis=1), axis=1)
            d_g = np.diff(np.stack(hist_g, axis=1), axis=1)
            gamma, *_ = np.linalg.lstsq(d_f, f, rcond=None)
            if np.all(np.isfinite(gamma)):
                s = g - d_g @ gamma
    return st, False


def _fixed_point(cell: _Cell, x: _Mom) -> _Step:
    """The stationary step for a constant input: where chi through time is evaluated.

    Plain steps relax at the slowest gate's rate (~0.987 per step for an LSTM at forget bias
    3: 3000 steps to 1e-16). Solving for the slow state in closed form and iterating that
    ("settle") is unstable alone, because the per-unit cell means feed back through
    ``1 / (1 - f)`` ~ 20; with Anderson acceleration (mixing the last iterates, GMRES-like) it
    converges in 20-150 iterations. Where even that fails (forget bias 5 and up, where the
    per-unit moment map wanders instead of settling) the state after a few hundred plain steps
    stands in for it: h's second moment is then steady to a few percent.
    """
    zero_state = _Step(_ZERO, _ZERO, {})
    start = cell.step(x, _ZERO, _ZERO)
    st, ok = _anderson(cell, x, start, True, _MAX_FIXED_POINT_ITER)
    if ok:
        # One ordinary step at the fixed point gives the coefficients in the recursion's form.
        return cell.step(x, st.h, st.c)
    st = zero_state
    for _ in range(_MAX_PLAIN_STEPS):
        nxt = cell.step(x, st.h, st.c)
        if nxt.h.close(st.h, _FIXED_POINT_RTOL) and nxt.c.close(st.c, _FIXED_POINT_RTOL):
            return nxt
        st = nxt
    return st


def _run_forward(cell: _Cell, xs: list[_Mom], x_stat: _Mom, fixed: _Step) -> list[_Step]:
    """Step the state moments from h_0 = c_0 = 0 through the input moments ``xs``.

    Once the input is the stationary input and the state has reached the fixed point, the
    fixed point's step is reused for the rest of the sequence.
    """
    h, c = _ZERO, _ZERO
    steps: list[_Step] = []
    settled = False
    for x in xs:
        settled = settled and x is x_stat
        if not settled and x is x_stat and steps and (
                h.close(fixed.h, _STATIONARY_RTOL) and c.close(fixed.c, _STATIONARY_RTOL)):
            settled = True
        st = fixed if settled else cell.step(x, h, c)
        steps.append(st)
        h, c = st.h, st.c
    return steps


def _run_mean_field(cell: _Cell, steps: list[_Step], entry: list[Vec]) -> list[Vec]:
    """Per-element squared gradient at each x_t from per-element entries at each h_t."""
    sh, sc = np.zeros(1), np.zeros(1)
    sx: list[Vec] = [np.zeros(1)] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        sh, sc, sx[t] = cell.back(sh + entry[t], sc, steps[t].coef)
    return sx


def _concat(parts: list[_Mom], sizes: list[int], per_unit: bool) -> _Mom:
    """The next layer's input: both directions' outputs side by side."""
    if len(parts) == 1:
        return parts[0]
    if not per_unit:
        return _Mom(np.array([np.mean([float(np.mean(p.mean)) for p in parts])]),
                    np.array([np.mean([float(np.mean(p.second)) for p in parts])]))
    pairs = list(zip(parts, sizes, strict=True))
    return _Mom(np.concatenate([np.broadcast_to(p.mean, (n,)) for p, n in pairs]),
                np.concatenate([np.broadcast_to(p.second, (n,)) for p, n in pairs]))


@dataclass(frozen=True)
class RecurrentEstimate:
    """What a recurrent layer does to the signal and to the gradient.

    ``input_gain``: squared-norm gain ``S_x / S_out`` from the whole output sequence back to
    the whole input sequence, the gradient entering as ``entry`` says. ``step_gain``: chi
    through time, the per-step gain of the squared gradient norm going back one step in the
    stationary regime (the largest over layers and directions: it sets how fast the gradient
    at ``x_t`` decays with the distance from where it entered). ``h_second``: the stationary
    second moment of the top layer's output.
    """

    out_mean: float
    out_second: float
    h_second: float
    input_gain: float
    step_gain: float
    steps: int
    note: str


@dataclass
class _Result:
    estimate: RecurrentEstimate
    profile: list[float]


def _dropout(module: nn.Module) -> float:
    p = float(getattr(module, "dropout", 0.0) or 0.0)
    return p if module.training and 0.0 < p < 1.0 else 0.0


def _total(s: Vec, n: int) -> float:
    return n * float(np.mean(s))


@dataclass
class _Forward:
    layers: list[list[_Cell]]
    steps: list[list[list[_Step]]]  # [layer][direction][position]
    fixed: list[list[_Step]]  # [layer][direction]
    out: list[_Mom]  # top layer output per position
    out_stat: _Mom


def _forward(module: nn.Module, kind: str, x_mean: float, x_second: float,
             n_steps: int) -> _Forward:
    per_unit = _per_unit(module, n_steps)
    rng = np.random.default_rng(_SEED) if per_unit else None
    dirs = 2 if module.bidirectional else 1
    out_size = _int(module, "proj_size") or _int(module, "hidden_size")
    drop = _dropout(module)
    x_stat = _Mom.scalar(x_mean, x_second)
    xs: list[_Mom] = [x_stat] * n_steps
    fw = _Forward([], [], [], xs, x_stat)
    for li in range(_int(module, "num_layers")):
        size = _int(module, "input_size") if li == 0 else dirs * out_size
        cells = [_cell_from(module, kind, s, size, rng)
                 for s in [f"_l{li}", f"_l{li}_reverse"][:dirs]]
        fixed = [_fixed_point(cell, x_stat) for cell in cells]
        per_dir = []
        for d, cell in enumerate(cells):
            st = _run_forward(cell, xs if d == 0 else xs[::-1], x_stat, fixed[d])
            per_dir.append(st if d == 0 else st[::-1])
        fw.layers.append(cells)
        fw.steps.append(per_dir)
        fw.fixed.append(fixed)
        scale = 1.0 / (1.0 - drop) if li < _int(module, "num_layers") - 1 else 1.0
        sizes = [c.out_size for c in cells]

        def scaled(m: _Mom, s: float = scale) -> _Mom:
            return m if s == 1.0 else _Mom(m.mean, s * m.second)

        new_stat = scaled(_concat([f.h for f in fixed], sizes, per_unit))
        nxt = []
        for t in range(n_steps):
            if all(p[t] is f for p, f in zip(per_dir, fixed, strict=True)):
                nxt.append(new_stat)  # identity marks the stationary input for the next layer
            else:
                nxt.append(scaled(_concat([p[t].h for p in per_dir], sizes, per_unit)))
        xs, x_stat = nxt, new_stat
        fw.out, fw.out_stat = xs, x_stat
    return fw


def _probes(fw: _Forward, n_steps: int) -> int:
    """How many probe gradients the budget allows (0: use the independent-step mean field)."""
    per_probe = n_steps * sum(
        c.hidden * _N_GATES[c.kind] * (c.input_size + c.out_size)
        + (c.hidden * c.out_size if c.proj is not None else 0)
        for cells in fw.layers for c in cells)
    d_in = fw.layers[0][0].input_size
    want = int(min(max(math.ceil(_PROBE_TARGET / max(d_in, 1)), _PROBES_MIN), _PROBES_MAX))
    affordable = int(_SIM_BUDGET // max(per_probe, 1))
    widest = max(max(c.input_size, c.out_size) for cells in fw.layers for c in cells)
    # Three (T, features, probes) float64 arrays live at once.
    storable = int(_SIM_MEMORY // (24 * n_steps * max(widest, 1)))
    k = min(want, affordable, storable)
    return k if k >= _PROBES_MIN else 0


def _backward_simulated(fw: _Forward, n_steps: int, entry: Entry, probes: int,
                        drop: float) -> list[float]:
    rng = np.random.default_rng(_SEED)
    top = fw.layers[-1]
    n_out = sum(c.out_size for c in top)
    e = np.zeros((n_steps, n_out, probes))
    if entry == "last":
        e[-1] = rng.standard_normal((n_out, probes))
    else:
        e[:] = rng.standard_normal((n_steps, n_out, probes))
    s_out = float(np.sum(e * e))
    grads = e
    for li in range(len(fw.layers) - 1, -1, -1):
        cells = fw.layers[li]
        total: Vec | None = None
        start = 0
        for d, cell in enumerate(cells):
            part = grads[:, start : start + cell.out_size, :]
            start += cell.out_size
            mats = cell.mats(rng)
            if d == 1:
                gx = cell.simulate(fw.steps[li][d][::-1], part[::-1], rng, mats)[::-1]
            else:
                gx = cell.simulate(fw.steps[li][d], part, rng, mats)
            total = gx if total is None else total + gx
        assert total is not None
        if li > 0 and drop:
            total = total * (rng.random(total.shape) >= drop) / (1.0 - drop)
        grads = total
    return [float(v) for v in np.sum(grads * grads, axis=(1, 2)) / s_out]


def _summarised(steps: list[_Step]) -> list[_Step]:
    """Steps with unit-averaged coefficients (shared steps stay shared)."""
    done: dict[int, _Step] = {}
    out = []
    for st in steps:
        if id(st) not in done:
            coef = {k: (np.array([float(np.mean(m))]), np.array([float(np.mean(q))]))
                    for k, (m, q) in st.coef.items()}
            done[id(st)] = _Step(st.h, st.c, coef)
        out.append(done[id(st)])
    return out


def _backward_mean_field(fw: _Forward, n_steps: int, entry: Entry,
                         drop: float) -> list[float]:
    """Independent-step mean field with block statistics: O(T), for what is too big to simulate.

    Block statistics even where the forward was resolved per unit: a per-unit recursion would
    cost about as much as the simulation that was just ruled out.
    """
    top = fw.layers[-1]
    n_out = sum(c.out_size for c in top)
    zero = np.zeros(1)
    if entry == "last":
        first = [zero] * (n_steps - 1) + [np.array([1.0 / n_out])]
        entries = [first for _ in top]
    else:
        entries = [[np.array([1.0 / (n_steps * n_out)])] * n_steps for _ in top]
    sx_total: list[Vec] = []
    for li in range(len(fw.layers) - 1, -1, -1):
        cells = fw.layers[li]
        sx_dirs = []
        for d, full in enumerate(cells):
            cell = full.summarised()
            st, ent = _summarised(fw.steps[li][d]), entries[d]
            if d == 1:
                sx_dirs.append(_run_mean_field(cell, st[::-1], ent[::-1])[::-1])
            else:
                sx_dirs.append(_run_mean_field(cell, st, ent))
        sx_total = [sum(v, zero) for v in zip(*sx_dirs, strict=True)]
        if li > 0:
            scale = 1.0 / (1.0 - drop) if drop else 1.0
            entries = [[s * scale for s in sx_total] for _ in fw.layers[li - 1]]
    d_in = fw.layers[0][0].input_size
    return [_total(s, d_in) for s in sx_total]


def _run(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
         entry: Entry) -> _Result:
    if not isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        raise NotImplementedError(f"{type(module).__name__} is not nn.LSTM / nn.GRU / nn.RNN")
    kind = _kind(module)
    n_steps = int(seq_len)
    if n_steps < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not (math.isfinite(x_mean) and math.isfinite(x_second)):
        raise ValueError(f"input moments must be finite, got {x_mean!r}, {x_second!r}")
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return _run_checked(module, kind, x_mean, x_second, n_steps, entry)


def _run_checked(module: nn.Module, kind: str, x_mean: float, x_second: float, n_steps: int,
                 entry: Entry) -> _Result:
    fw = _forward(module, kind, x_mean, max(x_second, x_mean * x_mean), n_steps)
    drop = _dropout(module)
    probes = _probes(fw, n_steps)
    if probes:
        profile = _backward_simulated(fw, n_steps, entry, probes, drop)
        how = f"{probes} surrogate probes"
    else:
        profile = _backward_mean_field(fw, n_steps, entry, drop)
        how = "independent-step mean field (too large to simulate)"

    profile = [v if math.isfinite(v) else math.inf for v in profile]
    rates = [(cell.step_gain(fw.fixed[li][d].coef), li, d)
             for li, cells in enumerate(fw.layers) for d, cell in enumerate(cells)]
    step_gain, li_max, d_max = max(rates)
    where = f" (layer {li_max})" if len(fw.layers) > 1 else ""
    note = _note(fw.layers[li_max][d_max], fw.fixed[li_max][d_max].coef, step_gain,
                 where) + f"; input gradients by {how}"
    out_mean = float(np.mean([np.mean(x.mean) for x in fw.out]))
    out_second = float(np.mean([np.mean(x.second) for x in fw.out]))
    est = RecurrentEstimate(out_mean, out_second, float(np.mean(fw.out_stat.second)),
                            float(sum(profile)), step_gain, n_steps, note)
    return _Result(est, profile)


def _note(cell: _Cell, k: dict[str, Coef], chi: float, where: str) -> str:
    mf = cell.chi(k, 1)
    if cell.kind == "lstm":
        f2 = float(np.mean(k["F"][1]))
        return (f"forget gate E[f^2]={f2:.3g} per step{where}; chi through time {chi:.3g} "
                f"with tied weights (independent steps: {mf:.3g})")
    if cell.kind == "gru":
        z2 = float(np.mean(k["Z"][1]))
        return (f"update gate E[z^2]={z2:.3g} per step{where}; chi through time {chi:.3g} "
                f"with tied weights (independent steps: {mf:.3g})")
    hh = cell.hh.gain()
    d2 = float(np.mean(k["p"][1]))
    return (f"recurrent weight gain {hh:.3g} x E[phi'^2]={d2:.3g}{where}: chi through time "
            f"{chi:.3g}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _entry(entry: str) -> Entry:
    if entry == "last":
        return "last"
    if entry == "uniform":
        return "uniform"
    raise ValueError(f"entry must be 'last' or 'uniform', got {entry!r}")


def estimate_recurrent(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
                       entry: str = "last") -> RecurrentEstimate:
    """Mean-field estimate for ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` over ``seq_len`` steps.

    ``x_mean``, ``x_second``: the input sequence's per-element mean and second moment.
    ``entry``: where the gradient enters the output sequence, ``"last"`` (only the last step,
    as when a head reads ``output[:, -1]``) or ``"uniform"`` (every step equally). Any
    ``num_layers``, ``bidirectional``, ``bias``, LSTM ``proj_size`` and inter-layer dropout
    (training mode) are modelled; other modules raise ``NotImplementedError``. Deterministic:
    the surrogate backward uses a fixed seed.
    """
    return _run(module, x_mean, x_second, seq_len, _entry(entry)).estimate


def input_gradient_profile(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
                           entry: str = "last") -> list[float]:
    """Predicted ``||dL/dx_t||^2 / S_out`` per position ``t``; the sum is ``input_gain``.

    Public because how fast the gradient fades with the distance from its entry, not only its
    total, decides whether the early steps can be learned.
    """
    return _run(module, x_mean, x_second, seq_len, _entry(entry)).profile


def estimate_cell(module: nn.Module, x_mean: float, x_second: float, h_second: float,
                  c_second: float | None = None) -> tuple[float, float, dict[str, float]]:
    """One step of ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell``.

    Returns the new hidden state's (mean, second moment) and the S-gains
    ``||dL/d input||^2 / ||dL/d h'||^2`` to ``"input"``, ``"hx"`` and (LSTM) ``"cx"``, with the
    gradient entering at ``h'`` only. One step has no tied-weight products, so the
    independent-path mean field is the whole story here. The states are taken as zero-mean
    with second moments ``h_second`` and ``c_second``; ``c_second=None`` means zero when
    ``h_second`` is 0 (no state passed) and otherwise the cell state's stationary value for
    these gates, as in a loop that has run for a while.
    """
    if not isinstance(module, (nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
        raise NotImplementedError(f"{type(module).__name__} is not an RNN cell module")
    kind = _kind(module)
    rng = np.random.default_rng(_SEED) if _per_unit(module) else None
    cell = _cell_from(module, kind, "", _int(module, "input_size"), rng)
    x = _Mom.scalar(x_mean, max(x_second, x_mean * x_mean))
    h = _Mom.scalar(0.0, max(h_second, 0.0))
    c = _ZERO
    if kind == "lstm":
        if c_second is not None:
            c = _Mom.scalar(0.0, max(c_second, 0.0))
        elif h_second > 0.0:
            settled = cell.step(x, h, c, settle=True).c
            c = _Mom(np.zeros_like(settled.second), settled.second)
    st = cell.step(x, h, c)
    s_h, s_c, s_x = cell.back(np.array([1.0 / cell.out_size]), np.zeros(1), st.coef)
    gains = {"input": _total(s_x, cell.input_size), "hx": _total(s_h, cell.out_size)}
    if kind == "lstm":
        gains["cx"] = _total(s_c, cell.hidden)
    return float(np.mean(st.h.mean)), float(np.mean(st.h.second)), gains

