"""Mean-field estimate of gradient flow through recurrent layers (LSTM, GRU, RNN) and cells.

A recurrent layer is one op in the traced graph but a deep network in time: the gradient that
enters at the last step reaches step ``t`` only after ``T - 1 - t`` applications of the step
Jacobian. This module unrolls that recursion on moments instead of tensors, with the same
bookkeeping as ``propagate.py`` (SIGNAL_PROPAGATION.md):

* forward, per step: each gate's pre-activation is ``W_ih x_t + W_hh h_{t-1} + b``; its mean
  comes from the bias (and the inputs' means) and its variance from ``sum_k W_ik^2 Var x_k +
  sum_k W_hh,ik^2 Var h_k``; the hidden (and cell) state moments are stepped from
  ``h_0 = c_0 = 0``, as PyTorch starts them, so short sequences see the transient and long ones
  the fixed point;
* backward, per step: expected squared gradients (per element) flow back through every path
  of the cell and are added as independent contributions, the mean-field "gradient
  independence" assumption. This gives ``input_gain`` and the per-position profile.

Why per unit, with the actual weight matrices, when the weights have values: the biases are
drawn per unit and are fixed in time, so each unit's gates and cell state carry a mean of their
own. The cell state integrates it (``c_i ~ i_i g_i / (1 - f_i)``), and averaging units first
underestimates an LSTM's output second moment by up to 3x at forget bias 3 (measured). With
meta tensors there are no units to resolve: every block then gets PyTorch's declared default
init, ``U(-1/sqrt(H), 1/sqrt(H))`` (mean 0, variance ``1/(3H)``), and the bias spread counts as
pre-activation variance.

Why ``step_gain`` is not the mean-field chi: the same ``W_hh`` is applied at every step. A GRU's
or LSTM's step Jacobian is ``diag(a) + W^T diag(p)`` (``a`` = update or forget gate), and with a
tied ``W`` the gradient aligns with the direction where the two add up coherently: the
asymptotic rate is set by the spectral radius ``(a + b)^2`` (``b^2`` the circular-law radius of
``W^T diag(p)``), not by ``a^2 + b^2``. Measured on a default-init LSTM (H=64): mean field
0.27 per step, brute force 0.39, this estimate 0.40. The spectral radius comes from the circular
law (free probability); the gates' fluctuations, which do not align, are added through the
resolvent of that coherent part. The profile and ``input_gain`` stay mean-field: the "last"
entry's total is dominated by the first few steps back, before the gradient has aligned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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

#: Relative change below which the forward recursion counts as stationary: later steps reuse
#: the last one, so a 10 000-step sequence costs no more than its transient.
_STATIONARY_TOL = 1e-9
#: Cap on the steps taken to find the stationary state (a forget gate at sigmoid(5) settles to
#: 1e-9 in ~1500 steps; beyond the cap the state is as good as converged for the estimate).
_MAX_FIXED_POINT_STEPS = 4000
#: Per-unit resolution costs O(H^2) per step and direction; beyond this many multiply-adds
#: for the whole module, block statistics (one number per gate block) are used instead.
_PER_UNIT_BUDGET = 4e9


# --------------------------------------------------------------------------------------------
# Gaussian moments of the gate nonlinearities, vectorised over units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateMoments:
    """``E[phi]``, ``E[phi^2]``, ``E[phi']``, ``E[phi'^2]`` for ``z ~ N(mean, var)``, per unit.

    ``E[phi']`` is here (it is not in ``activations.Moments``) because the coherent part of the
    step Jacobian, which sets ``step_gain``, is made of the gates' means, derivatives included.
    """

    m1: Vec
    m2: Vec
    d1: Vec
    d2: Vec


def _legendre_grid(lo: float, hi: float, nodes: int) -> tuple[Vec, Vec]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    starts = np.arange(lo, hi, 1.0)
    z = (starts[:, None] + 0.5 * (x[None, :] + 1.0)).ravel()
    return z, np.tile(0.5 * w, starts.shape[0])


_HERMITE = np.polynomial.hermite.hermgauss(96)
_GH_U: Vec = np.sqrt(2.0) * _HERMITE[0]
_GH_W: Vec = _HERMITE[1] / np.sqrt(np.pi)
#: sigmoid and tanh are constant to float64 beyond |z| = 40 (tanh'(20)^2 is 1e-34 already).
_SAT = 40.0
_Z, _ZW = _legendre_grid(-_SAT, _SAT, 8)


def _ndtr(x: Vec) -> Vec:
    out: Vec = torch.special.ndtr(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return out


def _sig(z: Vec) -> tuple[Vec, Vec]:
    t = np.tanh(0.5 * z)  # overflow-free sigmoid: (1 + tanh(z/2)) / 2
    return 0.5 * (1.0 + t), 0.25 * (1.0 - t * t)


def _tanh(z: Vec) -> tuple[Vec, Vec]:
    t = np.tanh(z)
    return t, 1.0 - t * t


def gate_moments(name: str, mean: npt.ArrayLike, var: npt.ArrayLike) -> GateMoments:
    """Moments of ``sigmoid``, ``tanh`` or ``relu`` at ``N(mean, var)``, elementwise.

    Why not :func:`activations.activation_moments_array`: the recursion calls this for every
    gate at every step, and that function's adaptive rules cost ~10 ms per 64 units. Here
    Gauss-Hermite (96 nodes) serves standard deviations up to 1, where it is accurate to 1e-9
    for these functions; wider Gaussians are integrated in the activation's own variable on a
    fixed composite Gauss-Legendre grid over [-40, 40] (the functions are constant beyond), so
    no accuracy is lost when the Gaussian is wide. ReLU is in closed form. The test suite checks
    every moment against :func:`activations.activation_moments`.
    """
    m = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    v = np.maximum(np.atleast_1d(np.asarray(var, dtype=np.float64)), 0.0)
    m, v = np.broadcast_arrays(m, v)
    s = np.sqrt(v)
    if name == "relu":
        safe = np.where(s > 0.0, s, 1.0)
        a = m / safe
        cdf = np.where(s > 0.0, _ndtr(a), (m > 0.0).astype(np.float64))
        pdf = np.where(s > 0.0, np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi), 0.0)
        m1 = m * cdf + s * pdf
        m2 = (m * m + v) * cdf + m * s * pdf
        return GateMoments(m1, np.maximum(m2, 0.0), cdf, cdf.copy())
    fn: Callable[[Vec], tuple[Vec, Vec]]
    if name == "sigmoid":
        fn, lo, hi = _sig, 0.0, 1.0
    elif name == "tanh":
        fn, lo, hi = _tanh, -1.0, 1.0
    else:
        raise ValueError(f"gate nonlinearity must be sigmoid, tanh or relu, got {name!r}")
    out = np.empty((4,) + m.shape)
    narrow = s <= 1.0
    if narrow.any():
        z = m[narrow, None] + s[narrow, None] * _GH_U
        phi, dphi = fn(z)
        out[:, narrow] = np.stack([phi @ _GH_W, (phi * phi) @ _GH_W, dphi @ _GH_W,
                                   (dphi * dphi) @ _GH_W])
    wide = ~narrow
    if wide.any():
        mw, sw = m[wide, None], s[wide, None]
        u = (_Z - mw) / sw
        w = _ZW * np.exp(-0.5 * u * u) / (sw * math.sqrt(2.0 * math.pi))
        phi, dphi = fn(_Z)
        below = _ndtr((-_SAT - m[wide]) / s[wide])
        above = _ndtr((m[wide] - _SAT) / s[wide])
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
    """``y = W x`` for one gate block, per unit (``w`` known) or by block statistics.

    ``forward`` maps the input's per-unit (mean, second moment) to the output's per-unit mean
    and variance; ``backward`` maps per-element expected squared gradients at the output to
    those at the input (``sum_i W_ik^2 s_i``: independent paths add); ``gain`` is the
    per-element gain for a coefficient profile ``p2`` on the outputs. Without values, every
    unit is alike and arrays have length 1.
    """

    n_out: int
    n_in: int
    w_mean: float
    w_second: float
    w: Vec | None = None
    w2: Vec | None = field(default=None, repr=False)
    row2: Vec | None = field(default=None, repr=False)

    @staticmethod
    def of(t: torch.Tensor | None, n_out: int, n_in: int, default_var: float,
           per_unit: bool) -> _Dense:
        w = _values(t)
        if w is None:
            return _Dense(n_out, n_in, 0.0, default_var)
        w_mean, w_second = float(w.mean()), float((w * w).mean())
        if not per_unit:
            return _Dense(n_out, n_in, w_mean, w_second)
        w2 = w * w
        return _Dense(n_out, n_in, w_mean, w_second, w, w2, w2.sum(axis=1))

    def forward(self, mean: Vec, second: Vec) -> tuple[Vec, Vec]:
        if self.w is None or self.w2 is None:
            mm, qq = float(np.mean(mean)), float(np.mean(second))
            out_var = self.n_in * (self.w_second * qq - (self.w_mean * mm) ** 2)
            return np.array([self.n_in * self.w_mean * mm]), np.array([max(out_var, 0.0)])
        m = np.broadcast_to(mean, (self.n_in,))
        var = np.broadcast_to(np.maximum(second - mean * mean, 0.0), (self.n_in,))
        return self.w @ m, self.w2 @ var

    def backward(self, s: Vec) -> Vec:
        if self.w2 is None:
            return np.array([self.n_out * self.w_second * float(np.mean(s))])
        out: Vec = np.broadcast_to(s, (self.n_out,)) @ self.w2
        return out

    def gain(self, p2: Vec | float = 1.0) -> float:
        """Per-element squared gain of ``W^T diag(p)`` given ``p^2`` per output unit."""
        if self.row2 is None:
            return self.n_out * self.w_second * float(np.mean(p2))
        return float(np.broadcast_to(p2, (self.n_out,)) @ self.row2) / self.n_in


@dataclass(frozen=True)
class _Bias:
    """A gate block's bias: per-unit values (variance 0) or block mean and spread."""

    mean: Vec = field(default_factory=lambda: np.zeros(1))
    var: Vec = field(default_factory=lambda: np.zeros(1))


def _bias(parts: list[torch.Tensor | None], default_var: float, per_unit: bool) -> _Bias:
    """Sum of bias blocks (``b_ih + b_hh``); meta blocks count with the default spread."""
    present = [p for p in parts if p is not None]
    if not present:
        return _Bias()
    values = [_values(p) for p in present]
    known = [v for v in values if v is not None]
    unknown = len(values) - len(known)
    total = sum(known) if known else np.zeros(1)
    assert isinstance(total, np.ndarray)
    if per_unit and unknown == 0:
        return _Bias(total.astype(np.float64), np.zeros_like(total, dtype=np.float64))
    spread = float(np.var(total)) + unknown * default_var
    return _Bias(np.array([float(np.mean(total))]), np.array([spread]))


@dataclass(frozen=True)
class _Gate:
    """One gate block: input weights, recurrent weights and (summed) bias."""

    ih: _Dense
    hh: _Dense
    bias: _Bias

    def pre(self, x: _Mom, h: _Mom) -> tuple[Vec, Vec]:
        xm, xv = self.ih.forward(x.mean, x.second)
        hm, hv = self.hh.forward(h.mean, h.second)
        return xm + hm + self.bias.mean, xv + hv + self.bias.var


# --------------------------------------------------------------------------------------------
# One step of a cell: forward moments and backward squared gradients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mom:
    """Per-unit (or block) mean and second moment."""

    mean: Vec
    second: Vec

    @staticmethod
    def zero() -> _Mom:
        return _Mom(np.zeros(1), np.zeros(1))

    @staticmethod
    def scalar(mean: float, second: float) -> _Mom:
        return _Mom(np.array([float(mean)]), np.array([float(second)]))

    def close(self, other: _Mom) -> bool:
        return bool(np.allclose(self.mean, other.mean, rtol=_STATIONARY_TOL, atol=1e-300)
                    and np.allclose(self.second, other.second, rtol=_STATIONARY_TOL,
                                    atol=1e-300))


#: A path coefficient: (per-unit mean, per-unit second moment).
Coef = tuple[Vec, Vec]


@dataclass
class _Step:
    """The new state's moments and the step's path coefficients for the backward pass."""

    h: _Mom
    c: _Mom
    coef: dict[str, Coef]


@dataclass(frozen=True)
class _Cell:
    """One direction of one layer (or a ``*Cell`` module) in PyTorch's gate order.

    LSTM gates i, f, g, o; GRU r, z, n; RNN one block. ``n_bias_hh`` is the GRU's ``b_hn``,
    which sits inside ``r * (W_hn h + b_hn)``; ``proj`` is an LSTM's ``weight_hr``.
    """

    kind: str  # "lstm", "gru", "rnn_tanh", "rnn_relu"
    input_size: int
    hidden: int
    out_size: int
    gates: tuple[_Gate, ...]
    n_bias_hh: _Bias = field(default_factory=_Bias)
    proj: _Dense | None = None

    # forward -------------------------------------------------------------------------------
    def step(self, x: _Mom, h: _Mom, c: _Mom) -> _Step:
        if self.kind == "lstm":
            return self._lstm(x, h, c)
        if self.kind == "gru":
            return self._gru(x, h)
        phi = gate_moments("relu" if self.kind == "rnn_relu" else "tanh",
                           *self.gates[0].pre(x, h))
        return _Step(_Mom(phi.m1, phi.m2), _Mom.zero(), {"p": (phi.d1, phi.d2)})

    def _lstm(self, x: _Mom, h: _Mom, c: _Mom) -> _Step:
        i, f, g, o = (gate_moments(n, *gate.pre(x, h)) for n, gate
                      in zip(("sigmoid", "sigmoid", "tanh", "sigmoid"), self.gates, strict=True))
        c_mean = f.m1 * c.mean + i.m1 * g.m1
        c_second = f.m2 * c.second + i.m2 * g.m2 + 2.0 * f.m1 * c.mean * i.m1 * g.m1
        c_second = np.maximum(c_second, c_mean * c_mean)
        tc = gate_moments("tanh", c_mean, c_second - c_mean * c_mean)
        out = _Mom(o.m1 * tc.m1, o.m2 * tc.m2)
        if self.proj is not None:
            pm, pv = self.proj.forward(out.mean, out.second)
            out = _Mom(pm, pv + pm * pm)
        coef = {
            "K": (o.m1 * tc.d1, o.m2 * tc.d2),  # h_t -> c_t inside the step
            "F": (f.m1, f.m2),  # c_t -> c_{t-1}
            "i": (g.m1 * i.d1, g.m2 * i.d2),  # c_t -> input-gate pre-activation
            "f": (c.mean * f.d1, c.second * f.d2),
            "g": (i.m1 * g.d1, i.m2 * g.d2),
            "o": (tc.m1 * o.d1, tc.m2 * o.d2),  # h_t -> output-gate pre-activation
        }
        return _Step(out, _Mom(c_mean, c_second), coef)

    def _gru(self, x: _Mom, h: _Mom) -> _Step:
        gr, gz, gn = self.gates
        r = gate_moments("sigmoid", *gr.pre(x, h))
        z = gate_moments("sigmoid", *gz.pre(x, h))
        um, uv = gn.ih.forward(x.mean, x.second)
        um, uv = um + gn.bias.mean, uv + gn.bias.var
        vm, vv = gn.hh.forward(h.mean, h.second)
        vm, vv = vm + self.n_bias_hh.mean, vv + self.n_bias_hh.var
        v2 = vv + vm * vm
        an_mean = um + r.m1 * vm
        an_second = uv + um * um + 2.0 * um * r.m1 * vm + r.m2 * v2
        n = gate_moments("tanh", an_mean, an_second - an_mean * an_mean)
        keep, keep2 = 1.0 - z.m1, 1.0 - 2.0 * z.m1 + z.m2  # E[1 - z], E[(1 - z)^2]
        h_mean = keep * n.m1 + z.m1 * h.mean
        h_second = keep2 * n.m2 + z.m2 * h.second + 2.0 * (z.m1 - z.m2) * n.m1 * h.mean
        hn2 = np.maximum(h.second + n.m2 - 2.0 * h.mean * n.m1, 0.0)  # E[(h - n)^2]
        coef = {
            "Z": (z.m1, z.m2),  # h' -> h directly
            "n": (keep * n.d1, keep2 * n.d2),  # h' -> n pre-activation
            "hn": (r.m1 * keep * n.d1, r.m2 * keep2 * n.d2),  # h' -> W_hn h + b_hn
            "z": ((h.mean - n.m1) * z.d1, hn2 * z.d2),
            "r": (keep * n.d1 * vm * r.d1, keep2 * n.d2 * v2 * r.d2),
        }
        return _Step(_Mom(h_mean, np.maximum(h_second, 0.0)), _Mom.zero(), coef)

    # backward ------------------------------------------------------------------------------
    def back(self, sh: Vec, sc: Vec, k: dict[str, Coef],
             which: int = 1) -> tuple[Vec, Vec, Vec]:
        """(s_h, s_c at t-1; s_x at t) per element, from s_h (entry added) and s_c at t.

        ``which=1`` uses the coefficients' second moments (the mean-field gains); ``which=0``
        their squared means, the gains of the coherent (time-averaged) Jacobian.
        """

        def p(name: str) -> Vec:
            return k[name][1] if which else k[name][0] ** 2

        zero = np.zeros(1)
        if self.kind == "lstm":
            gi, gf, gg, go = self.gates
            s_raw = self.proj.backward(sh) if self.proj is not None else sh
            s_u = sc + p("K") * s_raw
            s_a = (p("i") * s_u, p("f") * s_u, p("g") * s_u, p("o") * s_raw)
            s_h = sum((g.hh.backward(s) for g, s in zip(self.gates, s_a, strict=True)), zero)
            s_x = sum((g.ih.backward(s) for g, s in zip(self.gates, s_a, strict=True)), zero)
            return s_h, p("F") * s_u, s_x
        if self.kind == "gru":
            gr, gz, gn = self.gates
            s_r, s_z = p("r") * sh, p("z") * sh
            s_h = (p("Z") * sh + gr.hh.backward(s_r) + gz.hh.backward(s_z)
                   + gn.hh.backward(p("hn") * sh))
            s_x = gr.ih.backward(s_r) + gz.ih.backward(s_z) + gn.ih.backward(p("n") * sh)
            return s_h, zero, s_x
        s_a = p("p") * sh
        return self.gates[0].hh.backward(s_a), zero, self.gates[0].ih.backward(s_a)

    # chi through time ----------------------------------------------------------------------
    def _scalar_gains(self, k: dict[str, Coef], which: int) -> dict[str, float]:
        """Unit-averaged per-step gains, for the 2x2 (LSTM) or 1x1 step operator."""

        def p2(name: str) -> Vec:
            return k[name][1] if which else k[name][0] ** 2

        if self.kind == "lstm":
            hr = self.proj.gain() if self.proj is not None else 1.0
            return {
                "igf": sum(g.hh.gain(p2(n)) for g, n in zip(self.gates[:3], "ifg", strict=True)),
                "o": self.gates[3].hh.gain(p2("o")) * hr,
                "K": float(np.mean(p2("K"))) * hr,
                "F": float(np.mean(p2("F"))),
            }
        if self.kind == "gru":
            gr, gz, gn = self.gates
            return {"Z": float(np.mean(p2("Z"))),
                    "W": gr.hh.gain(p2("r")) + gz.hh.gain(p2("z")) + gn.hh.gain(p2("hn"))}
        return {"Z": 0.0, "W": self.gates[0].hh.gain(p2("p"))}

    def chi(self, k: dict[str, Coef], which: int = 1) -> float:
        """Largest eigenvalue of the per-step squared-gradient map (no entry)."""
        g = self._scalar_gains(k, which)
        if self.kind != "lstm":
            return g["Z"] + g["W"]
        # (s_h, s_c) -> (o s_h + igf (s_c + K s_h), F (s_c + K s_h))
        a, b = g["o"] + g["igf"] * g["K"], g["igf"]
        c, d = g["F"] * g["K"], g["F"]
        tr, det = a + d, a * d - b * c
        return 0.5 * (tr + math.sqrt(max(tr * tr - 4.0 * det, 0.0)))

    def coherent_radius(self, k: dict[str, Coef]) -> float:
        """Spectral radius of the time-averaged step Jacobian, by the circular law.

        GRU / RNN: ``diag(a) + U`` with ``U`` circular of radius ``b``: ``a + b``. LSTM: with
        the cell path folded in, ``lambda dh = U(lambda) dh`` where the recurrent paths see
        ``K lambda / (lambda - F)``; the radius is the largest real ``lambda > F`` with
        ``lambda^2 = radius(U(lambda))^2``.
        """
        g = self._scalar_gains(k, 0)
        if self.kind != "lstm":
            return math.sqrt(g["Z"]) + math.sqrt(g["W"])
        f_bar = math.sqrt(g["F"])

        def excess(lam: float) -> float:
            d2 = g["K"] * lam * lam / (lam - f_bar) ** 2
            return lam * lam - (g["igf"] * d2 + g["o"])

        lo = f_bar
        hi = max(2.0 * f_bar, 1e-3)
        while excess(hi) < 0.0 and hi < 1e150:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if excess(mid) < 0.0:
                lo = mid
            else:
                hi = mid
        return hi

    def step_gain(self, k: dict[str, Coef]) -> float:
        """Asymptotic per-step gain of the squared gradient norm with tied weights.

        The coherent Jacobian (radius ``rho``, mean-field gain ``m``) is matched to
        ``a I + b U`` (``a + b = rho``, ``a^2 + b^2 = m``); the fluctuations ``sigma^2`` (mean-field
        chi minus ``m``) feed its resolvent, and the rate is the ``lambda`` with
        ``sigma^2 G(1/lambda) / lambda = 1``, ``G`` the generating function of
        ``||(a + bU)^k||^2``. Pure noise gives the mean-field chi, pure coherence ``rho^2``.
        """
        chi_mf = self.chi(k, 1)
        m = self.chi(k, 0)
        rho = self.coherent_radius(k)
        sigma2 = max(chi_mf - m, 0.0)
        rho2 = rho * rho
        ab = min(max(0.5 * (rho2 - m), 0.0), 0.25 * rho2)  # a b, with (a - b)^2 >= 0
        s2 = max(m, 2.0 * ab)  # a^2 + b^2

        def lhs(lam: float) -> float:
            x = 1.0 / lam
            disc = (1.0 - s2 * x) ** 2 - 4.0 * ab * ab * x * x
            return sigma2 * x / math.sqrt(disc) if disc > 0.0 else math.inf

        floor = max(rho2, chi_mf if ab == 0.0 else 0.0, 1e-300)
        if sigma2 <= 0.0:
            return max(rho2, chi_mf)
        lo, hi = floor, floor + sigma2 + 1e-300
        while lhs(hi) > 1.0 and hi < 1e300:
            hi *= 2.0
        for _ in range(200):
            mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
            if not lo < mid < hi:
                break
            if lhs(mid) > 1.0:
                lo = mid
            else:
                hi = mid
        return hi


# --------------------------------------------------------------------------------------------
# Building cells from modules
# --------------------------------------------------------------------------------------------

_N_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


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


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _cell_from(module: nn.Module, kind: str, suffix: str, input_size: int,
               per_unit: bool) -> _Cell:
    """The gate blocks of ``weight_ih{suffix}`` etc., split in PyTorch's gate order."""
    hidden = int(module.hidden_size)
    proj_size = int(getattr(module, "proj_size", 0) or 0)
    out_size = proj_size or hidden
    default_var = 1.0 / (3.0 * hidden)  # U(-1/sqrt(H), 1/sqrt(H)), every weight and bias
    w_ih = _param(module, f"weight_ih{suffix}")
    w_hh = _param(module, f"weight_hh{suffix}")
    b_ih = _param(module, f"bias_ih{suffix}")
    b_hh = _param(module, f"bias_hh{suffix}")
    w_hr = _param(module, f"weight_hr{suffix}")
    if w_ih is None or w_hh is None:
        raise NotImplementedError(f"{type(module).__name__} has no weight_ih{suffix} / "
                                  f"weight_hh{suffix}")
    n = _N_GATES[kind]
    if w_ih.shape[0] != n * hidden or w_hh.shape != (n * hidden, out_size):
        raise NotImplementedError(f"unexpected weight shapes in {type(module).__name__}")
    if proj_size and w_hr is None:
        raise NotImplementedError("LSTM with proj_size but no weight_hr")

    def block(t: torch.Tensor | None, j: int) -> torch.Tensor | None:
        return None if t is None else t[j * hidden : (j + 1) * hidden]

    gates = []
    for j in range(n):
        ih = _Dense.of(block(w_ih, j), hidden, input_size, default_var, per_unit)
        hh = _Dense.of(block(w_hh, j), hidden, out_size, default_var, per_unit)
        if kind == "gru" and j == 2:
            bias = _bias([block(b_ih, j)], default_var, per_unit)
        else:
            bias = _bias([block(b_ih, j), block(b_hh, j)], default_var, per_unit)
        gates.append(_Gate(ih, hh, bias))
    n_bias_hh = _bias([block(b_hh, 2)], default_var, per_unit) if kind == "gru" else _Bias()
    proj = _Dense.of(w_hr, out_size, hidden, default_var, per_unit) if proj_size else None
    return _Cell(kind, input_size, hidden, out_size, tuple(gates), n_bias_hh, proj)


def _has_values(module: nn.Module) -> bool:
    return all(not p.is_meta for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Unrolling in time
# --------------------------------------------------------------------------------------------


def _run_forward(cell: _Cell, xs: list[_Mom]) -> list[_Step]:
    """Step the state moments from h_0 = c_0 = 0 through the input moments ``xs``."""
    h, c = _Mom.zero(), _Mom.zero()
    steps: list[_Step] = []
    for t, x in enumerate(xs):
        if len(steps) >= 2 and xs[t - 1] is x:
            last, before = steps[-1], steps[-2]
            if last.h.close(before.h) and last.c.close(before.c):
                steps.append(last)  # stationary: the same step again
                continue
        st = cell.step(x, h, c)
        steps.append(st)
        h, c = st.h, st.c
    return steps


def _fixed_point(cell: _Cell, x: _Mom) -> _Step:
    """The stationary step for a constant input: where chi through time is evaluated."""
    st = cell.step(x, _Mom.zero(), _Mom.zero())
    for _ in range(_MAX_FIXED_POINT_STEPS):
        nxt = cell.step(x, st.h, st.c)
        if nxt.h.close(st.h) and nxt.c.close(st.c):
            return nxt
        st = nxt
    return st


def _run_backward(cell: _Cell, steps: list[_Step], entry: list[Vec]) -> list[Vec]:
    """Per-element squared gradient at each x_t from per-element entries at each h_t."""
    sh, sc = np.zeros(1), np.zeros(1)
    sx: list[Vec] = [np.zeros(1)] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        sh, sc, sx[t] = cell.back(sh + entry[t], sc, steps[t].coef)
    return sx


def _concat(parts: list[_Mom], sizes: list[int], per_unit: bool) -> _Mom:
    """The next layer's input: both directions' outputs side by side."""
    if not per_unit or len(parts) == 1:
        if len(parts) == 1:
            return parts[0]
        return _Mom(np.array([np.mean([float(np.mean(p.mean)) for p in parts])]),
                    np.array([np.mean([float(np.mean(p.second)) for p in parts])]))
    return _Mom(np.concatenate([np.broadcast_to(p.mean, (n,)) for p, n in zip(parts, sizes)]),
                np.concatenate([np.broadcast_to(p.second, (n,))
                                for p, n in zip(parts, sizes)]))


@dataclass(frozen=True)
class RecurrentEstimate:
    """What a recurrent layer does to the signal and to the gradient.

    ``input_gain``: squared-norm gain ``S_x / S_out`` from the whole output sequence back to
    the whole input sequence, the gradient entering as ``entry`` says. ``step_gain``: chi
    through time, the per-step gain of the squared gradient norm going back one step in the
    stationary regime (the largest over layers and directions: it sets how fast the gradient
    at ``x_t`` decays with the distance from where it entered). ``h_second``: the stationary
    second moment of the top layer's hidden state.
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


def _layers(module: nn.Module, kind: str, per_unit: bool) -> list[list[_Cell]]:
    dirs = 2 if module.bidirectional else 1
    out_size = int(getattr(module, "proj_size", 0) or 0) or int(module.hidden_size)
    layers = []
    for k in range(int(module.num_layers)):
        size = int(module.input_size) if k == 0 else dirs * out_size
        suffixes = [f"_l{k}", f"_l{k}_reverse"][:dirs]
        layers.append([_cell_from(module, kind, s, size, per_unit) for s in suffixes])
    return layers


def _dropout(module: nn.Module) -> float:
    p = float(getattr(module, "dropout", 0.0) or 0.0)
    return p if module.training and 0.0 < p < 1.0 else 0.0


def _total(s: Vec, n: int) -> float:
    return n * float(np.mean(s))


def _run(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
         entry: Entry) -> _Result:
    if not isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        raise NotImplementedError(f"{type(module).__name__} is not nn.LSTM / nn.GRU / nn.RNN")
    kind = _kind(module)
    steps_n = int(seq_len)
    if steps_n < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n_weights = sum(p.numel() for p in module.parameters())
    per_unit = _has_values(module) and n_weights * min(steps_n, 200) <= _PER_UNIT_BUDGET
    layers = _layers(module, kind, per_unit)
    drop = _dropout(module)

    # Forward, layer by layer; the reverse direction sees the sequence reversed.
    x0 = _Mom.scalar(x_mean, x_second)
    xs: list[_Mom] = [x0] * steps_n
    x_stat = x0
    all_steps: list[list[list[_Step]]] = []
    fixed: list[list[_Step]] = []
    for li, cells in enumerate(layers):
        per_dir = []
        for d, cell in enumerate(cells):
            st = _run_forward(cell, xs if d == 0 else xs[::-1])
            per_dir.append(st if d == 0 else st[::-1])
        all_steps.append(per_dir)
        fixed.append([_fixed_point(cell, x_stat) for cell in cells])
        sizes = [c.out_size for c in cells]
        scale = 1.0 / (1.0 - drop) if li < len(layers) - 1 else 1.0
        nxt: list[_Mom] = []
        for t in range(steps_n):
            if t > 0 and all(p[t] is p[t - 1] for p in per_dir):
                nxt.append(nxt[-1])  # keep identity: stationary inputs stay recognisable
                continue
            m = _concat([p[t].h for p in per_dir], sizes, per_unit)
            nxt.append(_Mom(m.mean, scale * m.second))
        xs = nxt
        stat = _concat([f.h for f in fixed[-1]], sizes, per_unit)
        x_stat = _Mom(stat.mean, scale * stat.second)

    out_mean = float(np.mean([np.mean(x.mean) for x in xs]))
    out_second = float(np.mean([np.mean(x.second) for x in xs]))
    h_second = float(np.mean(x_stat.second))

    # Backward: per-element entries at the top outputs, then layer by layer.
    top = layers[-1]
    n_out = sum(c.out_size for c in top)
    zero = np.zeros(1)
    if entry == "last":
        first = [zero] * (steps_n - 1) + [np.array([1.0 / n_out])]
        entries = [first for _ in top]
    else:
        entries = [[np.array([1.0 / (steps_n * n_out)])] * steps_n for _ in top]
    sx_total: list[Vec] = []
    for li in range(len(layers) - 1, -1, -1):
        cells = layers[li]
        sx_dirs = []
        for d, cell in enumerate(cells):
            st, e = all_steps[li][d], entries[d]
            if d == 1:
                sx_dirs.append(_run_backward(cell, st[::-1], e[::-1])[::-1])
            else:
                sx_dirs.append(_run_backward(cell, st, e))
        sx_total = [sum(v, zero) for v in zip(*sx_dirs, strict=True)]
        if li > 0:
            scale = 1.0 / (1.0 - drop) if drop else 1.0
            below = layers[li - 1]
            entries = []
            start = 0
            for c in below:
                entries.append([_slice(s, start, c.out_size) * scale for s in sx_total])
                start += c.out_size
    d_in = layers[0][0].input_size
    profile = [_total(s, d_in) for s in sx_total]

    # Chi through time: the slowest decay over layers and directions.
    rates = [(cell.step_gain(fixed[li][d].coef), li, d)
             for li, cells in enumerate(layers) for d, cell in enumerate(cells)]
    step_gain, li_max, d_max = max(rates)
    note = _note(layers[li_max][d_max], fixed[li_max][d_max].coef, step_gain,
                 li_max if len(layers) > 1 else None)
    est = RecurrentEstimate(out_mean, out_second, h_second, float(sum(profile)), step_gain,
                            steps_n, note)
    return _Result(est, profile)


def _slice(s: Vec, start: int, size: int) -> Vec:
    return s if s.shape[0] == 1 else s[start : start + size]


def _note(cell: _Cell, k: dict[str, Coef], chi: float, layer: int | None) -> str:
    where = f" (layer {layer})" if layer is not None else ""
    mf = cell.chi(k, 1)
    if cell.kind == "lstm":
        f2 = float(np.mean(k["F"][1]))
        return (f"forget gate E[f^2]={f2:.3g} per step{where}; chi through time {chi:.3g} "
                f"(independent-step mean field {mf:.3g})")
    if cell.kind == "gru":
        z2 = float(np.mean(k["Z"][1]))
        return (f"update gate E[z^2]={z2:.3g} per step{where}; chi through time {chi:.3g} "
                f"(independent-step mean field {mf:.3g})")
    hh = cell.gates[0].hh.gain()
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
    (training mode) are modelled; other modules raise ``NotImplementedError``.
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
    gradient entering at ``h'`` only. The states are taken as zero-mean with second moments
    ``h_second`` and ``c_second``; ``c_second=None`` means zero when ``h_second`` is 0 (no state
    passed) and otherwise the cell state's stationary value for these inputs, as in a loop
    that has run for a while.
    """
    if not isinstance(module, (nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
        raise NotImplementedError(f"{type(module).__name__} is not an RNN cell module")
    kind = _kind(module)
    cell = _cell_from(module, kind, "", int(module.input_size), _has_values(module))
    x = _Mom.scalar(x_mean, x_second)
    h = _Mom.scalar(0.0, h_second)
    c = _Mom.zero()
    if kind == "lstm":
        if c_second is not None:
            c = _Mom.scalar(0.0, c_second)
        elif h_second > 0.0:
            for _ in range(_MAX_FIXED_POINT_STEPS):
                nxt = cell.step(x, h, c).c
                if nxt.close(c):
                    break
                c = nxt
    st = cell.step(x, h, c)
    s_h, s_c, s_x = cell.back(np.array([1.0 / cell.out_size]), np.zeros(1), st.coef)
    gains = {"input": _total(s_x, cell.input_size), "hx": _total(s_h, cell.out_size)}
    if kind == "lstm":
        gains["cx"] = _total(s_c, cell.hidden)
    return float(np.mean(st.h.mean)), float(np.mean(st.h.second)), gains
