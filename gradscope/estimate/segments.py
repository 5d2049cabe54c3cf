"""Positions that differ: per-segment moments along one axis, and the gradient per segment.

The sweeps carry one (mean, second moment) per tensor. That is exact for a
tensor whose positions are alike, and wrong when a ``cat`` along a sequence
axis joins parts of very different scale and the output later reads only one
of them. The commonest case is a classification token: ViT, CLIP's vision
tower and BERT-style classifiers prepend a learned token (``cat`` along the
token axis) whose scale is that of its init (std 0.02 in Hugging Face models),
while the patch tokens carry the patch embedding's (often 5-10x larger); the
head reads token 0 only (``select``). Pre-LN residual blocks then keep token 0
small (the residual stream is normalised per token, and only the branch
outputs are added to it), and the gradient, which enters at token 0, stays
mostly there: attention moves a share sum_j p_0j^2 ~ 1/T of it to the other
tokens per block. Every LayerNorm on that path divides the gradient by the
standard deviation *of token 0*, not of the tensor: with the tensor-wide
variance the estimate was 0.85 decade low at every encoder layer of the
Hugging Face ViT, and 0.6 decade high at the patch embedding, which receives
only what attention spreads (``tests/test_segments.py``).

So a node may carry :class:`Segments`: consecutive ranges along one axis, each
with its own moments. They are created by ``cat`` along that axis when the
parts' moments differ; kept through ops that act on each position separately
(elementwise arithmetic and activations, dropout, ``linear`` and LayerNorm /
RMSNorm over the trailing feature axes, reductions over the trailing axes
that keep the axis, shape-preserving copies); narrowed by ``select`` /
``slice`` on the axis; and dropped (the tensor-wide moments are used, as
before) by anything else: attention, views that move axes, convolutions,
BatchNorm. Forward, each segment's moments come from the op's own rule run
with the segment's input moments; backward, the gradient's squared norm is
carried per segment (:class:`SegmentBackward`), so each segment gets its own
gain; where a segment-blind op (attention) passes gradient to a segmented
tensor it lands on every position alike, i.e. by each segment's share of the
positions. Tensors without segments behave exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gradscope.estimate.statistics import Mom, var_of
from gradscope.tracing.graph import Ref, node_record

#: At most this many segments per tensor (a ``cat`` in a loop would make one per step).
MAX_SEGMENTS = 16
#: Parts whose second moments are within this ratio are alike: no segments. Within it a
#: per-segment normalisation gain differs from the tensor-wide one by at most sqrt(1.25)
#: in norm (0.05 decade), and concatenations of like parts (DenseNet's and U-Net's
#: channel joins) stay on the tensor-wide path they were checked on.
ALIKE = 1.25

#: Ops that act on each position separately (with broadcasting): segments pass through.
_POINTWISE_KEYS = frozenset({
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "pow", "square", "sqrt", "rsqrt",
    "reciprocal", "exp", "log", "clamp", "where", "masked_fill", "dropout",
})
#: Ops over the trailing (feature) axes: positionwise if the segmented axis comes first.
_TRAILING_KEYS = frozenset({"linear", "layer_norm", "rms_norm", "mean", "sum"})


@dataclass(frozen=True)
class Segments:
    """Consecutive ranges along ``axis`` (non-negative), each with its own moments."""

    axis: int
    sizes: tuple[int, ...]
    moms: tuple[Mom, ...]

    @property
    def shares(self) -> tuple[float, ...]:
        total = sum(self.sizes) or 1
        return tuple(s / total for s in self.sizes)

    def average(self) -> Mom:
        """The whole tensor's moments: each segment weighted by its share of positions."""
        shares = self.shares
        return (sum(s * m[0] for s, m in zip(shares, self.moms, strict=True)),
                sum(s * m[1] for s, m in zip(shares, self.moms, strict=True)))

    def same_layout(self, other: Segments) -> bool:
        return self.axis == other.axis and self.sizes == other.sizes


def _alike(moms: list[Mom]) -> bool:
    seconds = [max(m[1], 1e-30) for m in moms]
    return max(seconds) <= ALIKE * min(seconds)


