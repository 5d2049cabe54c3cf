"""One recurrent cell (a direction of a layer, or a ``*Cell`` module) on moments: a step of
the forward recursion, the step's backward, the surrogate backward through the tied
weights, and chi through time; plus building cells from PyTorch modules.

The unroll over a sequence, and the choice between resolving units and block
statistics, is ``gradscope.estimate.recurrent``; its module docstring gives the
reasoning (why tied weights, why a surrogate simulation) that the methods here
implement.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradscope.estimate.rnn_gates import (
    ZERO,
    GateBias,
    GateWeights,
    UnitMoments,
    Vec,
    gate_bias,
    gate_moments,
    values_of,
)

#: Simulated gradients stop at 1e100 per element, so squared norms stay finite.
_GRAD_MAX = 1e100
#: Gradients below this are flushed to zero: they underflow in any real backward pass, and
#: denormal arithmetic would slow the simulation down 100x.
_FLUSH = 1e-280


# --------------------------------------------------------------------------------------------
# One step of a cell
# --------------------------------------------------------------------------------------------

#: A path coefficient of the step Jacobian: (per-unit mean, per-unit second moment).
Coef = tuple[Vec, Vec]


@dataclass
class Step:
    """The new state's moments and the step's path coefficients for the backward pass."""

    h: UnitMoments
    c: UnitMoments
    coef: dict[str, Coef]


@dataclass(frozen=True)
class Mats:
    """Full weight matrices for the surrogate backward (sampled where they are meta)."""

    w_ih: Vec  # (gates * H, input)
    w_hh: Vec  # (gates * H, out)
    w_hr: Vec | None  # (out, H), LSTM projection


N_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@dataclass(frozen=True)
class Cell:
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
    ih: GateWeights
    hh: GateWeights
    bias: GateBias
    b_in: GateBias
    b_hn: GateBias
    proj: GateWeights | None
    tensors: tuple[torch.Tensor | None, ...] = field(repr=False, compare=False)
    realized: Mats | None = field(default=None, repr=False, compare=False)
    #: The last input moments and their ``ih`` projection: the stationary input is one
    #: object for every step of a first layer and every fixed-point iteration, and its
    #: projection is a quarter of a step's cost (a (gates * H, input) mat-vec, twice).
    _ih_memo: list[tuple[UnitMoments, tuple[Vec, Vec]]] = field(
        default_factory=list, init=False, repr=False, compare=False)

    def summarised(self) -> Cell:
        """This cell with block statistics (for the O(T) mean-field backward)."""
        proj = self.proj.summary() if self.proj is not None else None
        return dataclasses.replace(self, unit=1, ih=self.ih.summary(), hh=self.hh.summary(),
                                   proj=proj)

    def _blk(self, a: Vec, j: int) -> Vec:
        return a[j * self.unit : (j + 1) * self.unit]

    def _stack(self, *parts: Vec) -> Vec:
        return np.concatenate([np.broadcast_to(p, (self.unit,)) for p in parts])

    # forward -------------------------------------------------------------------------------
    def step(self, x: UnitMoments, h: UnitMoments, c: UnitMoments, settle: bool = False) -> Step:
        """One step of the moments.

        ``settle``: put the slow state (LSTM ``c``, GRU ``h``) at its stationary value for
        the current gates; the fixed-point search iterates that map, which converges in tens
        of iterations where plain steps need ~1 / (1 - f^2).
        """
        with np.errstate(over="ignore", invalid="ignore"):
            st = self._step(x, h, c, settle)
        return Step(st.h.clamped(), st.c.clamped(), st.coef)

    def _step(self, x: UnitMoments, h: UnitMoments, c: UnitMoments, settle: bool) -> Step:
        memo = self._ih_memo
        if memo and memo[0][0] is x:  # the object itself is held: no id reuse
            xm, xv = memo[0][1]
        else:
            xm, xv = self.ih.forward(x.mean, x.second)
            memo[:] = [(x, (xm, xv))]
        hm, hv = self.hh.forward(h.mean, h.second)
        if self.kind == "lstm":
            return self._lstm(xm + hm + self.bias.mean, xv + hv + self.bias.var, c, settle)
        if self.kind == "gru":
            return self._gru(xm, xv, hm, hv, h, settle)
        phi = gate_moments("relu" if self.kind == "rnn_relu" else "tanh",
                           xm + hm + self.bias.mean, xv + hv + self.bias.var)
        return Step(UnitMoments(phi.m1, phi.m2), ZERO, {"p": (phi.d1, phi.d2)})

    def _lstm(self, am: Vec, av: Vec, c: UnitMoments, settle: bool) -> Step:
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
        out = UnitMoments(o.m1 * tc.m1, o.m2 * tc.m2)
        if self.proj is not None:
            pm, pv = self.proj.forward(out.mean, out.second)
            out = UnitMoments(pm, pv + pm * pm)
        c_prev = UnitMoments(c_mean, c_second) if settle else c
        coef = {
            "K": (o.m1 * tc.d1, o.m2 * tc.d2),  # h_t -> c_t within the step
            "F": (f.m1, f.m2),  # c_t -> c_{t-1}
            "i": (g.m1 * i.d1, g.m2 * i.d2),  # c_t -> input-gate pre-activation
            "f": (c_prev.mean * f.d1, c_prev.second * f.d2),
            "g": (i.m1 * g.d1, i.m2 * g.d2),
            "o": (tc.m1 * o.d1, tc.m2 * o.d2),  # h_t -> output-gate pre-activation
        }
        return Step(out, UnitMoments(c_mean, c_second), coef)

    def _gru(self, xm: Vec, xv: Vec, hm: Vec, hv: Vec, h: UnitMoments, settle: bool) -> Step:
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
        return Step(UnitMoments(h_mean, np.maximum(h_second, h_mean * h_mean)), ZERO, coef)

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
    def mats(self, rng: np.random.Generator) -> Mats:
        """The matrices the forward used, else the actual ones or default-init draws."""
        if self.realized is not None:
            return self.realized
        bound = 1.0 / math.sqrt(self.hidden)
        w_ih_t, w_hh_t, w_hr_t = self.tensors
        w_ih, w_hh, w_hr = (_realize(t, bound, rng) for t in (w_ih_t, w_hh_t, w_hr_t))
        assert w_ih is not None and w_hh is not None
        return Mats(w_ih, w_hh, w_hr)

    def simulate(self, steps: list[Step], entry: Vec, rng: np.random.Generator,
                 mats: Mats, entry_c: Vec | None = None,
                 norms: list[tuple[float, float, float, float]] | None = None) -> Vec:
        """Probe gradients at each ``x_t`` (T, input, probes) from entries at each ``h_t``.

        Each step applies ``J_t^T`` with the actual ``W`` and every gate coefficient drawn as
        mean + sd * N(0, 1) per unit and probe, independently per step: mean field for the
        gates, the weights kept tied. ``entry_c``: entries at each LSTM ``c_t`` too (a cell
        called in a loop can hand its cell state to other ops). ``norms``, when given, is
        filled per step (in time order) with the squared norms of the gradient at ``h_t`` and
        ``c_t`` (entries included) and of what step ``t`` passes back to ``h_{t-1}`` and
        ``c_{t-1}``: a loop of cell calls turns them into per-call gains.
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
            if entry_c is not None:
                gc = gc + entry_c[t]
            arrived = (float(np.sum(gh * gh)), float(np.sum(gc * gc)))
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
            if norms is not None:
                norms.append((*arrived, float(np.sum(gh * gh)),
                              float(np.sum(gc * gc)) if self.kind == "lstm" else 0.0))
        if norms is not None:
            norms.reverse()
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

