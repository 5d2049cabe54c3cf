"""The static estimate's sweeps: forward moments, backward gains, and what they imply.

Mean-field propagation (``docs/static-estimate.md``): a forward sweep carries
each node's output mean m and second moment q (over units and samples); a
backward sweep carries S, the expected squared norm of dLoss/d(node output)
relative to the model output. Working in squared norms rather than
per-element variances makes routing ops (reshape, slicing, concat,
broadcasting) exactly gain 1, so only ops that really scale the gradient
have a gain. Per-element RMS, the report's ``static_grad_rms``, is derived
at the end.

A second backward sweep, the *structural* gain, applies only the gains of
averaging ops (mean, average pooling, and attention's value path, a mean over
the keys at initialisation): they shrink the gradient norm by design without
starving any weight. ``health = S / structural`` is what the
vanishing and exploding rules judge, so global average pooling or a width
change is never mistaken for attenuation.

S is the mean over weights and inputs; what the report gives is the typical value
of S pooled over the probe's samples, ``ln E[S] - D + h_N(V)``, from the per-sample
Jensen gap D and log-variance V that dense and activation ops add along the same
backward sweep (``gradscope.estimate.fluctuation``): in a narrow chaotic network
the mean is carried by rare samples and sits decades above any measured figure.

This module is the driver only: each op's rule comes from the op catalogue
(``gradscope.estimate.catalogue``) by the node's canonical key, the weights'
moments from ``gradscope.estimate.statistics``. It also tracks the spread of
unit means from node to node, which the activation, normalisation and
pooling rules read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from gradscope.estimate.catalogue import backward_rule, forward_rule, understands
from gradscope.estimate.coherence import CoherenceBackward
from gradscope.estimate.collapse import CollapseForward
from gradscope.estimate.fluctuation import chi2_log_stats, typical_log_shift
from gradscope.estimate.ops_activation import activation_log_gain
from gradscope.estimate.ops_base import (
    STRUCTURAL,
    Ctx,
    SweepState,
    pass_backward,
    pass_forward,
)
from gradscope.estimate.ops_dense import unit_mean_fan
from gradscope.estimate.segments import SegmentBackward, SegmentForward
from gradscope.estimate.spread import cat_spread
from gradscope.estimate.statistics import (
    Mom,
    cached_fact,
    numel,
    statistics_scope,
    tensor_stats,
    unit_means_spread,
    var_of,
    weight_stats,
)
from gradscope.estimate.tied import find_tied_blocks
from gradscope.options import AnalysisOptions
from gradscope.tracing.graph import NodeRecord, TracedModel, node_record
from gradscope.tracing.ops import AVERAGING_KEYS, DENSE_KEYS, NORM_KEYS

#: The probe's default number of batches: the predicted figure pools as many samples.
PROBE_BATCHES: int = AnalysisOptions.batches


@dataclass
class StaticEstimate:
    """Per-node forward moments and backward gains, and what they imply."""

    moments: dict[str, Mom | None] = field(default_factory=dict)
    sq_norm: dict[str, float] = field(default_factory=dict)
    structural: dict[str, float] = field(default_factory=dict)
    understood: dict[str, bool] = field(default_factory=dict)
    grad_rms: dict[str, float | None] = field(default_factory=dict)
    health: dict[str, float | None] = field(default_factory=dict)
    coverage: float = 1.0
    unknown_ops: list[str] = field(default_factory=list)
    #: Recurrent layers' unrolls by node: step gain through time, steps, what dominates.
    recurrent: dict[str, Any] = field(default_factory=dict)
    #: The expected (annealed) S before the fluctuation shift; ``sq_norm`` is the
    #: typical pooled value (``gradscope.estimate.fluctuation``).
    sq_norm_mean: dict[str, float] = field(default_factory=dict)
    #: Per node: Jensen gap D and variance V of one sample's ln S (ibid.).
    log_gap: dict[str, float] = field(default_factory=dict)
    log_var: dict[str, float] = field(default_factory=dict)
    #: Samples the pooled figure averages over: batch size x ``batches``.
    samples: int = 1
    batches: int = 1


# ---------------------------------------------------------------------------
# The sweeps


class _Estimator(SweepState):
    """One estimate of one traced model: the sweep state plus the sweeps themselves."""

    #: Samples per batch (leading dimension of the first input tensor).
    batch: int = 1

    def _needs_grad(self, order: list[str]) -> dict[str, bool]:
        """Which nodes carry a gradient: downstream of a trainable weight or a float input."""
        needs: dict[str, bool] = {}
        for name in order:
            data = node_record(self.graph, name)
            if not data.is_float:
                needs[name] = False
            elif data.role == "input":
                needs[name] = True
            elif data.role == "param":
                tensor = self.tensor_of(name)
                needs[name] = bool(tensor is not None and tensor.requires_grad)
            elif data.key in _no_grad_keys():
                needs[name] = False
            elif data.kind == "call_module" and self._trains(data):
                needs[name] = True  # its weights are not graph nodes (nn.Embedding on ids)
            else:
                needs[name] = any(needs.get(p, False) for p in self.graph.predecessors(name))
        return needs

    def _trains(self, data: NodeRecord) -> bool:
        module = self.traced.modules.get(data.module or "")
        return module is not None and any(p.requires_grad for p in module.parameters())

    def _log_stats(self, ctx: Ctx, src: str) -> tuple[float, float]:
        """(d, v) of one sample's ln-gain from ``ctx``'s node to ``src``: dense and activation.

        Unit counts are per sample (numel over the batch size): the fluctuation is
        over one sample's units; how samples pool is :func:`typical_log_shift`'s.
        """
        key = ctx.data.key
        try:
            if key in DENSE_KEYS:
                return chi2_log_stats((numel(ctx.shape(src)) or 0) / self.batch)
            if key.startswith("activation:"):
                return activation_log_gain(ctx, (numel(ctx.shape()) or 0) // self.batch)
        except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
            pass  # as for a rule that fails: the mean alone
        return 0.0, 0.0

    def run(self, batches: int = 1) -> StaticEstimate:
        order = self.traced.order()
        est = StaticEstimate()
        # positions of unlike scale along one axis (a class token): gradscope.estimate.segments
        segments = SegmentForward(self)
        # residual blocks holding equal weights add coherently: gradscope.estimate.tied
        tied = find_tied_blocks(self.traced)
        # the share of each signal that is the same at every position: estimate.collapse
        collapse = CollapseForward(self, tied)
        input_index = 0
        for name in order:
            data = node_record(self.graph, name)
            role = data.role
            if not data.is_float:
                self.moments[name] = None
                if role == "input":
                    input_index += 1
                continue
            if role == "input":
                value = self.inputs[input_index] if input_index < len(self.inputs) else None
                input_index += 1
                # the same inputs in every fix's re-estimate: read once per traced model
                self.spread[name] = cached_fact(
                    self.traced.weight_facts, "unit_means_spread", (value,),
                    functools.partial(unit_means_spread, value)) \
                    if isinstance(value, torch.Tensor) else 0.0
                self.moments[name] = tensor_stats(value) if isinstance(value, torch.Tensor) \
                    else (0.0, 1.0)
                continue
            if role == "param":
                tensor = self.tensor_of(name)
                self.moments[name] = tensor_stats(tensor) if tensor is not None else None
                continue
            key = data.key
            ctx = Ctx(self, name)
            known = understands(key)
            est.understood[name] = known
            fwd = forward_rule(key)
            self.pending_spread = None
            try:
                mom = segments.run(ctx, fwd, fwd(ctx))
            except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
                mom, est.understood[name] = pass_forward(ctx), False
            self.moments[name] = tied.forward(name, self.moments, _finite_moments(mom),
                                              name in segments.segments)
            self.spread[name] = _spread_of(ctx, self.moments[name], self.pending_spread)
            collapse.run(ctx, self.moments[name])
        est.moments = dict(self.moments)
        needs_grad = self._needs_grad(order)

        out = self.traced.output_node
        ancestors = nx.ancestors(self.graph, out) | {out}
        sq: dict[str, float] = {n: 0.0 for n in order}
        structural: dict[str, float] = {n: 0.0 for n in order}
        sq[out] = 1.0
        self.backward_sq = sq
        structural[out] = 1.0
        per_segment = SegmentBackward(segments, self.graph)
        # S-weighted sums of the per-sample log statistics (fluctuation.py): D and V of a
        # node are these over its S once every consumer has added in.
        gap_w: dict[str, float] = {n: 0.0 for n in order}
        var_w: dict[str, float] = {n: 0.0 for n in order}
        self.batch = max(next((int(t.shape[0]) for t in self.inputs
                               if isinstance(t, torch.Tensor) and t.dim() > 0), 1), 1)
        # the share of each gradient that is the same at every position: estimate.coherence
        coherence = CoherenceBackward(self)
        for name in reversed(order):
            # a block's fork (an input node too): its deposits are all in by now
            coherent = tied.backward(name, sq, name in segments.segments)
            if coherent is not None:
                sq[name] = coherent
            if name not in ancestors or node_record(self.graph, name).role != "compute" \
                    or not needs_grad[name]:
                continue
            data = node_record(self.graph, name)
            key = data.key
            ctx = Ctx(self, name)
            bwd = backward_rule(key)
            own = coherence.of(name, sq[name])
            self.grad_coherence[name] = own
            try:
                gains = bwd(ctx)
            except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
                gains = pass_backward(ctx)
            try:
                by_segment = per_segment.propagate(ctx, sq[name], bwd, _finite)
            except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
                by_segment = {}
            structural_gains = _structural_gains(ctx, gains)
            gap, var = _ratio(gap_w[name], sq[name]), _ratio(var_w[name], sq[name])
            try:
                passed = coherence.transfer(ctx, own)
            except (ValueError, ZeroDivisionError, OverflowError, IndexError, TypeError):
                passed = {}
            for src, gain in gains.items():
                if not needs_grad.get(src) or node_record(self.graph, src).role == "param":
                    continue
                before = sq[src]
                if src in by_segment:
                    per_segment.deposit(sq, src, *by_segment[src])
                else:
                    per_segment.deposit(sq, src, sq[name] * _finite(gain))
                part = sq[src] - before
                if part > 0:
                    d, v = self._log_stats(ctx, src)
                    gap_w[src] += part * (gap + d)
                    var_w[src] += part * (var + v)
                if src in passed:
                    coherence.deposit(src, sq[name] * _finite(gain), passed[src])
                structural[src] = max(structural[src],
                                      structural[name] * structural_gains.get(src, 1.0))
        est.sq_norm_mean = dict(sq)
        est.batches = max(batches, 1)
        est.samples = self.batch * est.batches
        for name in order:
            est.log_gap[name] = _ratio(gap_w[name], sq[name])
            est.log_var[name] = _ratio(var_w[name], sq[name])
            sq[name] *= math.exp(typical_log_shift(est.log_gap[name], est.log_var[name],
                                                   est.samples))
        est.sq_norm = sq
        est.recurrent = dict(self.recurrent)
        est.structural = structural

        out_numel = numel(node_record(self.graph, out).shape) or 1
        for name in order:
            data = node_record(self.graph, name)
            if data.role == "param" or not needs_grad[name] or name not in ancestors:
                est.grad_rms[name] = None
                est.health[name] = None
                continue
            n = numel(data.shape) or out_numel
            est.grad_rms[name] = math.sqrt(sq[name] * out_numel / n)
            est.health[name] = math.sqrt(sq[name] / structural[name]) \
                if structural[name] > 0 else None
        float_compute = [n for n in order if node_record(self.graph, n).role == "compute"
                         and node_record(self.graph, n).is_float]
        known_count = sum(1 for n in float_compute if est.understood.get(n, False))
        est.coverage = known_count / len(float_compute) if float_compute else 1.0
        est.unknown_ops = sorted({node_record(self.graph, n).op for n in float_compute
                                  if not est.understood.get(n, False)})
        return est


def _spread_of(ctx: Ctx, mom: Mom | None, pending: float | None) -> float:
    """The spread of unit means of a node's output (see ``SweepState.spread``)."""
    if mom is None:
        return 0.0
    key = ctx.data.key
    first = ctx.first()
    spread_in = ctx.est.spread.get(first, 0.0) if first else 0.0
    if pending is not None:
        value = pending
    elif key in DENSE_KEYS:
        # unit c's mean is sum_j W_cj mu_j + b_c: it varies with the weights even when
        # every input unit has the same mean.
        xm = ctx.est.moments.get(first) if first else None
        if xm is None:
            return 0.0
        w = ctx.weight("mat2", 2) if key == "addmm" else ctx.weight("weight", 1)
        b = ctx.weight("input", 0) if key == "addmm" else ctx.weight("bias", 2)
        if w is None:
            return 0.0
        fan = unit_mean_fan(ctx, w)
        _, w2 = weight_stats(w, (0.0, 1.0 / (3.0 * fan)))
        _, b2 = weight_stats(b, (0.0, 0.0)) if b is not None else (0.0, 0.0)
        unit_mean_sq = fan * w2 * (xm[0] ** 2 + spread_in) + b2
        value = unit_mean_sq - mom[0] ** 2
    elif key in NORM_KEYS:
        beta = ctx.param_by_suffix("bias")
        value = var_of(weight_stats(beta, (0.0, 0.0))) if key == "batch_norm" else 0.0
    elif key in ("add", "sub", "rsub"):
        value = sum(ctx.est.spread.get(r, 0.0) for r in ctx.activations_in())
    elif key == "cat":
        value = cat_spread(ctx)
    elif key in ("view", "getitem", "max_pool", "avg_pool", "mean", "dropout", "neg",
                 "split") or key == "input":
        value = spread_in
    else:
        value = 0.0
    return min(max(value, 0.0), var_of(mom))


