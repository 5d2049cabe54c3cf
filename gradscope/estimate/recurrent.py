"""Mean-field estimate of gradient flow through recurrent layers (LSTM, GRU, RNN) and cells.

A recurrent layer is one op in the traced graph but a deep network in time: the gradient
that enters at the last step reaches step ``t`` only after ``T - 1 - t`` applications of the
step Jacobian. This module unrolls that recursion on moments instead of tensors, the same
mean-field bookkeeping as ``propagate.py`` (SIGNAL_PROPAGATION.md):

* forward, per step: each gate's pre-activation is ``W_ih x_t + W_hh h_{t-1} + b`` with mean
  from the biases (and the inputs' means) and variance ``fan_in E[w_ih^2] Var x +
  H E[w_hh^2] Var h + Var b``; gate moments come from :func:`activation_moments`; the hidden
  (and cell) state moments are stepped from ``h_0 = c_0 = 0``, as PyTorch starts them, so short
  sequences see the transient and long ones its fixed point;
* backward, per step: expected squared gradients (per element) flow back through every path
  of the cell, combined as independent contributions (squared norms add), which is the
  mean-field "gradient independence" assumption.

Why the real weights' statistics are used per gate block: a forget-gate bias of 1 or 3 is a
per-block shift that whole-tensor statistics would blur into noise, and it is exactly what
decides whether an LSTM remembers (E[f^2] per step: ~0.3 at bias 0, ~0.9 at bias 3). On the
meta device the module's declared default init is used: every weight and bias
``U(-1/sqrt(H), 1/sqrt(H))``, mean 0 and variance ``1/(3H)``.

Why squared norms (S-gains) rather than per-element variances: they are what ``propagate.py``
carries, so a recurrent node drops into its backward sweep as one more op with a gain.

Known limits (measured in ``tests/test_recurrent_estimate.py``): the independence assumption
ignores that the same ``W_hh`` is applied at every step and that ``h`` and ``c`` gradients at a
step are correlated; per-unit spread of the gate biases (PyTorch's default init draws them
independently per unit) makes the slowest units dominate very long products, which the
block-statistics estimate averages away.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from gradscope.estimate.activations import Moments, activation_moments

__all__ = [
    "RecurrentEstimate",
    "estimate_cell",
    "estimate_recurrent",
    "input_gradient_profile",
]

Arr = npt.NDArray[np.float64]
Entry = Literal["last", "uniform"]

#: Relative change of every state moment below which the forward recursion counts as
#: stationary, so later steps reuse the last step instead of recomputing it.
_STATIONARY_TOL = 1e-9
#: Cap on the steps used to find the stationary state (a forget gate at sigmoid(5) needs
#: ~1500 steps to settle to 1e-9; beyond that the estimate is as good as converged).
_MAX_FIXED_POINT_STEPS = 4000
_POWER_ITERATIONS = 2000
_TINY = 1e-300


@dataclass(frozen=True)
class RecurrentEstimate:
    """What a recurrent layer does to the signal and to the gradient, in one record.

    ``input_gain`` is the squared-norm gain ``S_x / S_out`` from the whole output sequence back
    to the whole input sequence, with the gradient entering the output as ``entry`` says.
    ``step_gain`` is ``chi`` through time: the stationary per-step gain of the squared gradient
    norm going back one step (the largest over layers and directions, which sets how fast the
    gradient at ``x_t`` decays with the distance from where it entered).
    """

    out_mean: float
    out_second: float
    h_second: float
    input_gain: float
    step_gain: float
    steps: int
    note: str


# --------------------------------------------------------------------------------------------
# Weight statistics
# --------------------------------------------------------------------------------------------


def _stats(t: torch.Tensor | None, default_var: float) -> tuple[float, float]:
    """(mean, second moment) of a weight block; the default init where it has no values."""
    if t is None:
        return 0.0, 0.0
    if t.is_meta or t.numel() == 0:
        return 0.0, default_var
    x = t.detach().to("cpu", torch.float64)
    return float(x.mean()), float((x * x).mean())


@dataclass(frozen=True)
class _Dense:
    """``y = W x`` for one gate block, summarised by the block's mean and second moment.

    ``forward`` gives the mean and variance of each output unit from the input's (mean,
    second moment); ``backward`` the per-element expected squared gradient at the input from
    the output's. Under the mean-field assumption every output unit sees the same
    distribution, so one number per block is enough.
    """

    n_out: int
    n_in: int
    w_mean: float
    w_second: float

    @staticmethod
    def of(t: torch.Tensor | None, n_out: int, n_in: int, default_var: float) -> _Dense:
        wm, w2 = _stats(t, default_var)
        return _Dense(n_out, n_in, wm, w2)

    def forward(self, mean: float, second: float) -> tuple[float, float]:
        out_mean = self.n_in * self.w_mean * mean
        var = self.n_in * (self.w_second * second - (self.w_mean * mean) ** 2)
        return out_mean, max(var, 0.0)

    def backward(self, s: float) -> float:
        return self.n_out * self.w_second * s

    @property
    def gain(self) -> float:
        """Per-element squared-gradient gain from output to input (``n_out E[w^2]``)."""
        return self.n_out * self.w_second


@dataclass(frozen=True)
class _Bias:
    """A gate block's bias across units: mean and variance (variance adds to the spread)."""

    mean: float = 0.0
    var: float = 0.0