def _axis(dim: Any, ndim: int) -> int | None:
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        return None
    return dim % ndim


@dataclass(frozen=True)
class Pick:
    """A ``select`` / ``slice`` along a segmented axis: which input segments it reads.

    ``first`` and ``last`` are input segment indices (inclusive); the output is
    the tensor made of the parts of those segments.
    """

    first: int
    last: int


def _pick_spec(ctx: Any, ndim: int) -> tuple[str, int, int | None, int | None] | None:
    """(``"select"``, dim, index, None) or (``"slice"``, dim, start, stop) of a pick.

    From ``select`` / ``slice`` / ``narrow`` (traced graphs), or from a ``getitem`` whose
    index is an int or a tuple of full slices with one int or unit-step slice among them
    (``h[:, 0]``, ``x[:, 1:]``: what the runtime recorder sees of the same reads).
    """
    op = ctx.data.op
    if ctx.data.key == "getitem":
        index = ctx.arg(1)
        parts = index if isinstance(index, tuple) else (index,)
        if len(parts) > ndim or any(p is None or p is Ellipsis for p in parts):
            return None
        picks = [(d, p) for d, p in enumerate(parts) if p != slice(None)]
        if len(picks) != 1:
            return None
        at, p = picks[0]
        if isinstance(p, int) and not isinstance(p, bool):
            return "select", at, p, None
        if isinstance(p, slice) and p.step in (None, 1) \
                and isinstance(p.start, (int, type(None))) \
                and isinstance(p.stop, (int, type(None))):
            return "slice", at, p.start, p.stop
        return None
    dim = _axis(ctx.arg(1, "dim", 0), ndim)
    if dim is None:
        return None
    if op == "select":
        index = ctx.arg(2, "index")
        return ("select", dim, index, None) if isinstance(index, int) else None
    start = ctx.arg(2, "start", 0)
    if op == "narrow":
        size = ctx.arg(3, "length")
        if not isinstance(start, int) or not isinstance(size, int):
            return None
        return "slice", dim, start, start + size
    stop, step = ctx.arg(3, "end", None), ctx.arg(4, "step", 1)
    if step != 1 or not isinstance(start, (int, type(None))) \
            or not isinstance(stop, (int, type(None))):
        return None
    return "slice", dim, start, stop


