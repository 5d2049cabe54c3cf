"""Mean-field estimate of gradient flow through recurrent layers (LSTM, GRU, RNN) and cells.

A recurrent layer is one op in the traced graph but a deep network in time: the gradient that
enters at the last step reaches step ``t`` only after ``T - 1 - t`` applications of the step
Jacobian. This module unrolls that recursion on moments over a sequence, with the bookkeeping of
the static estimate (squared norms and S-gains, ``docs/static-estimate.md``); one step of one
cell is ``rnn_cell``, the gates' Gaussian moments and weight blocks ``rnn_gates``.

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
resolvent (see :meth:`gradscope.estimate.rnn_cell.Cell.step_gain`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from gradscope.estimate.rnn_cell import (
    N_GATES,
    Cell,
    Coef,
    Step,
    cell_from,
    cell_kind,
    int_attr,
)
from gradscope.estimate.rnn_gates import ZERO, UnitMoments, Vec

__all__ = [
    "RecurrentEstimate",
    "estimate_cell",
    "estimate_recurrent",
    "input_gradient_profile",
]

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


def _per_unit(module: nn.Module, n_steps: int = 1) -> bool:
    """Whether resolving units stays within budget (meta modules included: they are drawn)."""
    gate_weights = sum(p.numel() for name, p in module.named_parameters()
                       if name.startswith(("weight_ih", "weight_hh")))
    return gate_weights * min(n_steps, 500) <= _PER_UNIT_BUDGET


# --------------------------------------------------------------------------------------------
# Unrolling in time
# --------------------------------------------------------------------------------------------


def _pack(st: Step) -> Vec:
    return np.concatenate([st.h.mean, st.h.second, st.c.mean, st.c.second])


def _unpack(v: Vec, like: Step) -> tuple[UnitMoments, UnitMoments]:
    sizes = [like.h.mean.size, like.h.second.size, like.c.mean.size, like.c.second.size]
    hm, hq, cm, cq = np.split(v, np.cumsum(sizes)[:-1])
    return UnitMoments(hm, np.maximum(hq, hm * hm)), UnitMoments(cm, np.maximum(cq, cm * cm))


def _anderson(cell: Cell, x: UnitMoments, start: Step, settle: bool,
              iters: int) -> tuple[Step, bool]:
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


def _fixed_point(cell: Cell, x: UnitMoments) -> Step:
    """The stationary step for a constant input: where chi through time is evaluated.

    Plain steps relax at the slowest gate's rate (~0.987 per step for an LSTM at forget bias
    3: 3000 steps to 1e-16). Solving for the slow state in closed form and iterating that
    ("settle") is unstable alone, because the per-unit cell means feed back through
    ``1 / (1 - f)`` ~ 20; with Anderson acceleration (mixing the last iterates, GMRES-like) it
    converges in 20-150 iterations. Where even that fails (forget bias 5 and up, where the
    per-unit moment map wanders instead of settling) the state after a few hundred plain steps
    stands in for it: h's second moment is then steady to a few percent.
    """
    zero_state = Step(ZERO, ZERO, {})
    start = cell.step(x, ZERO, ZERO)
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


def _run_forward(cell: Cell, xs: list[UnitMoments], x_stat: UnitMoments, fixed: Step) -> list[Step]:
    """Step the state moments from h_0 = c_0 = 0 through the input moments ``xs``.

    Once the input is the stationary input and the state has reached the fixed point, the
    fixed point's step is reused for the rest of the sequence.
    """
    h, c = ZERO, ZERO
    steps: list[Step] = []
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


def _run_mean_field(cell: Cell, steps: list[Step], entry: list[Vec]) -> list[Vec]:
    """Per-element squared gradient at each x_t from per-element entries at each h_t."""
    sh, sc = np.zeros(1), np.zeros(1)
    sx: list[Vec] = [np.zeros(1)] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        sh, sc, sx[t] = cell.back(sh + entry[t], sc, steps[t].coef)
    return sx


def _concat(parts: list[UnitMoments], sizes: list[int], per_unit: bool) -> UnitMoments:
    """The next layer's input: both directions' outputs side by side."""
    if len(parts) == 1:
        return parts[0]
    if not per_unit:
        return UnitMoments(np.array([np.mean([float(np.mean(p.mean)) for p in parts])]),
                    np.array([np.mean([float(np.mean(p.second)) for p in parts])]))
    pairs = list(zip(parts, sizes, strict=True))
    return UnitMoments(np.concatenate([np.broadcast_to(p.mean, (n,)) for p, n in pairs]),
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
    #: ``||dL/dx_t||^2 / S_out`` per position ``t`` (what :func:`input_gradient_profile`
    #: returns): the report draws the gradient per time step from it.
    profile: tuple[float, ...] = ()


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
    layers: list[list[Cell]]
    steps: list[list[list[Step]]]  # [layer][direction][position]
    fixed: list[list[Step]]  # [layer][direction]
    out: list[UnitMoments]  # top layer output per position
    out_stat: UnitMoments


def _forward(module: nn.Module, kind: str, x_mean: float, x_second: float,
             n_steps: int, stationary_only: bool = False) -> _Forward:
    """Every layer's cells, fixed points and steps over the sequence.

    ``stationary_only``: the cells and fixed points alone (``steps`` stays empty). Each
    layer's fixed point depends only on the stationary input, which is the layer below's
    fixed-point output, so the chain of fixed points does not need the sequence: what chi
    through time needs (:func:`step_gain_through_time`) at a fraction of the unroll's cost.
    """
    per_unit = _per_unit(module, n_steps)
    rng = np.random.default_rng(_SEED) if per_unit else None
    dirs = 2 if module.bidirectional else 1
    out_size = int_attr(module, "proj_size") or int_attr(module, "hidden_size")
    drop = _dropout(module)
    x_stat = UnitMoments.scalar(x_mean, x_second)
    xs: list[UnitMoments] = [x_stat] * n_steps
    fw = _Forward([], [], [], xs, x_stat)
    for li in range(int_attr(module, "num_layers")):
        size = int_attr(module, "input_size") if li == 0 else dirs * out_size
        cells = [cell_from(module, kind, s, size, rng)
                 for s in [f"_l{li}", f"_l{li}_reverse"][:dirs]]
        fixed = [_fixed_point(cell, x_stat) for cell in cells]
        fw.layers.append(cells)
        fw.fixed.append(fixed)
        scale = 1.0 / (1.0 - drop) if li < int_attr(module, "num_layers") - 1 else 1.0
        sizes = [c.out_size for c in cells]

        def scaled(m: UnitMoments, s: float = scale) -> UnitMoments:
            return m if s == 1.0 else UnitMoments(m.mean, s * m.second)

        new_stat = scaled(_concat([f.h for f in fixed], sizes, per_unit))
        if stationary_only:
            xs, x_stat = [new_stat] * n_steps, new_stat
            fw.out, fw.out_stat = xs, x_stat
            continue
        per_dir = []
        for d, cell in enumerate(cells):
            st = _run_forward(cell, xs if d == 0 else xs[::-1], x_stat, fixed[d])
            per_dir.append(st if d == 0 else st[::-1])
        fw.steps.append(per_dir)
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
        c.hidden * N_GATES[c.kind] * (c.input_size + c.out_size)
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


def _summarised(steps: list[Step]) -> list[Step]:
    """Steps with unit-averaged coefficients (shared steps stay shared)."""
    done: dict[int, Step] = {}
    out = []
    for st in steps:
        if id(st) not in done:
            coef = {k: (np.array([float(np.mean(m))]), np.array([float(np.mean(q))]))
                    for k, (m, q) in st.coef.items()}
            done[id(st)] = Step(st.h, st.c, coef)
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


def _checked(module: nn.Module, x_mean: float, x_second: float, seq_len: int) -> int:
    """The number of steps, after checking what the unroll models."""
    if not isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        raise NotImplementedError(f"{type(module).__name__} is not nn.LSTM / nn.GRU / nn.RNN")
    n_steps = int(seq_len)
    if n_steps < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not (math.isfinite(x_mean) and math.isfinite(x_second)):
        raise ValueError(f"input moments must be finite, got {x_mean!r}, {x_second!r}")
    return n_steps


def _run(module: nn.Module, x_mean: float, x_second: float, seq_len: int,
         entry: Entry) -> _Result:
    n_steps = _checked(module, x_mean, x_second, seq_len)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return _run_checked(module, cell_kind(module), x_mean, x_second, n_steps, entry)


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
    step_gain, li_max, d_max = _step_gain(fw)
    where = f" (layer {li_max})" if len(fw.layers) > 1 else ""
    note = _note(fw.layers[li_max][d_max], fw.fixed[li_max][d_max].coef, step_gain,
                 where) + f"; input gradients by {how}"
    out_mean = float(np.mean([np.mean(x.mean) for x in fw.out]))
    out_second = float(np.mean([np.mean(x.second) for x in fw.out]))
    est = RecurrentEstimate(out_mean, out_second, float(np.mean(fw.out_stat.second)),
                            float(sum(profile)), step_gain, n_steps, note, tuple(profile))
    return _Result(est, profile)


def _step_gain(fw: _Forward) -> tuple[float, int, int]:
    """Chi through time, the largest over layers and directions, and where it is."""
    return max((cell.step_gain(fw.fixed[li][d].coef), li, d)
               for li, cells in enumerate(fw.layers) for d, cell in enumerate(cells))


def _note(cell: Cell, k: dict[str, Coef], chi: float, where: str) -> str:
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


def step_gain_through_time(module: nn.Module, x_mean: float, x_second: float,
                           seq_len: int) -> float:
    """``estimate_recurrent(...).step_gain`` from the layers' fixed points alone.

    The same number (the same cells, drawn in the same order, and the same fixed points),
    without the unroll over the sequence or the surrogate backward: verifying a fix of the
    recurrent weights needs only this, and the full estimate cost ~1.7 s on a 2-layer
    512-unit LSTM over 64 steps where this costs about a third of it.
    """
    n_steps = _checked(module, x_mean, x_second, seq_len)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        fw = _forward(module, cell_kind(module), x_mean, max(x_second, x_mean * x_mean),
                      n_steps, stationary_only=True)
        return _step_gain(fw)[0]


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
    kind = cell_kind(module)
    rng = np.random.default_rng(_SEED) if _per_unit(module) else None
    cell = cell_from(module, kind, "", int_attr(module, "input_size"), rng)
    x = UnitMoments.scalar(x_mean, max(x_second, x_mean * x_mean))
    h = UnitMoments.scalar(0.0, max(h_second, 0.0))
    c = ZERO
    if kind == "lstm":
        if c_second is not None:
            c = UnitMoments.scalar(0.0, max(c_second, 0.0))
        elif h_second > 0.0:
            settled = cell.step(x, h, c, settle=True).c
            c = UnitMoments(np.zeros_like(settled.second), settled.second)
    st = cell.step(x, h, c)
    s_h, s_c, s_x = cell.back(np.array([1.0 / cell.out_size]), np.zeros(1), st.coef)
    gains = {"input": _total(s_x, cell.input_size), "hx": _total(s_h, cell.out_size)}
    if kind == "lstm":
        gains["cx"] = _total(s_c, cell.hidden)
    return float(np.mean(st.h.mean)), float(np.mean(st.h.second)), gains



# --------------------------------------------------------------------------------------------
# A cell called in a loop: one traced call per step, the weights shared
# --------------------------------------------------------------------------------------------
#
# ``for t in range(T): h = cell(x[:, t], h)`` traces to T calls of one ``*Cell`` module (or,
# exported, T ``aten.lstm_cell`` / ``gru_cell`` / ``rnn_tanh_cell`` / ``rnn_relu_cell`` nodes
# reading the same weights). That is the unroll of ``nn.LSTM`` written out, and it needs what
# the unroll needs: the state's *per-unit* moments carried from call to call (PyTorch's biases
# are per unit and fixed in time, so each unit's state keeps a mean of its own), and a
# backward through the *tied* weights (the coherent part of the step Jacobian, see the module
# docstring: an LSTM's squared gradient decays ~0.39 per step with tied weights against 0.27
# under independent-step mean field, 4.8 decades of norm over 60 steps). The graph, though,
# is swept node by node, each node returning one gain per input. So the chain's calls share
# one surrogate simulation (:func:`cell_chain_gains`) whose squared norms, at every h_t, c_t
# and x_t, are turned into per-call gains that reproduce them exactly along the chain.


class _CellParams(nn.Module):
    """The attributes ``cell_from`` reads, for an exported cell call (weights as arguments)."""

    def __init__(self, tensors: dict[str, torch.Tensor | None], hidden: int,
                 input_size: int) -> None:
        super().__init__()
        for name, t in tensors.items():
            if t is not None:
                # Plain attributes: registering would copy nothing, but nn.Parameter values
                # must stay the model's own tensors (meta ones included).
                object.__setattr__(self, name, t)
        self.hidden_size = hidden
        self.input_size = input_size
        self.proj_size = 0


def loop_cell(module: nn.Module | None, kind: str | None = None,
              tensors: dict[str, torch.Tensor | None] | None = None) -> Cell:
    """The cell of a ``*Cell`` module, or of an exported call's weight tensors.

    ``tensors``: ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` (biases may be None)
    with ``kind`` one of ``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``. Resolved per unit (the
    actual weights, or default-init draws for meta tensors) within ``_PER_UNIT_BUDGET``.
    """
    if module is not None:
        if not isinstance(module, (nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
            raise NotImplementedError(f"{type(module).__name__} is not an RNN cell module")
        kind = cell_kind(module)
        source: nn.Module = module
    else:
        if tensors is None or kind not in N_GATES:
            raise NotImplementedError(f"cell kind {kind!r} is not modelled")
        w_ih, w_hh = tensors.get("weight_ih"), tensors.get("weight_hh")
        if w_ih is None or w_hh is None or w_ih.dim() != 2 or w_hh.dim() != 2:
            raise NotImplementedError("cell weights missing")
        source = _CellParams(tensors, int(w_hh.shape[1]), int(w_ih.shape[1]))
    assert kind is not None
    gate_weights = sum(int(t.numel()) for name in ("weight_ih", "weight_hh")
                       if isinstance(t := getattr(source, name, None), torch.Tensor))
    rng = np.random.default_rng(_SEED) if gate_weights <= _PER_UNIT_BUDGET else None
    return cell_from(source, kind, "", int_attr(source, "input_size"), rng)


def loop_step(cell: Cell, x_mean: float, x_second: float, h: UnitMoments,
              c: UnitMoments) -> Step:
    """One call: the state's per-unit moments from the previous call's (or ``ZERO``)."""
    x = UnitMoments.scalar(x_mean, max(x_second, x_mean * x_mean))
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return cell.step(x, h, c)


def cell_chain_gains(cell: Cell, steps: list[Step], entry_h: list[bool], entry_c: list[bool],
                     coherent: list[Vec | None] | None = None
                     ) -> tuple[list[dict[str, float]], Vec | None]:
    """S-gains of each call of a chain to its ``input``, ``hx`` and ``cx``.

    The gradient enters (independently, equal squared norms) at ``h_t`` where ``entry_h[t]``
    and at ``c_t`` where ``entry_c[t]`` (at the last call's ``h`` when no entry is marked).
    A surrogate simulation through the tied weights (:meth:`Cell.simulate`) gives the squared
    norms ``S_h[t]``, ``S_c[t]`` and ``S_x[t]``; call ``t``'s gains are those over its
    output's ``S_h[t] + S_c[t]``, to ``hx`` what it passes back before step ``t-1``'s own
    entry is added. Multiplied along the chain they give back the simulated norms exactly
    where the entries are as assumed, which is what the engine's node-by-node sweep needs.
    Too large to simulate: the independent-step mean field (``Cell.back``), as for a
    recurrent layer.

    ``coherent``: the actual probe gradients entering at each ``h_t`` (None: none), the
    simulated input gradients of cell calls that read ``h_t``, when those are all the entries.
    They are correlated in time, so the squared norms of entry and carried gradient do not
    add: the gain to ``hx`` is then what the entry gains by the carried gradient,
    ``(S_h[t-1] - |entry_{t-1}|^2) / S[t]`` (at least 0), so that the engine's sum gives
    ``S_h[t-1]`` back. Also returned: the simulated gradients at each ``x_t``
    (T, input, probes), which a chain below takes as its entries; None without simulation.
    """
    n = len(steps)
    if not any(entry_h) and not any(entry_c):
        entry_h = [False] * (n - 1) + [True]
    given = [e for e in coherent or [] if e is not None]
    gx: Vec | None = None
    entered = [0.0] * n
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        probes = int(given[0].shape[-1]) if given else _chain_probes(cell, n)
        if probes:
            rng = np.random.default_rng(_SEED)
            eh = np.zeros((n, cell.out_size, probes))
            ec = np.zeros((n, cell.hidden, probes))
            for t in range(n):
                if coherent is not None:
                    if coherent[t] is not None:
                        eh[t] = coherent[t]
                        entered[t] = float(np.sum(eh[t] * eh[t]))
                elif entry_h[t]:
                    eh[t] = rng.standard_normal((cell.out_size, probes))
                if entry_c[t] and cell.kind == "lstm":
                    ec[t] = rng.standard_normal((cell.hidden, probes))
            norms: list[tuple[float, float, float, float]] = []
            gx = cell.simulate(steps, eh, rng, cell.mats(rng), entry_c=ec, norms=norms)
            sx = [float(np.sum(g * g)) for g in gx]
        else:
            coherent = None
            norms, sx = _chain_mean_field(cell, steps, entry_h, entry_c)
    gains: list[dict[str, float]] = []
    for t in range(n):
        sh_in, sc_in, sh_out, sc_out = norms[t]
        total = sh_in + sc_in
        if not total > 0.0:
            gains.append({"input": 0.0, "hx": 0.0, "cx": 0.0})
            continue
        if coherent is not None and t > 0:
            sh_out = max(norms[t - 1][0] - entered[t - 1], 0.0)
        gains.append({"input": _ratio(sx[t], total), "hx": _ratio(sh_out, total),
                      "cx": _ratio(sc_out, total)})
    return gains, gx


def _ratio(a: float, b: float) -> float:
    r = a / b
    return r if math.isfinite(r) else 1e300


def _chain_probes(cell: Cell, n_steps: int) -> int:
    """Probe count for a chain, with the budgets of a recurrent layer (``_probes``)."""
    per_probe = n_steps * cell.hidden * N_GATES[cell.kind] * (cell.input_size + cell.out_size)
    want = int(min(max(math.ceil(_PROBE_TARGET / max(cell.input_size, 1)), _PROBES_MIN),
                   _PROBES_MAX))
    affordable = int(_SIM_BUDGET // max(per_probe, 1))
    storable = int(_SIM_MEMORY // (24 * n_steps * max(cell.input_size, cell.out_size,
                                                       cell.hidden, 1)))
    k = min(want, affordable, storable)
    return k if k >= _PROBES_MIN else 0


def _chain_mean_field(cell: Cell, steps: list[Step], entry_h: list[bool], entry_c: list[bool]
                      ) -> tuple[list[tuple[float, float, float, float]], list[float]]:
    """Independent-step mean field with block statistics: the chain's fallback."""
    small = cell.summarised()
    n = len(steps)
    sh, sc = np.zeros(1), np.zeros(1)
    unit_h, unit_c = np.array([1.0 / cell.out_size]), np.array([1.0 / cell.hidden])
    norms: list[tuple[float, float, float, float]] = [(0.0, 0.0, 0.0, 0.0)] * n
    sx: list[float] = [0.0] * n
    for t, st in zip(range(n - 1, -1, -1), _summarised(steps)[::-1], strict=True):
        if entry_h[t]:
            sh = sh + unit_h
        if entry_c[t] and cell.kind == "lstm":
            sc = sc + unit_c
        h_in, c_in = _total(sh, cell.out_size), _total(sc, cell.hidden)
        sh, sc, s_x = small.back(sh, sc, st.coef)
        sx[t] = _total(s_x, cell.input_size)
        norms[t] = (h_in, c_in, _total(sh, cell.out_size), _total(sc, cell.hidden))
    return norms, sx