def _bias(parts: list[torch.Tensor | None], default_var: float) -> _Bias:
    """Sum of bias blocks (``b_ih + b_hh``): the variance of the per-unit sum when known."""
    present = [p for p in parts if p is not None]
    if not present:
        return _Bias()
    if all(not p.is_meta for p in present):
        total = sum(p.detach().to("cpu", torch.float64) for p in present)
        assert isinstance(total, torch.Tensor)
        return _Bias(float(total.mean()), float(total.var(unbiased=False)))
    mean = 0.0
    var = 0.0
    for p in present:
        m, q = _stats(p, default_var)
        mean += m
        var += max(q - m * m, 0.0)
    return _Bias(mean, var)


@dataclass(frozen=True)
class _Gate:
    """One gate block: its input and recurrent weights and its (summed) bias."""

    ih: _Dense
    hh: _Dense
    bias: _Bias

    def pre(self, x: tuple[float, float], h: tuple[float, float]) -> tuple[float, float]:
        """Mean and variance of the gate's pre-activation."""
        xm, xv = self.ih.forward(*x)
        hm, hv = self.hh.forward(*h)
        return xm + hm + self.bias.mean, xv + hv + self.bias.var


def _act(name: str, mean: float, var: float) -> Moments:
    return activation_moments(name, mean, max(var, 0.0))


# --------------------------------------------------------------------------------------------
# Cells: one step forward (moments) and one step backward (squared gradients)
# --------------------------------------------------------------------------------------------

Mom = tuple[float, float]