def _no_grad_keys() -> frozenset[str]:
    return frozenset({"detach", "constant"})


def _structural_gains(ctx: Ctx, gains: dict[str, float]) -> dict[str, float]:
    """The part of each gain that averaging ops impose by design (see module docstring)."""
    key = ctx.data.key
    if key in AVERAGING_KEYS:
        return dict(gains)
    if key in STRUCTURAL:
        return STRUCTURAL[key](ctx)
    if key == "sum":
        return dict(gains)
    if key == "cat":
        return dict(gains)
    return {}


def _ratio(weighted: float, total: float) -> float:
    return weighted / total if total > 0 and math.isfinite(weighted / total) else 0.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e300


def _finite_moments(m: Mom | None) -> Mom | None:
    if m is None:
        return None
    mean, second = m
    if not (math.isfinite(mean) and math.isfinite(second)):
        return None
    return mean, max(second, 0.0)


def estimate(traced: TracedModel, inputs: tuple[Any, ...],
             declared: dict[int, Mom] | None = None,
             overrides: dict[int, Mom] | None = None,
             batches: int = PROBE_BATCHES) -> StaticEstimate:
    """Run the forward and backward sweeps over ``traced``'s graph.

    ``inputs`` give the input moments (real tensors, even when the graph was
    traced on meta ones); ``declared`` maps ``id(tensor)`` of meta weights to
    their declared init moments; ``overrides`` replaces any weight's moments
    (by ``id``), for what-if estimates of a re-initialisation. ``batches``:
    how many batches like ``inputs`` the predicted figure pools, as the probe
    does (``gradscope.estimate.fluctuation``; it only matters where one
    sample's gradient fluctuates by orders of magnitude).
    """
    with statistics_scope(declared, overrides, traced.measured):
        return _Estimator(traced, inputs).run(batches)
