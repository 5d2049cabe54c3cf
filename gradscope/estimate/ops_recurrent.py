"""Op rules for recurrent modules: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and their cells.

The unroll over time is ``gradscope.estimate.recurrent``; this module reads
from the graph what it needs: the input's moments, the sequence length, and
where the gradient enters the output sequence (the last step, or every step).
For cells called in a loop it also reads which calls chain into which (one
call's new state is the next one's state, same weights), where the gradient
enters the chain (a call's h read by anything else), and whether those readers
are calls of another simulated cell (cells stacked in one loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from gradscope.estimate.ops_base import Ctx, pass_backward, rule
from gradscope.estimate.recurrent import (
    cell_chain_gains,
    estimate_recurrent,
    loop_cell,
    loop_step,
)
from gradscope.estimate.rnn_cell import Cell, Step
from gradscope.estimate.rnn_gates import ZERO, UnitMoments
from gradscope.estimate.statistics import Mom, numel
from gradscope.tracing.graph import Ref, node_record


def _rnn_entry(ctx: Ctx) -> str:
    """Where the gradient enters an RNN's output sequence: the last step, or every step.

    Read off the graph: if whatever consumes the output sequence keeps fewer
    elements than it has (``out[:, -1]``), or only the final hidden state is used,
    the gradient enters at the end; otherwise all along.
    """
    graph = ctx.est.graph
    numel_out = numel(ctx.shape())
    direct = []
    for succ in graph.successors(ctx.name):
        record = node_record(graph, succ)
        index = record.args[1] if len(record.args) > 1 else None
        if record.key != "getitem" or not isinstance(index, int):
            direct.append(succ)
            continue
        if index != 0:
            continue
        for consumer in graph.successors(succ):
            n = numel(node_record(graph, consumer).shape)
            if numel_out and n and n * 2 <= numel_out:
                return "last"
        return "uniform"
    # The runtime recorder links consumers to the module's node itself (unpacking the
    # output tuple calls no torch function): each reads the sequence, the final state, or
    # a slice of either, and its size says which. Without this a language model's
    # ``output, hidden = self.rnn(emb)`` read as "last step only" (a GS103 false error).
    for succ in direct:
        n = numel(node_record(graph, succ).shape)
        if numel_out and n and n * 2 > numel_out:
            return "uniform"
    return "last"


def _rnn(ctx: Ctx) -> Any:
    if ctx.name in ctx.est.recurrent:
        return ctx.est.recurrent[ctx.name]  # the unroll is costly: forward and backward share it
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    shape = ctx.shape(first) if first else None
    if xm is None or shape is None or ctx.module is None:
        return None
    batch_first = bool(getattr(ctx.module, "batch_first", False))
    seq_len = int(shape[1] if batch_first and len(shape) == 3 else shape[0])
    result = estimate_recurrent(ctx.module, xm[0], xm[1], seq_len, entry=_rnn_entry(ctx))
    ctx.est.recurrent[ctx.name] = result
    return result


@rule("rnn")
class _RNN:
    """nn.LSTM / nn.GRU / nn.RNN, unrolled over the sequence (gradscope.estimate.recurrent)."""

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        result = _rnn(ctx)
        return (result.out_mean, result.out_second) if result is not None else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        result = _rnn(ctx)
        first = ctx.first()
        if first is None:
            return {}
        return {first: result.input_gain if result is not None else 1.0}


#: Exported cell calls (``aten.<op>(input, hx, w_ih, w_hh, b_ih, b_hh)``) by cell kind.
_ATEN_CELLS = {"lstm_cell": "lstm", "gru_cell": "gru", "rnn_tanh_cell": "rnn_tanh",
               "rnn_relu_cell": "rnn_relu"}
#: Nodes that create a zero state (what PyTorch takes for ``hx=None``).
_ZEROS = frozenset({"zeros", "new_zeros", "zeros_like"})
_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclass
class _Call:
    """One call of a cell in a loop, as the forward sweep found it."""

    cell: Cell
    step: Step
    chain: list[str]  # the calls of its chain so far, in order (shared by all of them)
    x: str | None
    h: str | None
    c: str | None
    out_h: str | None = None  # the node that is this call's new h (itself, or getitem 0)
    out_c: str | None = None  # LSTM: getitem 1
    next: str | None = None


def _state_refs(ctx: Ctx) -> tuple[str | None, str | None, str | None]:
    """(input, h, c) references of a cell call: ``cell(x, h)`` / ``cell(x, (h, c))``."""

    def ref(v: Any) -> str | None:
        return v.name if isinstance(v, Ref) else None

    x = ref(ctx.arg(0, "input"))
    hx = ctx.arg(1, "hx")
    if isinstance(hx, (list, tuple)):
        return x, ref(hx[0]) if hx else None, ref(hx[1]) if len(hx) > 1 else None
    return x, ref(hx), None


def _cell_identity(ctx: Ctx) -> tuple[Any, ...] | None:
    """What makes two calls the same cell: the module, or the weight nodes read."""
    if ctx.module is not None:
        return ("module", id(ctx.module))
    weights = tuple(v.name if isinstance(v, Ref) else None for v in ctx.args[2:6])
    return ("weights", ctx.data.op, weights) if weights and weights[0] else None


def _cell(ctx: Ctx, identity: tuple[Any, ...]) -> Cell:
    cached = ctx.est.chains.get(identity)
    if isinstance(cached, Cell):
        return cached
    if ctx.module is not None:
        cell = loop_cell(ctx.module)
    else:
        kind = _ATEN_CELLS.get(ctx.data.op)
        refs = list(ctx.args[2:6]) + [None] * (6 - len(ctx.args))
        tensors = {name: ctx.est.tensor_of(r.name) if isinstance(r, Ref) else None
                   for name, r in zip(_WEIGHTS, refs, strict=False)}
        cell = loop_cell(None, kind, tensors)
    ctx.est.chains[identity] = cell
    return cell


def _source(ctx: Ctx, ref: str | None, index: int) -> tuple[str, int] | None:
    """The cell call a state comes from and which output (0: h, 1: c), if it is one.

    ``index``: the state's place in ``hx``, taken as the output it is when the call itself is
    referenced (the runtime recorder keeps an LSTMCell's ``(h, c)`` as one node, no getitem).
    """
    if ref is None:
        return None
    rec = node_record(ctx.est.graph, ref)
    if rec.key == "rnn_cell":
        return ref, index
    if rec.key == "getitem" and len(rec.args) > 1 and isinstance(rec.args[0], Ref) \
            and isinstance(rec.args[1], int) \
            and node_record(ctx.est.graph, rec.args[0].name).key == "rnn_cell":
        return rec.args[0].name, rec.args[1]
    return None


def _given_state(ctx: Ctx, ref: str | None) -> UnitMoments:
    """A state handed in from outside the chain: zero when absent or created as zeros."""
    if ref is None or node_record(ctx.est.graph, ref).op in _ZEROS:
        return ZERO
    mom = ctx.est.moments.get(ref)
    if mom is None:
        return ZERO
    return UnitMoments.scalar(0.0, max(mom[1], 0.0)) if mom[1] > 0.0 else ZERO


def _call(ctx: Ctx) -> _Call | None:
    """This call's step, chained to the previous call of the same cell when it feeds it.

    The previous call's state is taken per unit (not the graph's scalar moments): units keep
    their own means through time (``gradscope.estimate.recurrent``).
    """
    found = ctx.est.chains.get(ctx.name)
    if isinstance(found, _Call):
        return found
    identity = _cell_identity(ctx)
    if identity is None:
        return None
    try:
        cell = _cell(ctx, identity)
    except NotImplementedError as exc:  # weights not as PyTorch declares them
        raise ValueError(str(exc)) from exc  # the sweep's "not understood", not a crash
    x, h, c = _state_refs(ctx)
    xm = ctx.est.moments.get(x) if x else None
    if xm is None:
        return None
    src_h, src_c = _source(ctx, h, 0), _source(ctx, c, 1)
    prev: Any = None
    if src_h is not None and src_h[1] == 0:
        prev = ctx.est.chains.get(src_h[0])
        if isinstance(prev, _Call) and (prev.next is not None
                                        or _cell_identity(Ctx(ctx.est, src_h[0])) != identity
                                        or (cell.kind == "lstm" and src_c != (src_h[0], 1))):
            prev = None  # another cell, or a second call on the same state: a chain of its own
    if isinstance(prev, _Call):
        h_state, c_state = prev.step.h, prev.step.c
        chain = prev.chain
    else:
        prev = None
        h_state = _given_state(ctx, h)
        c_state = _given_state(ctx, c) if cell.kind == "lstm" else ZERO
        chain = []
    step = loop_step(cell, xm[0], xm[1], h_state, c_state)
    call = _Call(cell, step, chain, x, h, c)
    if prev is not None:
        prev.next = ctx.name
    chain.append(ctx.name)
    ctx.est.chains[ctx.name] = call
    return call


def _outputs(ctx: Ctx, name: str, call: _Call) -> tuple[list[str], list[str]]:
    """Nodes that are a call's new h and new c: the call itself, and its getitem 0 and 1.

    A consumer of an LSTM call's tuple itself (not through getitem) counts as reading h.
    """
    graph = ctx.est.graph
    if call.cell.kind != "lstm":
        return [name], []
    hs: list[str] = [name]
    cs: list[str] = []
    for succ in graph.successors(name):
        rec = node_record(graph, succ)
        if rec.key == "getitem" and len(rec.args) > 1 and rec.args[1] in (0, 1):
            (hs if rec.args[1] == 0 else cs).append(succ)
    return hs, cs


def _readers(ctx: Ctx, outs: list[str], next_call: str | None) -> list[tuple[str, str]]:
    """(output, consumer) pairs through which the gradient reaches these outputs from outside
    the chain; the model's output itself is its own consumer."""
    graph = ctx.est.graph
    target = ctx.est.traced.output_node
    found: list[tuple[str, str]] = []
    for out in outs:
        if out == target:
            found.append((out, out))
        for succ in graph.successors(out):
            rec = node_record(graph, succ)
            if succ == next_call or (rec.key == "getitem" and rec.args
                                     and rec.args[0] == Ref(out)
                                     and node_record(graph, out).key == "rnn_cell"):
                continue  # the chain itself, or the call's own h / c (judged on their own)
            if succ == target or nx.has_path(graph, succ, target):
                found.append((out, succ))
    return found


