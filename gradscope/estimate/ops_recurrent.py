"""Op rules for recurrent modules: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and their cells.

The unroll over time is ``gradscope.estimate.recurrent``; this module reads
from the graph what it needs: the input's moments, the sequence length, and
where the gradient enters the output sequence (the last step, or every step).
"""

from __future__ import annotations

from typing import Any

from gradscope.estimate.ops_base import Ctx, pass_backward, rule
from gradscope.estimate.recurrent import estimate_cell, estimate_recurrent
from gradscope.estimate.statistics import Mom, numel
from gradscope.tracing.graph import node_record


def _rnn_entry(ctx: Ctx) -> str:
    """Where the gradient enters an RNN's output sequence: the last step, or every step.

    Read off the graph: if whatever consumes the output sequence keeps fewer
    elements than it has (``out[:, -1]``), or only the final hidden state is used,
    the gradient enters at the end; otherwise all along.
    """
    graph = ctx.est.graph
    numel_out = numel(ctx.shape())
    for succ in graph.successors(ctx.name):
        index = node_record(graph, succ).args[1] if len(node_record(graph, succ).args) > 1 else None
        if node_record(graph, succ).key != "getitem" or index != 0:
            continue
        for consumer in graph.successors(succ):
            n = numel(node_record(graph, consumer).shape)
            if numel_out and n and n * 2 <= numel_out:
                return "last"
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


@rule("rnn_cell")
class _RNNCell:
    """nn.LSTMCell / GRUCell / RNNCell: one step, gains to input, hx and cx."""

    @staticmethod
    def _run(ctx: Ctx) -> tuple[float, float, dict[str, float]] | None:
        refs = [r for r in ctx.activations_in()]
        if not refs or ctx.module is None:
            return None
        xm = ctx.est.moments.get(refs[0])
        hm = ctx.est.moments.get(refs[1]) if len(refs) > 1 else (0.0, 0.0)
        cm = ctx.est.moments.get(refs[2]) if len(refs) > 2 else None
        if xm is None or hm is None:
            return None
        return estimate_cell(ctx.module, xm[0], xm[1], hm[1], cm[1] if cm else None)

    @staticmethod
    def forward(ctx: Ctx) -> Mom | None:
        got = _RNNCell._run(ctx)
        return (got[0], got[1]) if got else None

    @staticmethod
    def backward(ctx: Ctx) -> dict[str, float]:
        got = _RNNCell._run(ctx)
        refs = ctx.activations_in()
        if got is None:
            return pass_backward(ctx)
        gains: dict[str, float] = {}
        for ref, role in zip(refs, ("input", "hx", "cx"), strict=False):
            gains[ref] = gains.get(ref, 0.0) + got[2].get(role, 0.0)
        return gains
