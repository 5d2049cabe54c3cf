"""The gradient's coherent share: how much of it is the same vector at every position.

The backward sweep carries S, the gradient's squared norm, and every op rule
assumed the gradient at different positions (tokens, pixels) to be
independent. That is wrong when the model output reads an *average* over
positions: a mean-pooled sentence classifier, a ViT or CNN with global average
pooling, an encoder read only through cross-attention. Then dLoss/dh_i = g/T
for every position i, one vector g repeated, and ops that mix positions pass
it differently from independent gradients. Attention is the one that matters:
its value path maps the output gradient G (rows i) to dV = P^T G, and for G_i
= g at every row

    dV_j = (sum_i p_ij) g = s_j g,  ||dV||^2 = sum_j s_j^2 ||g||^2,

where s_j, a column sum of the row-stochastic P, is ~T_q/T_k for near-uniform
rows: the squared norm passes with gain ~1 (self-attention), whereas
independent rows pass with A = E[sum_j p_ij^2] ~ 1/T. On a mean-pooled Pre-LN
encoder (T = 32) the value path was predicted 0.75 decade low in norm at every
block, exactly sqrt(T) (``tests/test_estimate_coherence.py``).

So each node's gradient carries a *coherent share* c in [0, 1] along a set of
its axes: the fraction of S in the part that is constant along those axes
(the mean over them, broadcast back). It is a lower bound for any subset of
the axes. It is *set* by reductions over positions (``mean``, ``sum``, global
``avg_pool``: the input's gradient is the output's broadcast, c = 1 along the
reduced axes) and by attention over near-uniform rows (see
:func:`gradscope.estimate.ops_attention.value_coherence`); it is *kept* by ops
that act on every position alike (``linear`` over the feature axis, LayerNorm /
RMSNorm: their backward removes the per-position mean over *features*, not
over positions; residual additions; reshapes and transposes, which move the
axes), *diluted* by pointwise ops whose derivative varies per position (an
activation keeps E[phi']^2 / E[phi'^2] of it, a product with another signal
(m^2 + spread) / q of the other factor's moments, dropout 1 - p), and *lost*
(c = 0, the old independent-positions assumption) at every op not listed here.
Where several consumers deposit into one node the coherent energies add:
c = sum_k c_k S_k / sum_k S_k, along the axes they have in common.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradscope.estimate.statistics import var_of
from gradscope.tracing.graph import Ref, node_record


@dataclass(frozen=True)
class Coherence:
    """``share`` of a gradient's squared norm that is constant along ``axes`` (non-negative)."""

    share: float
    axes: frozenset[int]

    def along(self, axis: int) -> float:
        """The share constant along ``axis`` (a lower bound: the set may hold more axes)."""
        return self.share if axis in self.axes else 0.0


INCOHERENT = Coherence(0.0, frozenset())

#: Ops (by their name, without an aten overload suffix) that swap two axes.
_SWAPS = frozenset({"transpose", "swapaxes", "t"})
#: Ops that keep every value where it is (copies, casts).
_COPIES = frozenset({"contiguous", "clone", "alias", "to", "type", "type_as", "float",
                     "double", "half", "bfloat16", "_to_copy", "copy", "lift_fresh_copy"})
#: Ops that only regroup axes without moving values (row-major): prefix products match.
_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze",
                       "unsqueeze", "view_as", "reshape_as"})
_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
_PICKS = frozenset({"select", "slice", "narrow"})


def _base_op(op: str) -> str:
    return op.split(".")[0]


def _axes_of(dims: Any, ndim: int) -> list[int] | None:
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    if not all(-ndim <= d < ndim for d in dims):
        return None
    return sorted({d % ndim for d in dims})


def map_reshape(axes: frozenset[int], out_shape: Sequence[int],
                in_shape: Sequence[int]) -> frozenset[int]:
    """Axes of ``out_shape`` that a row-major reshape from ``in_shape`` keeps whole.

    An axis survives when the input has an axis of the same size behind the same
    number of elements (equal prefix products): then it indexes the same values.
    """
    prefix_in: dict[tuple[int, int], int] = {}
    p = 1
    for b, size in enumerate(in_shape):
        prefix_in.setdefault((p, int(size)), b)
        p *= int(size)
    kept: set[int] = set()
    p = 1
    for a, size in enumerate(out_shape):
        if a in axes and size > 1 and (p, int(size)) in prefix_in:
            kept.add(prefix_in[(p, int(size))])
        p *= int(size)
    return frozenset(kept)