def cell_kind(module: nn.Module) -> str:
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


def int_attr(module: nn.Module, name: str) -> int:
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
    values = values_of(t)
    if values is not None or rng is None:
        return values
    out: Vec = rng.uniform(-bound, bound, size=tuple(t.shape))
    return out


def cell_from(module: nn.Module, kind: str, suffix: str, input_size: int,
               rng: np.random.Generator | None) -> Cell:
    """The gate blocks of ``weight_ih{suffix}`` etc. in PyTorch's gate order.

    With ``rng`` the cell is resolved per unit, meta tensors drawn from PyTorch's declared
    default init (so a meta module is estimated as a typical freshly initialised one); without,
    each gate block is summarised by its statistics.
    """
    hidden = int_attr(module, "hidden_size")
    proj_size = int_attr(module, "proj_size")
    out_size = proj_size or hidden
    bound = 1.0 / math.sqrt(hidden)  # U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias
    default_var = bound * bound / 3.0
    w_ih_t = _param(module, f"weight_ih{suffix}")
    w_hh_t = _param(module, f"weight_hh{suffix}")
    w_hr_t = _param(module, f"weight_hr{suffix}") if proj_size else None
    g = N_GATES[kind]
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
        realized = Mats(w_ih, w_hh, w_hr)
        ih = GateWeights.per_unit(w_ih, g, hidden, input_size)
        hh = GateWeights.per_unit(w_hh, g, hidden, out_size)
        if w_hr is not None:
            proj = GateWeights.per_unit(w_hr, 1, out_size, hidden)
    else:
        ih = GateWeights.block_stats(w_ih_t, g, hidden, input_size, default_var)
        hh = GateWeights.block_stats(w_hh_t, g, hidden, out_size, default_var)
        if w_hr_t is not None:
            proj = GateWeights.block_stats(w_hr_t, 1, out_size, hidden, default_var)
    bias = gate_bias(present, g, default_var, per_unit)
    b_in = b_hn = GateBias(np.zeros(1), np.zeros(1))
    if kind == "gru":  # b_hn sits inside r * (W_hn h + b_hn): kept apart from b_in
        b_in = gate_bias([None if b_ih is None else b_ih[2 * hidden :]] if biases[0][1] else [], 1,
                     default_var, per_unit)
        b_hn = gate_bias([None if b_hh is None else b_hh[2 * hidden :]] if biases[1][1] else [], 1,
                     default_var, per_unit)
    return Cell(kind, input_size, hidden, out_size, hidden if per_unit else 1, ih, hh, bias,
                 b_in, b_hn, proj, (w_ih_t, w_hh_t, w_hr_t), realized)