class SegmentForward:
    """Forward half: computes a node's segments (or none) from its inputs' segments."""

    def __init__(self, state: Any) -> None:
        #: SweepState: moments, spread and segments by node.
        self.state = state
        self.segments: dict[str, Segments] = {}
        #: How each segmented node relates to its input: "pointwise", "cat" or a Pick.
        self.mode: dict[str, str | Pick] = {}

    # forward ---------------------------------------------------------------
    def run(self, ctx: Any, fwd: Callable[[Any], Mom | None], mom: Mom | None) -> Mom | None:
        """Record ``ctx``'s node's segments; return its (possibly refined) moments."""
        if mom is None:
            return mom
        key, op = ctx.data.key, ctx.data.op
        out_shape = ctx.shape()
        if out_shape is None:
            return mom
        if key == "cat" and op in ("cat", "concat", "concatenate"):
            return self._cat(ctx, mom, out_shape)
        segmented = [r for r in ctx.activations_in() if r in self.segments]
        if not segmented:
            return mom
        if op in ("select", "slice", "narrow") or key == "getitem":
            return self._pick(ctx, mom, segmented[0], out_shape)
        seg = self.segments[segmented[0]]
        if not self._positionwise(ctx, seg, segmented[0], out_shape):
            return mom
        if any(not self.segments[r].same_layout(seg) for r in segmented):
            return mom
        moms: list[Mom] = []
        for k in range(len(seg.sizes)):
            with self.swapped(ctx, k):
                got = fwd(ctx)
            if got is None:
                return mom
            moms.append(got)
        out = Segments(seg.axis, seg.sizes, tuple(moms))
        self.segments[ctx.name] = out
        self.mode[ctx.name] = "pointwise"
        return out.average()

    def _positionwise(self, ctx: Any, seg: Segments, src: str,
                      out_shape: tuple[int, ...]) -> bool:
        key = ctx.data.key
        in_shape = ctx.shape(src)
        if in_shape is None or len(out_shape) != len(in_shape) or seg.axis >= len(out_shape):
            return False
        if out_shape[seg.axis] != sum(seg.sizes):
            return False
        if key in _POINTWISE_KEYS or key.startswith("activation:"):
            return True
        if key == "view":  # copies and casts that keep the shape (not transposes)
            return tuple(out_shape) == tuple(in_shape) and ctx.data.op not in (
                "permute", "transpose", "t", "flip", "roll", "movedim", "swapaxes")
        if key in _TRAILING_KEYS:
            if key == "layer_norm":
                norm = ctx.arg(1, "normalized_shape")
                if ctx.module is not None:
                    norm = getattr(ctx.module, "normalized_shape", norm)
                count = len(norm) if isinstance(norm, (list, tuple)) else 1
                return seg.axis < len(out_shape) - count
            if key in ("mean", "sum"):
                # reductions that keep every axis (keepdim) over trailing axes only
                return seg.axis < len(out_shape) - 1 and out_shape[-1] == 1
            return seg.axis < len(out_shape) - 1
        return False

    def _cat(self, ctx: Any, mom: Mom, out_shape: tuple[int, ...]) -> Mom:
        axis = _axis(ctx.arg(1, "dim", 0), len(out_shape))
        parts = ctx.arg(0, "tensors")
        if axis is None or not isinstance(parts, (list, tuple)):
            return mom
        sizes: list[int] = []
        moms: list[Mom] = []
        for part in parts:
            if not isinstance(part, Ref):
                return mom
            shape = ctx.shape(part.name)
            m = ctx.mom(part)
            if shape is None or m is None or len(shape) != len(out_shape):
                return mom
            own = self.segments.get(part.name)
            if own is not None and own.axis == axis:
                sizes.extend(own.sizes)
                moms.extend(own.moms)
            elif shape[axis] > 0:
                sizes.append(int(shape[axis]))
                moms.append(m)
        if len(sizes) < 2 or len(sizes) > MAX_SEGMENTS or _alike(moms) \
                or sum(sizes) != out_shape[axis]:
            return mom
        out = Segments(axis, tuple(sizes), tuple(moms))
        self.segments[ctx.name] = out
        self.mode[ctx.name] = "cat"
        return out.average()

    def _pick(self, ctx: Any, mom: Mom, src: str, out_shape: tuple[int, ...]) -> Mom:
        seg = self.segments[src]
        in_shape = ctx.shape(src)
        if in_shape is None:
            return mom
        spec = _pick_spec(ctx, len(in_shape))
        if spec is None:
            return mom
        op, dim, start_arg, stop_arg = spec
        if dim != seg.axis:
            # selecting along another axis keeps every position of the segmented one
            axis = seg.axis - 1 if op == "select" and dim < seg.axis else seg.axis
            out = Segments(axis, seg.sizes, seg.moms)
            self.segments[ctx.name] = out
            self.mode[ctx.name] = "pointwise"
            return out.average()
        length = sum(seg.sizes)
        if op == "select":
            assert isinstance(start_arg, int)
            start, stop = start_arg % length, start_arg % length + 1
        else:
            start, stop, _ = slice(start_arg, stop_arg).indices(length)
            if stop <= start:
                return mom
        bounds = [0]
        for s in seg.sizes:
            bounds.append(bounds[-1] + s)
        first = max(k for k in range(len(seg.sizes)) if bounds[k] <= start)
        last = max(k for k in range(len(seg.sizes)) if bounds[k] < stop)
        self.mode[ctx.name] = Pick(first, last)
        if first == last:
            return seg.moms[first]
        sizes = tuple(min(bounds[k + 1], stop) - max(bounds[k], start)
                      for k in range(first, last + 1))
        out = Segments(seg.axis, sizes, seg.moms[first:last + 1])
        self.segments[ctx.name] = out
        return out.average()

    @contextmanager
    def swapped(self, ctx: Any, k: int) -> Iterator[None]:
        """Within: the segmented inputs' (and the node's own) moments are segment ``k``'s."""
        st = self.state
        saved_m: dict[str, Mom | None] = {}
        saved_s: dict[str, float] = {}
        names = [r for r in ctx.activations_in() if r in self.segments]
        if ctx.name in self.segments:
            names.append(ctx.name)
        for r in names:
            seg_mom = self.segments[r].moms[k]
            saved_m[r] = st.moments.get(r)
            saved_s[r] = st.spread.get(r, 0.0)
            st.moments[r] = seg_mom
            st.spread[r] = min(saved_s[r], var_of(seg_mom))
        pending = st.pending_spread
        try:
            yield
        finally:
            for r, m in saved_m.items():
                st.moments[r] = m
                st.spread[r] = saved_s[r]
            st.pending_spread = pending