@dataclass
class _Step:
    """What one forward step leaves for the backward pass, plus the new state's moments."""

    h: Mom
    c: Mom = (0.0, 0.0)
    coef: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Cell:
    """One direction of one layer (or a ``*Cell`` module): kind, sizes and gate blocks.

    ``step`` maps (input moments, state moments) to the next state's moments and the
    per-step coefficients; ``back`` maps (squared gradient at h_t (entry included), at c_t,
    coefficients) to the squared gradients at h_{t-1}, c_{t-1} and x_t, all per element.
    """

    kind: str  # "lstm", "gru", "rnn_tanh", "rnn_relu"
    input_size: int
    hidden: int
    out_size: int  # proj_size for an LSTM with projection, else hidden
    gates: tuple[_Gate, ...]
    n_bias_hh: _Bias = _Bias()  # GRU: b_hn sits inside r * (W_hn h + b_hn)
    proj: _Dense | None = None

    # forward -------------------------------------------------------------------------------
    def step(self, x: Mom, h: Mom, c: Mom) -> _Step:
        if self.kind == "lstm":
            return self._lstm(x, h, c)
        if self.kind == "gru":
            return self._gru(x, h)
        return self._rnn(x, h)

    def _lstm(self, x: Mom, h: Mom, c: Mom) -> _Step:
        names = ("sigmoid", "sigmoid", "tanh", "sigmoid")
        i, f, g, o = (_act(n, *gate.pre(x, h)) for n, gate in zip(names, self.gates, strict=True))
        c_mean = f.mean * c[0] + i.mean * g.mean
        c_second = f.second * c[1] + i.second * g.second + 2.0 * f.mean * c[0] * i.mean * g.mean
        tc = _act("tanh", c_mean, c_second - c_mean * c_mean)
        raw = (o.mean * tc.mean, o.second * tc.second)
        out = raw
        if self.proj is not None:
            pm, pv = self.proj.forward(*raw)
            out = (pm, pv + pm * pm)
        coef = {
            "f2": f.second, "o2": o.second, "tc2": tc.second, "dtc2": tc.grad_second,
            "c_prev2": c[1], "g2": g.second, "i2": i.second,
            "di2": i.grad_second, "df2": f.grad_second, "dg2": g.grad_second,
            "do2": o.grad_second,
        }
        return _Step(out, (c_mean, max(c_second, 0.0)), coef)

    def _gru(self, x: Mom, h: Mom) -> _Step:
        gr, gz, gn = self.gates
        r = _act("sigmoid", *gr.pre(x, h))
        z = _act("sigmoid", *gz.pre(x, h))
        um, uv = gn.ih.forward(*x)
        um += gn.bias.mean
        uv += gn.bias.var
        vm, vv = gn.hh.forward(*h)
        vm += self.n_bias_hh.mean
        v2 = vv + self.n_bias_hh.var + vm * vm
        an_mean = um + r.mean * vm
        an_second = uv + um * um + 2.0 * um * r.mean * vm + r.second * v2
        n = _act("tanh", an_mean, an_second - an_mean * an_mean)
        one_z2 = 1.0 - 2.0 * z.mean + z.second
        h_mean = (1.0 - z.mean) * n.mean + z.mean * h[0]
        h_second = one_z2 * n.second + z.second * h[1] + 2.0 * (z.mean - z.second) * n.mean * h[0]
        coef = {
            "z2": z.second, "one_z2": one_z2, "dn2": n.grad_second,
            "hn2": max(h[1] + n.second - 2.0 * h[0] * n.mean, 0.0), "dz2": z.grad_second,
            "r2": r.second, "v2": v2, "dr2": r.grad_second,
        }
        return _Step((h_mean, max(h_second, 0.0)), (0.0, 0.0), coef)

    def _rnn(self, x: Mom, h: Mom) -> _Step:
        phi = _act("relu" if self.kind == "rnn_relu" else "tanh", *self.gates[0].pre(x, h))
        return _Step((phi.mean, phi.second), (0.0, 0.0), {"dphi2": phi.grad_second})

    # backward ------------------------------------------------------------------------------
    def back(self, sh: float, sc: float, k: dict[str, float]) -> tuple[float, float, float]:
        """(s_h_prev, s_c_prev, s_x) per element from s_h (entry added) and s_c at this step."""
        if self.kind == "lstm":
            gi, gf, gg, go = self.gates
            s_raw = self.proj.backward(sh) if self.proj is not None else sh
            s_ctot = sc + s_raw * k["o2"] * k["dtc2"]
            s_a = (
                s_ctot * k["g2"] * k["di2"],
                s_ctot * k["c_prev2"] * k["df2"],
                s_ctot * k["i2"] * k["dg2"],
                s_raw * k["tc2"] * k["do2"],
            )
            s_h = sum(g.hh.backward(s) for g, s in zip(self.gates, s_a, strict=True))
            s_x = sum(g.ih.backward(s) for g, s in zip(self.gates, s_a, strict=True))
            return s_h, s_ctot * k["f2"], s_x
        if self.kind == "gru":
            gr, gz, gn = self.gates
            s_an = sh * k["one_z2"] * k["dn2"]
            s_az = sh * k["hn2"] * k["dz2"]
            s_ar = s_an * k["v2"] * k["dr2"]
            s_h = (sh * k["z2"] + gr.hh.backward(s_ar) + gz.hh.backward(s_az)
                   + gn.hh.backward(s_an * k["r2"]))
            s_x = gr.ih.backward(s_ar) + gz.ih.backward(s_az) + gn.ih.backward(s_an)
            return s_h, 0.0, s_x
        s_a = sh * k["dphi2"]
        return self.gates[0].hh.backward(s_a), 0.0, self.gates[0].ih.backward(s_a)

    def step_operator(self, k: dict[str, float]) -> Callable[[float, float], tuple[float, float]]:
        """The linear map (s_h, s_c) at step t -> at step t-1, no entry: chi through time."""

        def op(sh: float, sc: float) -> tuple[float, float]:
            h_prev, c_prev, _ = self.back(sh, sc, k)
            return h_prev, c_prev

        return op


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
    raise NotImplementedError(f"{type(module).__name__} is not a recurrent module gradscope models")


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _cell_from(module: nn.Module, kind: str, suffix: str, input_size: int) -> _Cell:
    """The gate blocks of ``weight_ih{suffix}`` etc., split in PyTorch's gate order.

    Gate order: LSTM i, f, g, o; GRU r, z, n. The default variance ``1/(3H)`` is PyTorch's
    ``U(-1/sqrt(H), 1/sqrt(H))`` init for every recurrent weight and bias, used for meta
    tensors.
    """
    hidden = int(module.hidden_size)
    proj_size = int(getattr(module, "proj_size", 0) or 0)
    out_size = proj_size or hidden
    default_var = 1.0 / (3.0 * hidden)
    w_ih = _param(module, f"weight_ih{suffix}")
    w_hh = _param(module, f"weight_hh{suffix}")
    b_ih = _param(module, f"bias_ih{suffix}")
    b_hh = _param(module, f"bias_hh{suffix}")
    w_hr = _param(module, f"weight_hr{suffix}")
    n = _N_GATES[kind]

    def block(t: torch.Tensor | None, j: int) -> torch.Tensor | None:
        return None if t is None else t[j * hidden : (j + 1) * hidden]

    if w_ih is None or w_hh is None:
        raise NotImplementedError(f"{type(module).__name__} has no weight_ih{suffix}/weight_hh")
    gates = []
    for j in range(n):
        ih = _Dense.of(block(w_ih, j), hidden, input_size, default_var)
        hh = _Dense.of(block(w_hh, j), hidden, out_size, default_var)
        if kind == "gru" and j == 2:  # b_hn is multiplied by r: kept apart
            bias = _bias([block(b_ih, j)], default_var)
        else:
            bias = _bias([block(b_ih, j), block(b_hh, j)], default_var)
        gates.append(_Gate(ih, hh, bias))
    n_bias_hh = _bias([block(b_hh, 2)], default_var) if kind == "gru" else _Bias()
    proj = _Dense.of(w_hr, out_size, hidden, default_var) if proj_size else None
    return _Cell(kind, input_size, hidden, out_size, tuple(gates), n_bias_hh, proj)