def map_broadcast(axes: frozenset[int], out_shape: Sequence[int],
                  in_shape: Sequence[int]) -> frozenset[int]:
    """Axes of a broadcast operand (right-aligned) that have the output's full size."""
    offset = len(out_shape) - len(in_shape)
    return frozenset(a - offset for a in axes
                     if a - offset >= 0 and in_shape[a - offset] == out_shape[a])


class CoherenceBackward:
    """The coherent share of each node's gradient, carried through the backward sweep.

    ``energy[n]`` is the coherent part of ``n``'s S deposited so far and
    ``axes[n]`` the axes it is constant along (None: nothing coherent deposited).
    """

    def __init__(self, state: Any) -> None:
        #: SweepState: moments, spread, the graph.
        self.state = state
        self.energy: dict[str, float] = {}
        self.axes: dict[str, frozenset[int]] = {}

    def of(self, name: str, total: float) -> Coherence:
        axes = self.axes.get(name)
        energy = self.energy.get(name, 0.0)
        if not axes or total <= 0.0 or energy <= 0.0:
            return INCOHERENT
        return Coherence(min(energy / total, 1.0), axes)

    def deposit(self, src: str, value: float, coh: Coherence) -> None:
        """Add a consumer's gradient of squared norm ``value`` and coherence ``coh``."""
        if coh.share <= 0.0 or not coh.axes or value <= 0.0:
            return
        held = self.axes.get(src)
        if held is None:
            self.axes[src] = coh.axes
            self.energy[src] = value * coh.share
            return
        common = held & coh.axes
        if not common:  # coherent along different axes: nothing shared is known
            self.axes[src] = frozenset()
            self.energy[src] = 0.0
            return
        self.axes[src] = common
        self.energy[src] = self.energy.get(src, 0.0) + value * coh.share

    # -----------------------------------------------------------------------
    def transfer(self, ctx: Any, coh: Coherence) -> dict[str, Coherence]:
        """The coherence of the gradient each signal input receives from ``ctx``'s node."""
        key = ctx.data.key
        if key in ("mean", "sum", "avg_pool"):
            return self._reduction(ctx, coh)
        if key == "sdpa":
            from gradscope.estimate.ops_attention import sdpa_coherence
            return sdpa_coherence(ctx, coh)
        if coh.share <= 0.0:
            return {}
        out_shape = ctx.shape()
        if out_shape is None:
            return {}
        ins = ctx.activations_in()
        if key in ("linear", "addmm") or (key == "matmul" and self._weight_second(ctx)):
            last = len(out_shape) - 1
            return self._same(ins[:1], Coherence(coh.share, coh.axes - {last}))
        if key in ("layer_norm", "rms_norm"):
            return self._same(ins[:1], self._drop_normalised(ctx, coh, out_shape))
        if key in ("add", "sub", "rsub"):
            return {r: self._broadcast(ctx, r, coh, out_shape) for r in ins}
        if key in ("mul", "div"):
            return self._product(ctx, coh, out_shape)
        if key == "dropout":
            from gradscope.estimate.ops_routing import _dropout_p
            return self._same(ins[:1], Coherence(coh.share * (1.0 - _dropout_p(ctx)), coh.axes))
        if key == "neg":
            return self._same(ins[:1], coh)
        if key.startswith("activation:"):
            return self._same(ins[:1], Coherence(coh.share * _slope_coherence(ctx),
                                                 coh.axes))
        if key == "view":
            return self._same(ins[:1], self._routed(ctx, coh, out_shape))
        if key == "cat":
            return self._cat(ctx, coh, out_shape)
        return {}

    @staticmethod
    def _same(ins: list[str], coh: Coherence) -> dict[str, Coherence]:
        if coh.share <= 0.0 or not coh.axes:
            return {}
        return {r: coh for r in ins}

    @staticmethod
    def _weight_second(ctx: Any) -> bool:
        other = ctx.arg(1, "other")
        return isinstance(other, Ref) and \
            node_record(ctx.est.graph, other.name).role == "param"

    def _reduction(self, ctx: Any, coh: Coherence) -> dict[str, Coherence]:
        """dx = broadcast(dy) / n (or without 1/n for sum): constant along the reduced axes."""
        first = ctx.first()
        in_shape = ctx.shape(first) if first else None
        out_shape = ctx.shape()
        if first is None or in_shape is None or out_shape is None:
            return {}
        ndim = len(in_shape)
        if ctx.data.key == "avg_pool":
            # only a global pool (each output reads a whole axis) makes dx constant along it
            spatial = range(2, ndim) if ndim > 2 else range(1, ndim)
            reduced = [a for a in spatial if len(out_shape) == ndim and out_shape[a] == 1
                       and in_shape[a] > 1]
        else:
            dims = ctx.arg(1, "dim")
            reduced = list(range(ndim)) if dims is None or dims == [] \
                else (_axes_of(dims, ndim) or [])
            reduced = [a for a in reduced if in_shape[a] > 1]
        if not reduced:
            return {}
        return {first: Coherence(1.0, frozenset(reduced))}

    @staticmethod
    def _drop_normalised(ctx: Any, coh: Coherence, out_shape: Sequence[int]) -> Coherence:
        """LayerNorm / RMSNorm over the trailing axes: the positions' coherence is kept.

        dx_i = (gamma / sigma_i) (g - mean_f g - xhat_i <xhat_i, g> / D): the first
        two terms are the same at every position when g is (sigma_i is the same
        statistic at every position), the last removes 1/D of the energy. Only
        the normalised (feature) axes leave the set.
        """
        norm = getattr(ctx.module, "normalized_shape", None) if ctx.module is not None \
            else ctx.arg(1, "normalized_shape")
        count = len(norm) if isinstance(norm, (list, tuple)) and norm else 1
        trailing = set(range(len(out_shape) - count, len(out_shape)))
        return Coherence(coh.share, coh.axes - trailing)

    def _broadcast(self, ctx: Any, src: str, coh: Coherence,
                   out_shape: Sequence[int]) -> Coherence:
        shape = ctx.shape(src)
        if shape is None:
            return INCOHERENT
        return Coherence(coh.share, map_broadcast(coh.axes, out_shape, shape))

    def _product(self, ctx: Any, coh: Coherence, out_shape: Sequence[int]) -> dict[str, Coherence]:
        """x * y: dx = y * g. The part of y common to all positions, (m^2 + spread) / q of
        y's moments, carries g's coherent part; a weight or a number (the same at every
        position) keeps it whole. Likewise for x / y (1/y to first order)."""
        out: dict[str, Coherence] = {}
        refs = [a for a in ctx.args[:2]]
        for i, arg in enumerate(refs):
            if not isinstance(arg, Ref):
                continue
            data = node_record(ctx.est.graph, arg.name)
            if data.role == "param" or not data.is_float:
                continue
            other = refs[1 - i] if len(refs) == 2 else None
            keep = 1.0
            if isinstance(other, Ref):
                odata = node_record(ctx.est.graph, other.name)
                oshape = ctx.shape(other.name) or ()
                position_free = all(
                    a - (len(out_shape) - len(oshape)) < 0
                    or oshape[a - (len(out_shape) - len(oshape))] == 1 for a in coh.axes)
                if odata.role != "param" and not position_free:
                    om = ctx.est.moments.get(other.name)
                    if om is None or om[1] <= 0.0:
                        keep = 0.0
                    else:
                        spread = ctx.est.spread.get(other.name, 0.0)
                        keep = min((om[0] ** 2 + min(spread, var_of(om))) / om[1], 1.0)
            got = self._broadcast(ctx, arg.name, Coherence(coh.share * keep, coh.axes),
                                  out_shape)
            if got.share > 0.0 and got.axes:
                out[arg.name] = got
        return out

    def _routed(self, ctx: Any, coh: Coherence, out_shape: Sequence[int]) -> Coherence:
        """Reshapes, transposes, copies and broadcasts move the axes; anything else drops them."""
        first = ctx.first()
        in_shape = ctx.shape(first) if first else None
        if in_shape is None:
            return INCOHERENT
        op = _base_op(str(ctx.data.op))
        axes = coh.axes
        if op in _COPIES and tuple(in_shape) == tuple(out_shape):
            return coh
        if op in _SWAPS:
            if op == "t" or len(out_shape) < 2:
                d0, d1 = 0, len(out_shape) - 1
            else:
                d0, d1 = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
                if not isinstance(d0, int) or not isinstance(d1, int):
                    return INCOHERENT
                d0, d1 = d0 % len(out_shape), d1 % len(out_shape)
            swap = {d0: d1, d1: d0}
            return Coherence(coh.share, frozenset(swap.get(a, a) for a in axes))
        if op == "permute":
            perm = ctx.arg(1, "dims")
            if not isinstance(perm, (list, tuple)):
                perm = [a for a in ctx.args[1:] if isinstance(a, int)]
            if len(perm) != len(out_shape) or not all(isinstance(p, int) for p in perm):
                return INCOHERENT
            return Coherence(coh.share, frozenset(perm[a] % len(out_shape) for a in axes))
        if op in _RESHAPES:
            return Coherence(coh.share, map_reshape(axes, out_shape, in_shape))
        if op in _EXPANDS:
            return Coherence(coh.share, map_broadcast(axes, out_shape, in_shape))
        if op in _PICKS and len(in_shape) >= len(out_shape):
            dim = ctx.arg(1, "dim", 0)
            if not isinstance(dim, int):
                return INCOHERENT
            dim %= len(in_shape)
            if op == "select":  # the selected axis is gone: later axes shift up by one
                return Coherence(coh.share, frozenset(a + (a >= dim) for a in axes))
            return Coherence(coh.share, frozenset(a for a in axes if a != dim))
        return INCOHERENT

    def _cat(self, ctx: Any, coh: Coherence, out_shape: Sequence[int]) -> dict[str, Coherence]:
        """Each part of a ``cat`` receives its slice: still constant along every tracked axis."""
        parts = ctx.arg(0, "tensors")
        if not isinstance(parts, (list, tuple)) or _base_op(str(ctx.data.op)) not in (
                "cat", "concat", "concatenate"):
            return {}
        out: dict[str, Coherence] = {}
        for part in parts:
            if isinstance(part, Ref):
                shape = ctx.shape(part.name)
                if shape is not None and len(shape) == len(out_shape) and \
                        node_record(ctx.est.graph, part.name).role != "param":
                    out[part.name] = coh
        return out