class SegmentBackward:
    """Backward half: the gradient's squared norm per segment of each segmented node.

    ``vec[node][k]`` sums to the node's scalar S; a deposit from a segment-blind
    consumer spreads over the segments by their shares of the positions.
    """

    def __init__(self, forward: SegmentForward, graph: Any) -> None:
        self.fwd = forward
        self.graph = graph
        self.vec: dict[str, list[float]] = {}

    def deposit(self, sq: dict[str, float], src: str, value: float,
                per_segment: list[float] | None = None) -> None:
        """Add ``value`` to ``src``'s S; per segment when given, else by shares."""
        sq[src] += value
        seg = self.fwd.segments.get(src)
        if seg is None:
            return
        vec = self.vec.setdefault(src, [0.0] * len(seg.sizes))
        if per_segment is not None and len(per_segment) == len(vec):
            for k, v in enumerate(per_segment):
                vec[k] += v
        else:
            for k, share in enumerate(seg.shares):
                vec[k] += value * share

    def of(self, name: str, total: float) -> list[float] | None:
        """Node ``name``'s S per segment (by shares if nothing was deposited per segment)."""
        seg = self.fwd.segments.get(name)
        if seg is None:
            return None
        vec = self.vec.get(name)
        if vec is None or sum(vec) <= 0.0:
            return [total * s for s in seg.shares]
        return vec

    def propagate(self, ctx: Any, total: float, bwd: Callable[[Any], dict[str, float]],
                  finite: Callable[[float], float]) -> dict[str, tuple[float, list[float] | None]]:
        """Per input: (S to deposit, per segment or None), or {} when not segmented here.

        ``total`` is the node's S; ``bwd`` its backward rule.
        """
        name = ctx.name
        mode = self.fwd.mode.get(name)
        if mode is None:
            return {}
        ins = ctx.activations_in()
        if isinstance(mode, Pick):
            src = ins[0] if ins else None
            seg = self.fwd.segments.get(src or "")
            if src is None or seg is None:
                return {}
            picked = [0.0] * len(seg.sizes)
            own_vec = self.of(name, total)
            if own_vec is None:
                picked[mode.first] = total
            else:
                for k, v in enumerate(own_vec):
                    picked[mode.first + k] = v
            return {src: (total, picked)}
        vec = self.of(name, total)
        if vec is None:
            return {}
        out: dict[str, tuple[float, list[float] | None]] = {}
        if mode == "cat":
            k = 0
            own = self.fwd.segments[name]
            for part in ctx.arg(0, "tensors"):
                sub = self.fwd.segments.get(part.name)
                count = len(sub.sizes) if sub is not None and sub.axis == own.axis else 1
                piece = vec[k:k + count]
                k += count
                if node_record(self.graph, part.name).role == "param":
                    continue
                prev = out.get(part.name)
                value = sum(piece) + (prev[0] if prev else 0.0)
                out[part.name] = (value, piece if count > 1 and prev is None else None)
            return out
        layout = self.fwd.segments[name]
        for k in range(len(layout.sizes)):
            with self.fwd.swapped(ctx, k):
                gains = bwd(ctx)
            for src, gain in gains.items():
                value = vec[k] * finite(gain)
                total_s, per = out.get(src, (0.0, None))
                if src in self.fwd.segments and self.fwd.segments[src].same_layout(layout):
                    per = per if per is not None else [0.0] * len(layout.sizes)
                    per[k] += value
                out[src] = (total_s + value, per)
        return out