def _coherent_entries(ctx: Ctx, readers: list[list[tuple[str, str]]]) -> list[Any] | None:
    """The probe gradients entering each step, where every reader is a simulated cell call.

    A stack of cells in one loop (``h1 = c1(x_t, h1); h2 = c2(h1, h2)``): the gradient that
    reaches ``h1_t`` is ``c2``'s input gradient at step t, and those are correlated in time
    (the same vectors propagated through ``c2``'s tied weights), so in ``c1`` they add
    coherently, as between the layers of an ``nn.LSTM`` (``gradscope.estimate.recurrent``'s
    docstring: 2x at the input of a two-layer LSTM under independent entries). The upper
    chain, swept first, left its simulated input gradients by call; they are this chain's
    entries. None when any reader is something else (then entries are independent).
    """
    if not any(readers):
        return None
    entries: list[Any] = []
    for step in readers:
        total = None
        for out, reader in step:
            rec = node_record(ctx.est.graph, reader)
            stored = ctx.est.chains.get(("gx", reader))
            upper = ctx.est.chains.get(reader)
            if rec.key != "rnn_cell" or stored is None or not isinstance(upper, _Call) \
                    or upper.x != out:
                return None
            if total is not None and total.shape != stored.shape:
                return None
            total = stored if total is None else total + stored
        entries.append(total)
    shapes = {e.shape for e in entries if e is not None}
    return entries if len(shapes) == 1 else None


