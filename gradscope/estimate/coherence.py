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
(the mean over them, broadcast back), counted in excess of chance (the mean of
T independent rows holds 1/T of their energy, which the independent-rows gains
already include). It is a lower bound for any subset of the axes. Axes are
kept as blocks of the row-major layout (:data:`Block`), so reshapes that merge
or split the other axes (a packed in-projection, ``[T * B, E]`` views) keep them.
It is *set* by reductions over positions (``mean``, ``sum``, global
``avg_pool``: the input's gradient is the output's broadcast, c = 1 along the
reduced axes) and by attention over near-uniform rows (see
:func:`gradscope.estimate.ops_attention.attention_coherence`); it is *kept* by ops
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

from gradscope.estimate.activations import activation_moments
from gradscope.estimate.ops_activation import _activation_params
from gradscope.estimate.statistics import var_of
from gradscope.tracing.graph import Ref, node_record

#: An axis as a block of the row-major layout: (elements before it, its size). Unlike an
#: axis index it survives reshapes that split or merge other axes, and a block may be
#: part of a larger axis (the 32 positions of a [32 * 4, 64] view of [32, 4, 64]).
Block = tuple[int, int]


@dataclass(frozen=True)
class Coherence:
    """``share`` of a gradient's squared norm (in excess of chance) constant along ``blocks``."""

    share: float
    blocks: frozenset[Block]

    def along(self, shape: Sequence[int], axis: int) -> float:
        """The share constant along ``axis`` of ``shape`` (a lower bound)."""
        if not -len(shape) <= axis < len(shape):
            return 0.0
        return self.share if block_of(shape, axis % len(shape)) in self.blocks else 0.0


INCOHERENT = Coherence(0.0, frozenset())

#: Ops (by their name, without an aten overload suffix) that swap two axes.
_SWAPS = frozenset({"transpose", "swapaxes", "t"})
#: Ops that regroup or copy values without moving them (row-major): blocks are unchanged.
_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze",
                       "unsqueeze", "view_as", "reshape_as", "contiguous", "clone", "alias",
                       "to", "type", "type_as", "float", "double", "half", "bfloat16",
                       "_to_copy", "copy", "lift_fresh_copy"})
_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
#: Ops that move values along an axis without changing the shape: constant stays constant.
_SHIFTS = frozenset({"roll", "flip"})
_PICKS = frozenset({"select", "slice", "narrow"})


def _base_op(op: str) -> str:
    return op.split(".")[0]


def block_of(shape: Sequence[int], axis: int, outer: int = 1, size: int | None = None) -> Block:
    """The block of ``axis`` (or of its part of ``size`` steps after ``outer`` of them)."""
    return math.prod(int(n) for n in shape[:axis]) * outer, \
        int(shape[axis]) if size is None else size


def locate(shape: Sequence[int], block: Block) -> tuple[int, int, int] | None:
    """(axis, outer, size): the axis ``block`` lies in, as its part after ``outer`` steps."""
    prefix, size = block
    p = 1
    for axis, n in enumerate(int(n) for n in shape):
        if prefix % p == 0 and size > 1:
            outer = prefix // p
            if n % (outer * size) == 0:
                return axis, outer, size
        p *= n
        if p > prefix:
            break
    return None