# --------------------------------------------------------------------------------------------
# Unrolling in time
# --------------------------------------------------------------------------------------------


def _close(a: Mom, b: Mom) -> bool:
    return all(abs(p - q) <= _STATIONARY_TOL * max(abs(p), abs(q), 1e-30) for p, q in zip(a, b))


def _run_forward(cell: _Cell, xs: list[Mom]) -> list[_Step]:
    """Step the state moments from h_0 = c_0 = 0 through the input moments ``xs``.

    Once the input repeats and the state stopped moving, later steps are copies, so a
    10 000-step sequence costs no more than the transient.
    """
    h: Mom = (0.0, 0.0)
    c: Mom = (0.0, 0.0)
    steps: list[_Step] = []
    for t, x in enumerate(xs):
        if steps and t > 0 and xs[t - 1] == x and len(steps) >= 2:
            last, before = steps[-1], steps[-2]
            if _close(last.h, before.h) and _close(last.c, before.c):
                steps.append(last)
                continue
        st = cell.step(x, h, c)
        steps.append(st)
        h, c = st.h, st.c
    return steps


def _fixed_point(cell: _Cell, x: Mom) -> _Step:
    """The stationary step for a constant input: what ``chi`` through time is measured at."""
    h: Mom = (0.0, 0.0)
    c: Mom = (0.0, 0.0)
    st = cell.step(x, h, c)
    for _ in range(_MAX_FIXED_POINT_STEPS):
        nxt = cell.step(x, st.h, st.c)
        if _close(nxt.h, st.h) and _close(nxt.c, st.c):
            return nxt
        st = nxt
    return st


def _perron(op: Callable[[float, float], tuple[float, float]], has_c: bool) -> float:
    """Largest eigenvalue of the (non-negative, linear) per-step map, by power iteration."""
    sh, sc = 1.0, 1.0 if has_c else 0.0
    rate = 0.0
    for _ in range(_POWER_ITERATIONS):
        nh, nc = op(sh, sc)
        norm = nh + nc
        if not math.isfinite(norm) or norm <= _TINY:
            return norm if math.isfinite(norm) else math.inf
        new_rate = norm / (sh + sc)
        sh, sc = nh / norm, nc / norm
        if abs(new_rate - rate) <= 1e-12 * new_rate:
            return new_rate
        rate = new_rate
    return rate


def _run_backward(cell: _Cell, steps: list[_Step], entry: list[float]) -> list[float]:
    """Per-element squared gradient at each x_t, from per-element entries at each h_t."""
    sh = 0.0
    sc = 0.0
    sx = [0.0] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        sh, sc, sx[t] = cell.back(sh + entry[t], sc, steps[t].coef)
    return sx