def _chain_gains(ctx: Ctx, call: _Call) -> dict[str, float]:
    """This call's gains, from the simulation its whole chain shares."""
    key = ("gains", call.chain[0])
    table = ctx.est.chains.get(key)
    if not isinstance(table, dict):
        calls = [ctx.est.chains[n] for n in call.chain]
        read_h, read_c = [], []
        for name, cc in zip(call.chain, calls, strict=True):
            hs, cs = _outputs(ctx, name, cc)
            read_h.append(_readers(ctx, hs, cc.next))
            read_c.append(_readers(ctx, cs, cc.next))
        coherent = None if any(read_c) else _coherent_entries(ctx, read_h)
        gains, gx = cell_chain_gains(call.cell, [cc.step for cc in calls],
                                     [bool(r) for r in read_h], [bool(r) for r in read_c],
                                     coherent)
        table = dict(zip(call.chain, gains, strict=True))
        ctx.est.chains[key] = table
        if gx is not None:
            for name, g in zip(call.chain, gx, strict=True):
                ctx.est.chains[("gx", name)] = g
    return dict(table[ctx.name])


@rule("rnn_cell")
class _RNNCell:
    """nn.LSTMCell / GRUCell / RNNCell (or their exported aten calls), in a loop or alone.

    Successive calls where one's new state is the next one's state form a chain: the unroll
    of a recurrent layer, estimated as one (``gradscope.estimate.recurrent``, "A cell called
    in a loop"). A single call is a chain of one.
    """

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        call = _call(ctx)
        if call is None:
            return None
        return float(np.mean(call.step.h.mean)), float(np.mean(call.step.h.second))

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        call = _call(ctx)
        if call is None:
            return pass_backward(ctx)
        got = _chain_gains(ctx, call)
        gains: dict[str, float] = {}
        for ref, role in ((call.x, "input"), (call.h, "hx"), (call.c, "cx")):
            if ref is not None:
                gains[ref] = gains.get(ref, 0.0) + got[role]
        return gains