def _slope_coherence(ctx: Any) -> float:
    """E[phi'(x)]^2 / E[phi'(x)^2] for x ~ N(m, v): the share of a coherent gradient an
    activation keeps (dx_i = phi'(x_i) g; its mean over positions is E[phi'] g).

    E[phi'] = d E[phi(x)] / dm (Stein), by a central difference of the activation's
    Gaussian mean (``gradscope.estimate.activations``); E[phi'^2] is its ``grad_second``.
    """
    from gradscope.estimate.activations import activation_moments

    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    if xm is None:
        return 0.0
    name = ctx.data.key.split(":", 1)[1]
    try:
        from gradscope.estimate.ops_activation import _activation_params
        params = _activation_params(ctx, name)
    except (ImportError, AttributeError, TypeError, ValueError):
        params = {}
    m, v = xm[0], var_of(xm)
    h = 1e-3 * math.sqrt(v) + 1e-6
    try:
        up = activation_moments(name, m + h, v, **params)
        down = activation_moments(name, m - h, v, **params)
        mid = activation_moments(name, m, v, **params)
    except (ValueError, TypeError):
        return 0.0
    slope = (up.mean - down.mean) / (2 * h)
    if mid.grad_second <= 0.0 or not math.isfinite(slope):
        return 0.0
    return min(slope * slope / mid.grad_second, 1.0)