@dataclass
class _Layer:
    cells: list[_Cell]  # one per direction


@dataclass
class _Result:
    estimate: RecurrentEstimate
    profile: list[float]  # predicted ||dL/dx_t||^2 / S_out per position


def _layers(module: nn.Module, kind: str) -> list[_Layer]:
    if not isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        raise NotImplementedError(f"{type(module).__name__} is not nn.LSTM / nn.GRU / nn.RNN")
    dirs = 2 if module.bidirectional else 1
    out_size = int(getattr(module, "proj_size", 0) or 0) or int(module.hidden_size)
    layers = []
    for k in range(int(module.num_layers)):
        size = int(module.input_size) if k == 0 else dirs * out_size
        suffixes = [f"_l{k}", f"_l{k}_reverse"][:dirs]
        layers.append(_Layer([_cell_from(module, kind, s, size) for s in suffixes]))
    return layers


def _dropout(module: nn.Module) -> float:
    p = float(getattr(module, "dropout", 0.0) or 0.0)
    return p if module.training and 0.0 < p < 1.0 else 0.0


def _run(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
         entry: Entry) -> _Result:
    kind = _kind(module)
    if entry not in ("last", "uniform"):
        raise ValueError(f"entry must be 'last' or 'uniform', got {entry!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    layers = _layers(module, kind)
    drop = _dropout(module)
    T = int(seq_len)

    # Forward: moments per position, layer by layer; directions see the sequence reversed.
    xs: list[Mom] = [(float(x_mean), float(x_second))] * T
    x_stat: Mom = xs[0]
    all_steps: list[list[list[_Step]]] = []
    stationary: list[list[_Step]] = []
    for li, layer in enumerate(layers):
        per_dir = []
        for d, cell in enumerate(layer.cells):
            seq = xs if d == 0 else xs[::-1]
            st = _run_forward(cell, seq)
            per_dir.append(st if d == 0 else st[::-1])
        all_steps.append(per_dir)
        fixed = [_fixed_point(cell, x_stat) for cell in layer.cells]
        stationary.append(fixed)
        scale = 1.0 / (1.0 - drop) if li < len(layers) - 1 else 1.0
        n_dir = len(layer.cells)
        xs = [
            (sum(p[t].h[0] for p in per_dir) / n_dir,
             scale * sum(p[t].h[1] for p in per_dir) / n_dir)
            for t in range(T)
        ]
        x_stat = (sum(f.h[0] for f in fixed) / n_dir, scale * sum(f.h[1] for f in fixed) / n_dir)

    top = layers[-1]
    out_mean = sum(m for m, _ in xs) / T
    out_second = sum(q for _, q in xs) / T
    h_second = x_stat[1]

    # Backward: per-element entries at the top layer's outputs, then layer by layer.
    n_out = sum(c.out_size for c in top.cells)
    if entry == "last":
        top_entry = [[0.0] * T for _ in top.cells]
        for e in top_entry:
            e[T - 1] = 1.0 / n_out
    else:
        top_entry = [[1.0 / (T * n_out)] * T for _ in top.cells]
    entries = top_entry
    sx_total: list[float] = [0.0] * T
    for li in range(len(layers) - 1, -1, -1):
        layer = layers[li]
        sx_total = [0.0] * T
        for d, cell in enumerate(layer.cells):
            st = all_steps[li][d]
            e = entries[d]
            if d == 1:
                sx = _run_backward(cell, st[::-1], e[::-1])[::-1]
            else:
                sx = _run_backward(cell, st, e)
            sx_total = [a + b for a, b in zip(sx_total, sx, strict=True)]
        if li > 0:
            scale = 1.0 / (1.0 - drop) if drop else 1.0
            entries = [[scale * s for s in sx_total] for _ in layers[li - 1].cells]
    d_in = layers[0].cells[0].input_size
    profile = [d_in * s for s in sx_total]
    input_gain = sum(profile)

    # Chi through time: the slowest decay over layers and directions.
    rates: list[tuple[float, int, int]] = []
    for li, layer in enumerate(layers):
        for d, cell in enumerate(layer.cells):
            k = stationary[li][d].coef
            rates.append((_perron(cell.step_operator(k), kind == "lstm"), li, d))
    step_gain, li_max, d_max = max(rates)
    note = _note(layers[li_max].cells[d_max], stationary[li_max][d_max].coef, step_gain,
                 li_max if len(layers) > 1 else None)
    est = RecurrentEstimate(out_mean, out_second, h_second, input_gain, step_gain, T, note)
    return _Result(est, profile)


def _note(cell: _Cell, k: dict[str, float], chi: float, layer: int | None) -> str:
    where = f" (layer {layer})" if layer is not None else ""
    if cell.kind == "lstm":
        h_path = chi - k["f2"]
        return (f"forget gate E[f^2]={k['f2']:.3g} per step{where}; h paths add "
                f"{max(h_path, 0.0):.2g}; chi through time {chi:.3g}")
    if cell.kind == "gru":
        return (f"update gate E[z^2]={k['z2']:.3g} per step{where}; chi through time {chi:.3g}")
    hh = cell.gates[0].hh.gain
    return (f"recurrent weight gain H*E[w^2]={hh:.3g} x E[phi'^2]={k['dphi2']:.3g}{where}; "
            f"chi through time {chi:.3g}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def estimate_recurrent(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
                       entry: str = "last") -> RecurrentEstimate:
    """Mean-field estimate for ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` over ``seq_len`` steps.

    ``x_mean`` and ``x_second`` are the input sequence's per-element mean and second moment.
    ``entry`` says where the gradient enters the output sequence: ``"last"`` (only the last
    step, as when a head reads ``output[:, -1]``) or ``"uniform"`` (every step equally).
    Any ``num_layers``, ``bidirectional``, ``bias``, ``proj_size`` (LSTM) and inter-layer
    dropout in training mode are modelled. Raises ``NotImplementedError`` for other modules.
    """
    return _run(module, x_mean, x_second, seq_len, _entry(entry)).estimate


def input_gradient_profile(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
                           entry: str = "last") -> list[float]:
    """Predicted ``||dL/dx_t||^2 / S_out`` for each position ``t`` (sums to ``input_gain``).

    Why it is public: how fast the gradient decays from the end of the sequence, not only
    its total, is what decides whether early steps can be learned.
    """
    return _run(module, x_mean, x_second, seq_len, _entry(entry)).profile


def _entry(entry: str) -> Entry:
    if entry == "last":
        return "last"
    if entry == "uniform":
        return "uniform"
    raise ValueError(f"entry must be 'last' or 'uniform', got {entry!r}")


def estimate_cell(module: nn.Module, x_mean: float, x_second: float, h_second: float,
                  c_second: float | None = None) -> tuple[float, float, dict[str, float]]:
    """One step of ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell``.

    Returns the new hidden state's (mean, second moment) and the S-gains
    ``||dL/d input||^2 / ||dL/d h'||^2`` to ``"input"``, ``"hx"`` and (LSTM) ``"cx"``, with the
    gradient entering at ``h'`` only. The states are taken as zero-mean with second moments
    ``h_second`` and ``c_second``; ``c_second=None`` means: zero if ``h_second`` is 0 (no state
    passed), else the cell state's stationary value for these inputs, as in a loop that has run
    for a while.
    """
    if not isinstance(module, (nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
        raise NotImplementedError(f"{type(module).__name__} is not an RNN cell module")
    kind = _kind(module)
    cell = _cell_from(module, kind, "", int(module.input_size))
    x: Mom = (float(x_mean), float(x_second))
    h: Mom = (0.0, float(h_second))
    c: Mom = (0.0, 0.0)
    if kind == "lstm":
        if c_second is not None:
            c = (0.0, float(c_second))
        elif h_second > 0.0:
            c = _stationary_c(cell, x, h)
    st = cell.step(x, h, c)
    s_h_prev, s_c_prev, s_x = cell.back(1.0 / cell.out_size, 0.0, st.coef)
    gains = {"input": cell.input_size * s_x, "hx": cell.out_size * s_h_prev}
    if kind == "lstm":
        gains["cx"] = cell.hidden * s_c_prev
    return st.h[0], st.h[1], gains


def _stationary_c(cell: _Cell, x: Mom, h: Mom) -> Mom:
    """Fixed point of ``c' = f c + i g`` with the gates' moments held at (x, h)."""
    c: Mom = (0.0, 0.0)
    for _ in range(_MAX_FIXED_POINT_STEPS):
        nxt = cell.step(x, h, c).c
        if _close(nxt, c):
            return nxt
        c = nxt
    return c


def _unused(*_: Any) -> None:  # pragma: no cover - keeps the import list honest for mypy
    return None