def canonical(shape: Sequence[int], blocks: frozenset[Block]) -> frozenset[Block]:
    """``blocks`` cut at ``shape``'s axes, then the pieces in one axis joined.

    Constant along a block means constant along any part of it, so a block that
    spans several axes (all positions, H * W, after a view splits them into
    windows) is kept as its pieces, one per axis; pieces next to each other in
    one axis (two window axes a permute brought together and a view merged) join
    again. A piece that does not divide its axis evenly is dropped.
    """
    dims = [int(n) for n in shape]
    starts = [math.prod(dims[:a]) for a in range(len(dims))]
    pieces: list[tuple[int, int, int]] = []  # (axis, start, end) as products
    for prefix, size in blocks:
        lo, hi = prefix, prefix * size
        for axis, (n, start) in enumerate(zip(dims, starts, strict=True)):
            end = start * n
            a, b = max(lo, start), min(hi, end)
            if n <= 1 or b <= a:
                continue
            if a % start or b % a or n % ((a // start) * (b // a)):
                continue
            pieces.append((axis, a, b))
    pieces.sort()
    joined: list[tuple[int, int, int]] = []
    for piece in pieces:
        if joined and joined[-1][0] == piece[0] and joined[-1][2] == piece[1]:
            joined[-1] = (piece[0], joined[-1][1], piece[2])
        elif not joined or joined[-1] != piece:
            joined.append(piece)
    return frozenset((a, b // a) for _, a, b in joined if b > a)


def axis_sources(ctx: Any, op: str, in_shape: Sequence[int],
                 out_shape: Sequence[int]) -> dict[int, int] | None:
    """The input axis each output axis comes from, for an op that moves or drops axes
    (transpose, permute, select and the other picks); None for any other op or arguments
    not understood. The backward sweep carries blocks along it (output to input), the
    forward one along its inverse (``gradscope.estimate.collapse``)."""
    ndim = len(out_shape)
    if op in _SWAPS:
        if op == "t" or ndim < 2:
            d0, d1 = 0, ndim - 1
        else:
            d0, d1 = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                return None
            d0, d1 = d0 % ndim, d1 % ndim
        swap = {d0: d1, d1: d0}
        return {a: swap.get(a, a) for a in range(ndim)}
    if op == "permute":
        perm = ctx.arg(1, "dims")
        if not isinstance(perm, (list, tuple)):
            perm = [a for a in ctx.args[1:] if isinstance(a, int)]
        if len(perm) != ndim or not all(isinstance(p, int) for p in perm):
            return None
        return {a: perm[a] % ndim for a in range(ndim)}
    if op in _PICKS:
        dim = ctx.arg(1, "dim", 0)
        if not isinstance(dim, int) or not -len(in_shape) <= dim < len(in_shape):
            return None
        dim %= len(in_shape)
        if op == "select":  # the selected axis is gone: later axes shift up by one
            return {a: a + (a >= dim) for a in range(ndim)}
        return {a: a for a in range(ndim) if a != dim}
    return None


def _remap(coh: Coherence, out_shape: Sequence[int], in_shape: Sequence[int],
           axis_map: dict[int, int]) -> Coherence:
    """Blocks of ``out_shape`` carried to ``in_shape`` by an axis map (out axis: in axis);
    a block in an unmapped axis, or in one that changes size, is dropped."""
    kept: set[Block] = set()
    for block in coh.blocks:
        where = locate(out_shape, block)
        if where is None or where[0] not in axis_map:
            continue
        axis, outer, size = where
        target = axis_map[axis]
        if not 0 <= target < len(in_shape) or int(in_shape[target]) != int(out_shape[axis]):
            continue
        kept.add(block_of(in_shape, target, outer, size))
    return Coherence(coh.share, frozenset(kept)) if kept else INCOHERENT


def _leading(coh: Coherence, shape: Sequence[int], count: int) -> Coherence:
    """The blocks that lie in the first ``count`` axes (not in the trailing feature axes)."""
    limit = math.prod(int(n) for n in shape[:max(count, 0)])
    kept = frozenset(b for b in coh.blocks if limit % (b[0] * b[1]) == 0)
    return Coherence(coh.share, kept) if kept else INCOHERENT


def map_broadcast(coh: Coherence, out_shape: Sequence[int],
                  in_shape: Sequence[int]) -> Coherence:
    """A broadcast operand (right-aligned): the blocks in the axes it has at full size."""
    offset = len(out_shape) - len(in_shape)
    return _remap(coh, out_shape, in_shape, {a: a - offset for a in range(offset, len(out_shape))})


def _axes_of(dims: Any, ndim: int) -> list[int] | None:
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    if not all(-ndim <= d < ndim for d in dims):
        return None
    return sorted({d % ndim for d in dims})


class CoherenceBackward:
    """The coherent share of each node's gradient, carried through the backward sweep.

    ``energy[n]`` is the coherent part of ``n``'s S deposited so far and
    ``blocks[n]`` what it is constant along.
    """

    def __init__(self, state: Any) -> None:
        #: SweepState: moments, spread, the graph.
        self.state = state
        self.energy: dict[str, float] = {}
        self.blocks: dict[str, frozenset[Block]] = {}

    def of(self, name: str, total: float) -> Coherence:
        blocks = self.blocks.get(name)
        energy = self.energy.get(name, 0.0)
        if not blocks or total <= 0.0 or energy <= 0.0:
            return INCOHERENT
        return Coherence(min(energy / total, 1.0), blocks)

    def deposit(self, src: str, value: float, coh: Coherence) -> None:
        """Add a consumer's gradient of squared norm ``value`` and coherence ``coh``.

        Coherent energies add (the engine adds the S of several consumers as
        independent); only the blocks every coherent deposit has in common are kept.
        """
        if coh.share <= 0.0 or not coh.blocks or value <= 0.0:
            return
        held = self.blocks.get(src)
        if held is None:
            self.blocks[src] = coh.blocks
            self.energy[src] = value * coh.share
            return
        common = held & coh.blocks
        self.blocks[src] = common
        self.energy[src] = self.energy.get(src, 0.0) + value * coh.share if common else 0.0

    # -----------------------------------------------------------------------
    def transfer(self, ctx: Any, coh: Coherence) -> dict[str, Coherence]:
        """The coherence of the gradient each signal input receives from ``ctx``'s node,
        its blocks cut to the input's axes (:func:`canonical`)."""
        out: dict[str, Coherence] = {}
        for src, got in self._transfer(ctx, self._fit(ctx.shape(), coh)).items():
            fitted = self._fit(ctx.shape(src), got)
            if fitted.share > 0.0:
                out[src] = fitted
        return out

    @staticmethod
    def _fit(shape: Sequence[int] | None, coh: Coherence) -> Coherence:
        if shape is None or coh.share <= 0.0:
            return INCOHERENT
        blocks = canonical(shape, coh.blocks)
        return Coherence(coh.share, blocks) if blocks else INCOHERENT

    def _transfer(self, ctx: Any, coh: Coherence) -> dict[str, Coherence]:
        key = ctx.data.key
        if key in ("mean", "sum", "avg_pool"):
            return self._reduction(ctx)
        if key in ("sdpa", "mha"):
            from gradscope.estimate.ops_attention import mha_coherence, sdpa_coherence
            passed = (sdpa_coherence if key == "sdpa" else mha_coherence)(ctx, coh)
            return {name: Coherence(share, frozenset({block_of(shape, axis)}))
                    for name, (share, shape, axis) in passed.items()}
        if coh.share <= 0.0:
            return {}
        out_shape = ctx.shape()
        if out_shape is None:
            return {}
        ins = ctx.activations_in()
        if key in ("linear", "addmm") or (key == "matmul" and self._weight_second(ctx)):
            return self._same(ins[:1], _leading(coh, out_shape, len(out_shape) - 1))
        if key in ("layer_norm", "rms_norm"):
            return self._same(ins[:1], self._normalised(ctx, coh, out_shape))
        if key in ("add", "sub", "rsub"):
            return {r: got for r in ins
                    if (got := self._broadcast(ctx, r, coh, out_shape)).share > 0.0}
        if key in ("mul", "div"):
            return self._product(ctx, coh, out_shape)
        if key == "dropout":
            from gradscope.estimate.ops_routing import _dropout_p
            return self._same(ins[:1], Coherence(coh.share * (1.0 - _dropout_p(ctx)),
                                                 coh.blocks))
        if key == "neg":
            return self._same(ins[:1], coh)
        if key.startswith("activation:"):
            return self._same(ins[:1], Coherence(coh.share * _slope_coherence(ctx),
                                                 coh.blocks))
        if key == "view":
            return self._same(ins[:1], self._routed(ctx, coh, out_shape))
        if key == "cat":
            return self._cat(ctx, coh, out_shape)
        if key == "getitem" and isinstance(ctx.arg(1), int) and ins \
                and ctx.shape(ins[0]) == out_shape:
            return self._same(ins[:1], coh)  # one output of a multi-output op (attention)
        return {}

    @staticmethod
    def _same(ins: list[str], coh: Coherence) -> dict[str, Coherence]:
        if coh.share <= 0.0 or not coh.blocks:
            return {}
        return {r: coh for r in ins}

    @staticmethod
    def _weight_second(ctx: Any) -> bool:
        other = ctx.arg(1, "other")
        return isinstance(other, Ref) and \
            node_record(ctx.est.graph, other.name).role == "param"

    @staticmethod
    def _reduction(ctx: Any) -> dict[str, Coherence]:
        """dx = broadcast(dy) / n (without 1/n for sum): constant along the reduced axes, c = 1."""
        first = ctx.first()
        in_shape = ctx.shape(first) if first else None
        out_shape = ctx.shape()
        if first is None or in_shape is None or out_shape is None:
            return {}
        ndim = len(in_shape)
        if ctx.data.key == "avg_pool":
            # only a global pool (each output reads a whole axis) makes dx constant along it
            spatial = range(2, ndim) if ndim > 2 else range(1, ndim)
            reduced = [a for a in spatial if len(out_shape) == ndim and out_shape[a] == 1]
        else:
            dims = ctx.arg(1, "dim")
            reduced = list(range(ndim)) if dims is None or dims == [] \
                else (_axes_of(dims, ndim) or [])
        blocks = frozenset(block_of(in_shape, a) for a in reduced if in_shape[a] > 1)
        return {first: Coherence(1.0, blocks)} if blocks else {}

    @staticmethod
    def _normalised(ctx: Any, coh: Coherence, out_shape: Sequence[int]) -> Coherence:
        """LayerNorm / RMSNorm over the trailing axes: the positions' coherence is kept.

        dx_i = (gamma / sigma_i) (g - mean_f g - xhat_i <xhat_i, g> / D): the first
        two terms are the same at every position when g is (sigma_i is the same
        statistic at every position), the last removes 1/D of the energy. Only
        the normalised (feature) axes leave the set.
        """
        norm = getattr(ctx.module, "normalized_shape", None) if ctx.module is not None \
            else ctx.arg(1, "normalized_shape")
        count = len(norm) if isinstance(norm, (list, tuple)) and norm else 1
        return _leading(coh, out_shape, len(out_shape) - count)

    @staticmethod
    def _broadcast(ctx: Any, src: str, coh: Coherence, out_shape: Sequence[int]) -> Coherence:
        shape = ctx.shape(src)
        return INCOHERENT if shape is None else map_broadcast(coh, out_shape, shape)

    def _product(self, ctx: Any, coh: Coherence,
                 out_shape: Sequence[int]) -> dict[str, Coherence]:
        """x * y: dx = y * g. The part of y common to all positions, (m^2 + spread) / q of
        y's moments, carries g's coherent part; a weight, a number, or a factor that is
        constant along the blocks keeps it whole. Likewise x / y (1/y to first order)."""
        out: dict[str, Coherence] = {}
        args = list(ctx.args[:2])
        for i, arg in enumerate(args):
            if not isinstance(arg, Ref):
                continue
            data = node_record(ctx.est.graph, arg.name)
            if data.role == "param" or not data.is_float:
                continue
            other = args[1 - i] if len(args) == 2 else None
            keep = 1.0
            if isinstance(other, Ref) and node_record(ctx.est.graph, other.name).role != "param":
                oshape = ctx.shape(other.name) or ()
                if map_broadcast(coh, out_shape, oshape).blocks:  # y varies along them
                    om = ctx.est.moments.get(other.name)
                    if om is None or om[1] <= 0.0:
                        keep = 0.0
                    else:
                        spread = min(ctx.est.spread.get(other.name, 0.0), var_of(om))
                        keep = min((om[0] ** 2 + spread) / om[1], 1.0)
            got = self._broadcast(ctx, arg.name, Coherence(coh.share * keep, coh.blocks),
                                  out_shape)
            if got.share > 0.0:
                out[arg.name] = got
        return out

    @staticmethod
    def _routed(ctx: Any, coh: Coherence, out_shape: Sequence[int]) -> Coherence:
        """Reshapes and copies keep the blocks; transposes, broadcasts and picks move them."""
        first = ctx.first()
        in_shape = ctx.shape(first) if first else None
        if in_shape is None:
            return INCOHERENT
        op = _base_op(str(ctx.data.op))
        if op in _RESHAPES:
            return coh if math.prod(in_shape) == math.prod(out_shape) else INCOHERENT
        if op in _SHIFTS:
            return coh if tuple(in_shape) == tuple(out_shape) else INCOHERENT
        if op in _EXPANDS:
            return map_broadcast(coh, out_shape, in_shape)
        sources = axis_sources(ctx, op, in_shape, out_shape)
        if sources is not None:
            return _remap(coh, out_shape, in_shape, sources)
        return INCOHERENT

    @staticmethod
    def _cat(ctx: Any, coh: Coherence, out_shape: Sequence[int]) -> dict[str, Coherence]:
        """Each part of a ``cat`` receives its slice: constant along the same axes; along the
        joined axis the part's own (shorter) axis."""
        parts = ctx.arg(0, "tensors")
        if not isinstance(parts, (list, tuple)) or _base_op(str(ctx.data.op)) not in (
                "cat", "concat", "concatenate"):
            return {}
        dim = ctx.arg(1, "dim", 0)
        if not isinstance(dim, int) or not -len(out_shape) <= dim < len(out_shape):
            return {}
        dim %= len(out_shape)
        joined = block_of(out_shape, dim)
        out: dict[str, Coherence] = {}
        for part in parts:
            if not isinstance(part, Ref) or node_record(ctx.est.graph, part.name).role == "param":
                continue
            shape = ctx.shape(part.name)
            if shape is None or len(shape) != len(out_shape):
                continue
            got = _remap(coh, out_shape, shape, {a: a for a in range(len(out_shape)) if a != dim})
            blocks = set(got.blocks)
            if joined in coh.blocks and shape[dim] > 1:
                blocks.add(block_of(shape, dim))
            if blocks:
                out[part.name] = Coherence(coh.share, frozenset(blocks))
        return out


def _slope_coherence(ctx: Any) -> float:
    """E[phi'(x)]^2 / E[phi'(x)^2] for x ~ N(m, v): the share of a coherent gradient an
    activation keeps (dx_i = phi'(x_i) g; its mean over positions is E[phi'] g).

    E[phi'] is :func:`mean_slope`; E[phi'^2] is the activation's ``grad_second``.
    """
    first = ctx.first()
    xm = ctx.est.moments.get(first) if first else None
    if xm is None:
        return 0.0
    slope = mean_slope(ctx, xm)
    try:
        mid = activation_moments(ctx.data.key.split(":", 1)[1], xm[0], var_of(xm),
                                 **_params(ctx))
    except (ValueError, TypeError):
        return 0.0
    if mid.grad_second <= 0.0 or slope == 0.0:
        return 0.0
    return min(slope * slope / mid.grad_second, 1.0)


def _params(ctx: Any) -> dict[str, Any]:
    """The activation node's parameters (slope, beta ...), {} where they cannot be read."""
    try:
        return _activation_params(ctx, ctx.data.key.split(":", 1)[1])
    except (AttributeError, TypeError, ValueError):
        return {}


def mean_slope(ctx: Any, xm: tuple[float, float]) -> float:
    """E[phi'(x)] for x ~ N(m, v) at an activation node: d E[phi(x)] / dm (Stein), by a
    central difference of the activation's Gaussian mean (``gradscope.estimate.activations``);
    0 where the moments cannot be computed."""
    name = ctx.data.key.split(":", 1)[1]
    params = _params(ctx)
    m, v = xm[0], var_of(xm)
    h = 1e-3 * math.sqrt(v) + 1e-6
    try:
        up = activation_moments(name, m + h, v, **params)
        down = activation_moments(name, m - h, v, **params)
    except (ValueError, TypeError):
        return 0.0
    slope = (up.mean - down.mean) / (2 * h)
    return slope if math.isfinite(slope) else 0.0
