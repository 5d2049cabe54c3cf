"""Cells called in a Python loop against brute force (torch autograd, float64, written here).

``for t in range(T): h = cell(x[:, t], h)`` traces to T calls of one ``nn.*Cell`` (symbolic
trace: ``call_module`` nodes) or to T ``aten.lstm_cell`` / ``gru_cell`` / ``rnn_tanh_cell``
nodes (export). Either way it is the unroll of a recurrent layer, and the static estimate
must see it as one (``gradscope.estimate.recurrent``, "A cell called in a loop"): the state's
per-unit moments carried from call to call, the backward through the tied weights. Before,
the exported calls were unknown ops (gain 1 per step: classic/rnncell_loop was 7.9 decades
off), and the module calls were each estimated alone by independent-step mean field with a
zero-mean scalar state: on this test's symbolic-trace cases the median |log10| was 0.68
(RNNCell), 1.67 (GRUCell) and 8.8 (LSTMCell), the estimate far too low.

Brute force: inputs ``x ~ N(0, 1)`` (64, T, 16), hidden 32, default init (seeded), the loop's
last ``h`` is the output, ``loss = sum(h_T * r)`` with a fixed random ``r``. Per call t the
measured figure is what the engine's ``sq_norm`` estimates: ``(||dL/dh_t||^2 + ||dL/dc_t||^2)
/ ||r||^2`` (the call's output is the tuple (h, c) for an LSTM). Tolerance: the median over
calls of ``|log10(estimate / measured)|`` <= 0.3 (the zoo's agreement figure), and every call
within 0.6. Measured when written (median / worst): see ``_CASES``.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from gradscope.estimate.engine import estimate
from gradscope.tracing import trace_model
from gradscope.tracing.nodes import node_record

BATCH, FEATURES, HIDDEN, STEPS = 64, 16, 32, 30


class _Loop(nn.Module):
    """A cell in a loop from a zero state; ``export_zeros`` makes symbolic_trace fail."""

    def __init__(self, cell: nn.Module, export_zeros: bool, every_step: bool = False) -> None:
        super().__init__()
        self.cell = cell
        self.export_zeros = export_zeros
        self.every_step = every_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_zeros:
            h = torch.zeros(x.shape[0], HIDDEN, dtype=x.dtype, device=x.device)
        else:
            h = x.new_zeros(x.shape[0], HIDDEN)
        c = h
        outs = []
        for t in range(STEPS):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
            outs.append(h)
        return torch.stack(outs, 1) if self.every_step else h


def _brute_force(cell: nn.Module, x: torch.Tensor, every_step: bool = False) -> list[float]:
    """``(||dL/dh_t||^2 + ||dL/dc_t||^2) / ||r||^2`` per call, loss ``sum(out * r)``."""
    hs: list[torch.Tensor] = []
    cs: list[torch.Tensor] = []
    h = torch.zeros(x.shape[0], HIDDEN, dtype=x.dtype)
    c = torch.zeros_like(h)
    for t in range(STEPS):
        if isinstance(cell, nn.LSTMCell):
            h, c = cell(x[:, t], (h, c))
            cs.append(c)
        else:
            h = cell(x[:, t], h)
        hs.append(h)
    out = torch.stack(hs, 1) if every_step else h
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    grads = torch.autograd.grad((out * r).sum(), hs + cs, allow_unused=True)
    s_out = float((r * r).sum())
    sq = [float((g * g).sum()) if g is not None else 0.0 for g in grads]
    return [(sq[t] + (sq[STEPS + t] if cs else 0.0)) / s_out for t in range(STEPS)]


class _HandCell(nn.Module):
    """``tanh(W_ih x + b_ih + W_hh h + b_hh)`` written out: generic ops, no cell op."""

    def __init__(self) -> None:
        super().__init__()
        self.ih = nn.Linear(FEATURES, HIDDEN)
        self.hh = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.ih(x) + self.hh(h))


def _make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"rnn": lambda: nn.RNNCell(FEATURES, HIDDEN),
            "gru": lambda: nn.GRUCell(FEATURES, HIDDEN),
            "lstm": lambda: nn.LSTMCell(FEATURES, HIDDEN),
            "hand": _HandCell}[kind]().double()


#: (cell kind, tracer): median / worst |log10| when written.
_CASES = [
    ("rnn", "symbolic_trace"),  # 0.05 / 0.10
    ("rnn", "export"),  # 0.05 / 0.10
    ("gru", "symbolic_trace"),  # 0.04 / 0.18
    ("gru", "export"),  # 0.04 / 0.18
    ("lstm", "symbolic_trace"),  # 0.10 / 0.19
    ("lstm", "export"),  # 0.10 / 0.19
    ("lstm", "runtime"),  # 0.10 / 0.19 (the runtime recorder has no getitem for (h, c))
    # Not a cell op: linear, add and tanh nodes, estimated op by op, each step's W_hh as if
    # drawn afresh. 0.51 / 1.02 (the estimate too high): at H=32 this W_hh's tied powers decay
    # faster than independent draws of its entries would (autograd with W_hh's entries
    # shuffled at every step: 0.93 decades more at t=0). At H=64 and 128 the same test gives
    # 0.08 and 0.02. Not fixed: the op-by-op sweep has no notion of a weight reused along a
    # path (see the module docstring of gradscope.estimate.recurrent).
    pytest.param("hand", "symbolic_trace", marks=pytest.mark.xfail(
        strict=True, reason="tied W_hh of a written-out cell: estimated as independent steps")),
]


def _agreement(kind: str, tracer: str, every_step: bool = False) -> list[float]:
    """log10(estimate / brute force) per step of the loop."""
    cell = _make(kind)
    model = _Loop(cell, tracer == "export", every_step).double()
    x = torch.randn(BATCH, STEPS, FEATURES, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    traced = trace_model(model, (x,), method=tracer)
    est = estimate(traced, (x,))
    step_key = "activation:tanh" if kind == "hand" else "rnn_cell"
    calls = [n for n in traced.order() if node_record(traced.graph, n).key == step_key]
    assert len(calls) == STEPS
    assert all(est.understood[n] for n in calls)
    measured = _brute_force(cell, x, every_step)
    return [math.log10(est.sq_norm[n] / m) for n, m in zip(calls, measured, strict=True)]


@pytest.mark.parametrize(("kind", "tracer"), _CASES)
def test_cell_loop_against_brute_force(kind: str, tracer: str) -> None:
    logs = _agreement(kind, tracer)
    assert statistics.median(abs(v) for v in logs) <= 0.3, logs
    assert max(abs(v) for v in logs) <= 0.6, logs


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cell_loop_read_at_every_step(kind: str) -> None:
    """Every call's h is also an output (``torch.stack(outs, 1)``): the gradient enters all
    along the chain, as for an ``nn.LSTM`` whose whole output sequence is read. Measured
    when written (median / worst): GRU 0.01 / 0.03, LSTM 0.08 / 0.11."""
    logs = _agreement(kind, "symbolic_trace", every_step=True)
    assert statistics.median(abs(v) for v in logs) <= 0.3, logs
    assert max(abs(v) for v in logs) <= 0.6, logs


class _Stack(nn.Module):
    """Two cells in one loop, the second reading the first's h: a two-layer RNN written out."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        make = nn.LSTMCell if kind == "lstm" else nn.GRUCell
        self.lower = make(FEATURES, HIDDEN)
        self.upper = make(HIDDEN, HIDDEN)
        #: When a list, the lower cell's states are appended to it (for the brute force).
        self.keep: list[torch.Tensor] | None = None

    def step(self, cell: nn.Module, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(cell, nn.LSTMCell):
            h, c = cell(x, state)
            return h, c
        h = cell(x, state[0])
        return h, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = x.new_zeros(x.shape[0], HIDDEN)
        low, up = (zero, zero), (zero, zero)
        for t in range(STEPS):
            low = self.step(self.lower, x[:, t], low)
            up = self.step(self.upper, low[0], up)
            if self.keep is not None:
                self.keep.extend(low if isinstance(self.lower, nn.LSTMCell) else low[:1])
        return up[0]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_stacked_cells_in_one_loop(kind: str) -> None:
    """The lower cell's entries are the upper cell's input gradients, correlated in time: they
    add coherently (``ops_recurrent._coherent_entries``). Taken as independent entries, the
    lower calls came out low: median |log10| 1.22 (GRU) and 0.89 (LSTM) here, 0.44 and 0.38
    at hidden 64 over 40 steps. Measured when written (median / worst over the lower calls):
    GRU 0.07 / 0.10, LSTM 0.19 / 0.29."""
    model = _Stack(kind).double()
    x = torch.randn(BATCH, STEPS, FEATURES, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    traced = trace_model(model, (x,), method="symbolic_trace")
    est = estimate(traced, (x,))
    calls = [n for n in traced.order() if node_record(traced.graph, n).key == "rnn_cell"
             and node_record(traced.graph, n).module == "lower"]
    assert len(calls) == STEPS
    kept: list[torch.Tensor] = []
    model.keep = kept
    out = model(x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    grads = torch.autograd.grad((out * r).sum(), kept)
    sq = [float((g * g).sum()) / float((r * r).sum()) for g in grads]
    per = len(sq) // STEPS  # (h, c) per step for an LSTM, h for a GRU
    measured = [sum(sq[per * t : per * (t + 1)]) for t in range(STEPS)]
    logs = [math.log10(est.sq_norm[n] / m) for n, m in zip(calls, measured, strict=True)]
    assert statistics.median(abs(v) for v in logs) <= 0.3, logs
    assert max(abs(v) for v in logs) <= 0.6, logs
